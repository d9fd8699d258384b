"""Checks a spec's transformers model against transformers itself, without building the model.

A misspelt ``hf.config`` key is silently stored by transformers (``num_hiden_layers`` builds the
default 24 layers), a misspelt class fails only at build time, and an input the model's
``forward`` does not take reaches torch.export's raw message. These checks catch all three, with
"did you mean ...", in two passes:

- :func:`source_issues`, run by every spec validation (``pefc validate`` too), reads transformers'
  source (:mod:`pefc.hfsource`): nothing is imported, so it costs milliseconds. It reports what
  the source proves: a class name the auto tables do not know but one they know is close to, a
  config key close to a declared one, an input ``forward`` does not take.
- :func:`hf_issues`, run before a model is built (transformers is imported then anyway), asks the
  classes themselves: the config class is instantiated from the keys alone (no tensors) and
  ``forward``'s signature gives the input names.

Without transformers installed both are skipped (building an ``hf`` model then says to install it).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from pefc.errors import ModelSourceError, SpecError
from pefc.schema import SpecBase
from pefc.suggest import closest, did_you_mean

Issue = tuple[list[Any], str]
TYPO_CUTOFF = 0.8  # difflib ratio above which an unknown config key is taken for a misspelt declared one


def source_issues(spec: SpecBase) -> list[Issue]:
    """What transformers' source shows wrong in ``spec.model.hf`` and ``spec.inputs``, without importing it."""
    from pefc import hfsource

    hf = spec.model.hf if spec.model is not None else None
    if hf is None or hfsource.package_root() is None:
        return []
    name, loc = hf.class_, ["model", "hf", "class"]
    if name is None:
        loc = ["model", "hf", "pretrained"]
        try:
            name = _architecture_of(Path(str(hf.pretrained)))
        except ModelSourceError as exc:  # unreadable, or asks for remote code
            return [(loc, exc.message)]
    if name is None:
        return []
    known = hfsource.model_classes()
    if name not in known:
        guess = closest(name, sorted(known), cutoff=0.8)  # otherwise the build asks transformers itself
        return [(loc, f"transformers has no model class {name!r}; did you mean {guess}?")] if guess else []
    keys = hfsource.config_keys(name) if hf.class_ is not None else None
    config_name = hfsource.config_class_name(name)
    issues = [(["model", "hf", "config", key], f"{config_name} has no parameter {key!r} (transformers would "
               f"ignore it); did you mean {guess}?")
              for key in hf.config if keys is not None and key not in keys
              and (guess := closest(key, sorted(keys), cutoff=TYPO_CUTOFF))]
    signature = hfsource.forward_signature(name)
    if signature is not None:
        issues += _unknown_inputs(name, list(signature.names), signature.var_keyword, spec)
    return issues


def _architecture_of(path: Path) -> str | None:
    """The first architecture a pretrained directory's config.json names (raises ModelSourceError)."""
    architectures = read_pretrained_config(path).get("architectures") or []
    return str(architectures[0]) if architectures else None


def raise_hf_issues(spec: SpecBase) -> None:
    """Raise a :class:`SpecError` listing :func:`hf_issues`, if any (call before building the model)."""
    issues = hf_issues(spec)
    if issues:
        raise SpecError(f"{len(issues)} error(s) in the spec's model",
                        issues=[f"{'.'.join(map(str, loc))}: {message}" for loc, message in issues])


def hf_issues(spec: SpecBase) -> list[Issue]:
    """Problems of ``spec.model.hf`` and of ``spec.inputs`` for that class, each with its key path
    (imports transformers and the model's modeling file)."""
    hf = spec.model.hf if spec.model is not None else None
    if hf is None:
        return []
    try:
        import transformers
    except ImportError:
        return []
    if hf.class_ is not None:
        cls, issues = _model_class(transformers, hf.class_, ["model", "hf", "class"])
        if cls is not None:
            issues += _config_issues(cls, hf.config)
    else:
        cls, issues = _pretrained_class(transformers, Path(str(hf.pretrained)))
    if cls is not None:
        issues += _input_issues(cls, spec)
    return issues


