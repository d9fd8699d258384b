"""Discovers plugins through the ``pefc`` entry-point group and indexes their methods."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import pluggy

from pefc import hookspecs
from pefc.config import AdapterConfig
from pefc.errors import PluginError
from pefc.method import Method

DISABLE_ENV = "PEFC_DISABLE_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from, and what it provides (or why it failed)."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    methods: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class Registry:
    """The plugin manager plus the index of methods by name."""

    manager: pluggy.PluginManager
    methods: dict[str, Method] = field(default_factory=dict)
    method_sources: dict[str, PluginInfo] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)

    def method(self, name: str) -> Method:
        try:
            return self.methods[name]
        except KeyError:
            known = ", ".join(sorted(self.methods)) or "none installed"
            raise PluginError(f"unknown method {name!r}; installed methods: {known}",
                              hint="`pefc plugins` lists installed methods and their packages") from None

    def config_models(self) -> list[type[AdapterConfig]]:
        return [self.methods[name].config for name in sorted(self.methods)]

    @property
    def hook(self) -> Any:
        return self.manager.hook


def _disabled() -> set[str]:
    return {item.strip() for item in os.environ.get(DISABLE_ENV, "").split(",") if item.strip()}


def _check_method(method: Any, plugin: str) -> Method:
    if not isinstance(method, Method):
        raise PluginError(f"plugin {plugin!r} returned {method!r} from pefc_methods, not a pefc.Method instance")
    name = getattr(method, "name", None)
    config = getattr(method, "config", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise PluginError(f"plugin {plugin!r}: method name {name!r} is not an identifier")
    if not (isinstance(config, type) and issubclass(config, AdapterConfig)):
        raise PluginError(f"plugin {plugin!r}: method {name!r} has config {config!r}, "
                          "which is not a subclass of pefc.AdapterConfig")
    field_info = config.model_fields.get("method")
    literal = getattr(field_info.annotation, "__args__", ()) if field_info else ()
    if tuple(literal) != (name,):
        raise PluginError(f"plugin {plugin!r}: config {config.__name__} of method {name!r} must declare "
                          f"`method: Literal[{name!r}] = {name!r}`")
    return method


def build_registry(extra_plugins: list[tuple[str, object]] | None = None) -> Registry:
    """Load every ``pefc`` entry point (minus ``PEFC_DISABLE_PLUGINS``) plus ``extra_plugins``.

    A plugin that fails to import or registers a bad or clashing method is recorded with its
    error and skipped; the others keep working.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager)
    disabled = _disabled()
    candidates: list[tuple[str, str, str | None, str | None, Any]] = []
    for ep in sorted(entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
        if ep.name in disabled:
            continue
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        candidates.append((ep.name, ep.value, dist, version, ep))
    for name, obj in extra_plugins or []:
        candidates.append((name, getattr(obj, "__name__", repr(obj)), None, None, obj))

    for name, module, dist, version, source in candidates:
        registry.plugins.append(_load_one(registry, name, module, dist, version, source))
    return registry


def _load_one(registry: Registry, name: str, module: str, dist: str | None, version: str | None,
              source: Any) -> PluginInfo:
    where = f"plugin {name!r} ({module}" + (f", from {dist} {version}" if dist else "") + ")"
    try:
        plugin = source.load() if hasattr(source, "load") and hasattr(source, "group") else source
        registry.manager.register(plugin, name=name)
    except Exception as exc:  # a broken plugin must not take the others down
        return _failed(name, module, dist, version, f"failed to load: {type(exc).__name__}: {exc}", where)
    try:
        provided = [_check_method(m, name) for m in _methods_of(registry.manager, plugin)]
    except Exception as exc:
        registry.manager.unregister(plugin)
        return _failed(name, module, dist, version, f"{type(exc).__name__}: {exc}", where)
    info = PluginInfo(name, module, dist, version, tuple(m.name for m in provided))
    for method in provided:
        if method.name in registry.methods:
            other = registry.method_sources[method.name]
            registry.manager.unregister(plugin)
            return _failed(name, module, dist, version,
                           f"method {method.name!r} is already provided by plugin {other.name!r}"
                           + (f" ({other.distribution})" if other.distribution else ""), where)
    for method in provided:
        registry.methods[method.name] = method
        registry.method_sources[method.name] = info
    return info


def _failed(name: str, module: str, dist: str | None, version: str | None, error: str, where: str) -> PluginInfo:
    warnings.warn(f"pefc: {where} skipped: {error}", stacklevel=3)
    return PluginInfo(name, module, dist, version, (), error)


def _methods_of(manager: pluggy.PluginManager, plugin: Any) -> list[Method]:
    """Call ``pefc_methods`` of one plugin only, so a bad plugin stays isolated."""
    impls = [impl for impl in manager.hook.pefc_methods.get_hookimpls() if impl.plugin is plugin]
    methods: list[Method] = []
    for impl in impls:
        result = impl.function()
        if result is None:
            continue
        if not isinstance(result, (list, tuple)):
            raise PluginError(f"pefc_methods must return a list of pefc.Method, got {type(result).__name__}")
        methods.extend(result)
    return methods


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry of installed plugins (cached; see :func:`reset_registry`)."""
    return build_registry()


def reset_registry() -> None:
    """Forget the cached registry, e.g. after installing a plugin or changing ``PEFC_DISABLE_PLUGINS``."""
    default_registry.cache_clear()
