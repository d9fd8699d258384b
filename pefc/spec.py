"""The spec: a pydantic model of what to adapt, loaded from YAML or JSON.

The ``adapters`` list is a discriminated union (on ``method``) of the config models of the
installed method plugins, so a third-party method validates exactly like a built-in.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, ValidationError, create_model

from pefc.config import AdapterConfig
from pefc.errors import SpecError
from pefc.registry import Registry, default_registry
from pefc.schema import (
    DTYPES,
    CaptureSpec,
    HFSource,
    InputSpec,
    ModelSpec,
    QuantizeSpec,
    SelectSpec,
    Spec,
    SpecBase,
)
from pefc.suggest import did_you_mean, keys_at
from pefc.trust import grant
from pefc.yamlio import YamlDocument, parse_yaml

__all__ = ["DTYPES", "CaptureSpec", "HFSource", "InputSpec", "ModelSpec", "QuantizeSpec", "SelectSpec", "Spec",
           "SpecBase", "load_spec", "parse_spec", "read_spec_data", "spec_model", "spec_schema"]

@lru_cache(maxsize=8)
def _spec_model(configs: tuple[type[AdapterConfig], ...]) -> type[SpecBase]:
    if not configs:
        item: Any = AdapterConfig
    elif len(configs) == 1:
        item = configs[0]
    else:
        item = Annotated[Union[configs], Field(discriminator="method")]  # noqa: UP007
    return create_model("Spec", __base__=SpecBase,
                        adapters=(list[item], Field(default_factory=list)))  # type: ignore[valid-type]


def spec_model(registry: Registry | None = None) -> type[SpecBase]:
    """The Spec pydantic model for the installed plugins."""
    return _spec_model(tuple((registry or default_registry()).config_models()))


def parse_spec(data: Any, *, source: str | None = None, document: YamlDocument | None = None,
               registry: Registry | None = None, trust_code: bool = False) -> SpecBase:
    """Validate a spec tree. Errors name each key path (and YAML line, given the ``document``).

    ``trust_code=True`` consents to import and call the spec's ``model.python`` (:mod:`pefc.trust`).
    """
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a mapping with keys version, model, inputs, adapters; got {type(data).__name__}",
                        source=source)
    registry = registry or default_registry()
    unknown = _unknown_methods(data, registry)
    installed = ", ".join(sorted(registry.methods)) or "none"
    issues = [f"{_where(['adapters', index, 'method'], document)}: unknown method {method!r} (installed: {installed})"
              for index, method in unknown.items()]
    try:
        spec = spec_model(registry).model_validate(data)
    except ValidationError as exc:
        issues += [_describe(err, document, data, registry) for err in exc.errors() if not _about_unknown(err, unknown)]
    else:
        from pefc.hfcheck import source_issues  # reads transformers' source; imports nothing

        issues += [f"{_where(loc, document)}: {message}" for loc, message in source_issues(spec)]
        from pefc.selection_spec import unselectable

        issues += [f"{_where(loc, document)}: {message}" for loc, message in unselectable(spec, registry)]
    if issues:
        hint = "`pefc plugins` lists installed methods" if unknown else None
        raise SpecError(f"{len(issues)} error(s) in the spec", source=source, issues=issues, hint=hint)
    grant(spec.model, trust_code)
    return spec


def _unknown_methods(data: dict[str, Any], registry: Registry) -> dict[int, str]:
    adapters = data.get("adapters")
    unknown = {}
    for index, entry in enumerate(adapters if isinstance(adapters, list) else []):
        method = entry.get("method") if isinstance(entry, dict) else None
        if isinstance(method, str) and method not in registry.methods:
            unknown[index] = method
    return unknown


def _about_unknown(err: Any, unknown: dict[int, str]) -> bool:
    loc = err["loc"]
    return len(loc) >= 2 and loc[0] == "adapters" and loc[1] in unknown


def _describe(err: Any, document: YamlDocument | None, data: dict[str, Any], registry: Registry) -> str:
    loc = [part for part in err["loc"] if not (isinstance(part, str) and "[" in part)]
    if _is_union_tag(loc, data):
        del loc[2]  # adapters.<i>.<method tag>.key -> adapters.<i>.key
    where = _where(loc, document)
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or err["type"] == "missing" else f" (got {_short(value)})"
    if err["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
        shown += did_you_mean(loc[-1], keys_at(spec_model(registry), loc[:-1], data))
    return f"{where}: {err['msg']}{shown}"


def _is_union_tag(loc: list[Any], data: dict[str, Any]) -> bool:
    """``loc[2]`` is the discriminator tag pydantic adds when several methods are installed."""
    adapters = data.get("adapters")
    if len(loc) < 3 or loc[0] != "adapters" or not isinstance(loc[1], int) or not isinstance(adapters, list):
        return False
    entry = adapters[loc[1]] if loc[1] < len(adapters) else None
    return isinstance(entry, dict) and entry.get("method") == loc[2]


def _where(loc: list[Any], document: YamlDocument | None) -> str:
    path = ".".join(str(part) for part in loc) or "(top level)"
    line = document.line(loc) if document is not None else None
    return f"{path} (line {line})" if line else path


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_spec_data(path: str | Path) -> tuple[Any, YamlDocument | None]:
    """Read a YAML or JSON spec file into plain data (and, for YAML, the document for line numbers)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such spec file", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the spec: {exc}", source=str(path)) from None
    if path.suffix.lower() != ".json":
        document = parse_yaml(text, source=str(path))
        return document.data, document
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        raise SpecError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                        source=str(path)) from None
    except RecursionError:
        raise SpecError("invalid JSON: nested too deeply", source=str(path)) from None


def load_spec(path: str | Path, *, registry: Registry | None = None, trust_code: bool = False) -> SpecBase:
    """Load and validate a spec file (YAML, or JSON by the ``.json`` suffix).

    ``trust_code=True`` consents to import and call its ``model.python``, which is then looked
    up in the spec file's folder first (:mod:`pefc.trust`).
    """
    data, document = read_spec_data(path)
    spec = parse_spec(data, source=str(path), document=document, registry=registry, trust_code=trust_code)
    if spec.model is not None:
        spec.model._origin.folder = str(Path(path).resolve().parent)
    return spec


def spec_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of the spec for the installed plugins."""
    schema = spec_model(registry).model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pefc spec"
    return schema