def _model_class(transformers: Any, name: str, loc: list[Any]) -> tuple[type | None, list[Issue]]:
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # its modeling file needs a package that is missing: the build will say which
        return None, []
    import torch

    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return cls, []
    models = [n for n in dir(transformers) if n[:1].isupper() and ("For" in n or n.endswith("Model"))]
    what = "has no model class" if cls is None else "exports, but not as a model class,"
    return None, [(loc, f"transformers {what} {name!r}{did_you_mean(name, models, cutoff=0.8)}")]


def _pretrained_class(transformers: Any, path: Path) -> tuple[type | None, list[Issue]]:
    loc = ["model", "hf", "pretrained"]
    try:
        config = read_pretrained_config(path)
    except ModelSourceError as exc:
        return None, [(loc, exc.message)]
    architectures = config.get("architectures") or []
    if not architectures:
        return None, []
    return _model_class(transformers, str(architectures[0]), loc)


def _config_issues(cls: type, values: dict[str, Any]) -> list[Issue]:
    """Keys of ``hf.config`` that the config class neither takes nor translates (e.g. ``rope_theta``)."""
    config_cls = getattr(cls, "config_class", None)
    if config_cls is None:
        return []
    known = _config_keys(config_cls)
    unknown = [key for key in values if key not in known]
    if not unknown:
        return []
    try:
        stored = vars(config_cls(**values))
        default = vars(config_cls())
    except Exception as exc:  # noqa: BLE001 - any refusal of the config class is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [(["model", "hf", "config"], f"not a valid {config_cls.__name__}: {first[:300]}")]
    public = sorted(k for k in known if not k.startswith("_"))
    # a stored key close to a declared one is a typo; one that is not may be read by the model's own code
    # (T5 reads config.decoder_start_token_id), so it is left alone
    return [(["model", "hf", "config", key],
             f"{config_cls.__name__} has no parameter {key!r} (transformers would ignore it){hint}")
            for key in unknown if key in stored and key not in default
            and (hint := did_you_mean(key, public, cutoff=TYPO_CUTOFF))]


def _config_keys(config_cls: type) -> set[str]:
    """Parameters of the config class and its bases, and its ``attribute_map`` aliases."""
    keys: set[str] = set()
    for klass in config_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            keys |= {name for name, p in _parameters(init).items()
                     if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"}
        keys |= set(getattr(klass, "attribute_map", None) or {})
    return keys


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _input_issues(cls: type, spec: SpecBase) -> list[Issue]:
    """Spec inputs that ``cls.forward`` does not take (where it takes ``**kwargs``, only near misses)."""
    params = _parameters(getattr(cls, "forward", None))
    named = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return _unknown_inputs(cls.__name__, named, any(p.kind is p.VAR_KEYWORD for p in params.values()), spec)


def _unknown_inputs(class_name: str, named: list[str], any_keyword: bool, spec: SpecBase) -> list[Issue]:
    if not named:
        return []
    select = getattr(spec, "select", None)
    own = {getattr(select, "input", None)}  # an input pefc adds itself (per-row adapter selection)
    issues: list[Issue] = []
    for name in spec.inputs:
        if name in named or name in own:
            continue
        guess = closest(name, named, cutoff=0.75)
        if guess or not any_keyword:
            hint = f"; did you mean {guess}?" if guess else f"; it takes {', '.join(named)}"
            issues.append((["inputs", name], f"{class_name}.forward takes no input {name!r}{hint}"))
    return issues


def read_pretrained_config(path: Path) -> dict[str, Any]:
    """``path/config.json``, refused when it asks for remote code (``auto_map``): pefc never runs it."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"model.hf.pretrained: {path} has no config.json",
                               hint="point it at a directory written by save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelSourceError(f"{config_file} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{config_file} is not a JSON object")
    if config.get("auto_map"):
        names = ", ".join(f"{k} -> {v}" for k, v in dict(config["auto_map"]).items()) \
            if isinstance(config["auto_map"], dict) else repr(config["auto_map"])
        raise ModelSourceError(f"{config_file} asks for remote code (auto_map: {names}); pefc keeps "
                               "trust_remote_code off and never runs code from a model directory",
                               hint="load the model yourself and pass it: pefc.compile(spec, model=module), "
                                    "or set model.hf.class to a class transformers ships")
    return config
