"""The spec: a pydantic model of what to adapt, loaded from YAML or JSON.

The ``adapters`` list is a discriminated union (on ``method``) of the config models of the
installed method plugins, so a third-party method validates exactly like a built-in.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, model_validator

from pefc.config import AdapterConfig
from pefc.errors import SpecError
from pefc.registry import Registry, default_registry
from pefc.suggest import did_you_mean, keys_at
from pefc.trust import Origin, grant
from pefc.yamlio import YamlDocument, parse_yaml

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HFSource(_Strict):
    """A transformers model: random init from a config, or a local pretrained directory."""

    class_: str | None = Field(default=None, alias="class",
                               description="transformers class name, e.g. LlamaForCausalLM")
    config: dict[str, Any] = Field(default_factory=dict, description="kwargs of the class's config")
    pretrained: str | None = Field(default=None, description="local directory written by save_pretrained")
    attn_implementation: Literal["sdpa", "eager"] | None = Field(
        default=None, description="transformers attention implementation (default: sdpa where the class has it, "
                                  "else eager)")

    @model_validator(mode="after")
    def _one_source(self) -> HFSource:
        if self.pretrained is None and self.class_ is None:
            raise ValueError("give `class` (with `config`) or `pretrained`")
        if self.pretrained is not None and self.config:
            raise ValueError("`config` goes with `class`; a `pretrained` directory brings its own config")
        return self


class QuantizeSpec(_Strict):
    """A quantized base (QLoRA): its linear weights stored in ``method``, dequantized in the graph (pefc.quant)."""

    method: Literal["nf4", "int8"] = Field(description="nf4 (QLoRA's 4-bit normal float, torchao) or int8 weight-only")
    skip: list[str] | None = Field(default=None, description="linears kept unquantized: module-path globs or "
                                   "roles (@attn.q); default: the output head (embeddings are never quantized)")
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="dtype the weights dequantize to and linears compute in (default: model.dtype)")
    block_size: int = Field(default=64, ge=2, description="nf4: weights per absmax block")
    scaler_block_size: int = Field(default=256, ge=1, description="nf4: absmax blocks per int8-quantized scaler block")


class ModelSpec(_Strict):
    """Where the base model comes from, and its dtype and device."""

    hf: HFSource | None = None
    python: str | None = Field(default=None, pattern=r"^[\w.]+:[\w.]+$",
                               description='"package.module:factory" returning an nn.Module')
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the python factory")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?|meta)$")
    seed: int = Field(default=0, ge=0, description="seed of the random initialisation")
    _origin: Origin = PrivateAttr(default_factory=Origin)  # consent to run `python`, the spec's folder
    quantize: QuantizeSpec | None = Field(default=None, description="store the base's linear weights quantized")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.hf is None) == (self.python is None):
            raise ValueError("give exactly one of `hf` or `python`")
        if self.kwargs and self.python is None:
            raise ValueError("`kwargs` goes with `python`")
        return self


class InputSpec(_Strict):
    """One example input of the capture. Named dims (strings) are dynamic."""

    shape: list[Annotated[int, Field(ge=1, le=1 << 20)] | Annotated[str, Field(pattern=r"^[A-Za-z_]\w*$")]] = \
        Field(min_length=0, max_length=8)
    dtype: Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "bool"] = "int64"
    low: int = 0
    high: int | None = Field(default=None, description="exclusive upper bound of random ints")
    optional: bool = Field(default=False, description="callers may omit it, as the original model allows: it then "
                                                      "gets `default`, or (a loss input such as labels) the loss "
                                                      "is not computed")
    default: Literal["ones", "zeros", "arange"] | None = Field(
        default=None, description="what an omitted optional input becomes (default by name: *attention_mask ones, "
                                  "token_type_ids zeros, position_ids arange)")

    @model_validator(mode="after")
    def _range(self) -> InputSpec:
        if self.high is not None and self.high <= self.low:
            raise ValueError(f"`high` ({self.high}) must be greater than `low` ({self.low})")
        return self


class CaptureSpec(_Strict):
    """How to capture: example sizes of named dims."""

    dims: dict[str, Annotated[int, Field(ge=2, le=1 << 16)]] = Field(
        default_factory=dict, description="example size of each named dim (default: batch 2, seq 8, others 3+)")


class SelectSpec(_Strict):
    """Per-row adapter selection: row i of a call runs with the ``adapter_ids[i]``-th adapter of ``adapters``."""

    input: str = Field(default="adapter_ids", pattern=r"^[A-Za-z_]\w*$",
                       description="name of the new int64 input [batch]; -1 selects none of the adapters")
    adapters: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="the adapters picked per row, by index; the others stay on for every row")


class SpecBase(_Strict):
    """Everything but the adapter list, whose type depends on the installed plugins."""

    version: Literal[1] = 1
    model: ModelSpec | None = Field(default=None, description="the base model (omit to pass one to pefc.compile)")
    inputs: dict[str, InputSpec] = Field(min_length=1)
    capture: CaptureSpec = Field(default_factory=CaptureSpec)
    adapter_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="dtype of the adapter parameters (default: the base model's); float32 adapters "
                                  "on a bfloat16 base is mixed-precision training")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each decoder layer in backward instead of keeping its activations")
    modules_to_save: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description='base modules trained in full and saved with the adapters, as HF PEFT\'s '
                                          'modules_to_save: module-path globs ("classifier", "*.score")')
    select: SelectSpec | None = Field(default=None, description="adapters picked per row by a new int64 input "
                                                                "[batch] (see docs/selection.md)")

    @model_validator(mode="after")
    def _unique_adapter_names(self) -> SpecBase:
        seen: set[str] = set()
        for index, adapter in enumerate(getattr(self, "adapters", [])):
            if adapter.name in seen:
                raise ValueError(f"adapters[{index}]: two adapters are named {adapter.name!r}; names must be unique")
            seen.add(adapter.name)
        return self

    @model_validator(mode="after")
    def _select_names(self) -> SpecBase:
        if self.select is None:
            return self
        from pefc.selection_spec import select_problem

        problem = select_problem(self.select, [a.name for a in getattr(self, "adapters", [])], list(self.inputs))
        if problem:
            raise ValueError(problem)
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True, exclude_none=True)

    def dims(self) -> dict[str, int]:
        """Example size of every named dim used in ``inputs``."""
        defaults = {"batch": 2, "seq": 8}
        fallback = iter(range(3, 1 << 16))
        sizes: dict[str, int] = {}
        for spec in self.inputs.values():
            for dim in spec.shape:
                if isinstance(dim, str) and dim not in sizes:
                    sizes[dim] = self.capture.dims.get(dim) or defaults.get(dim) or next(
                        n for n in fallback if n not in defaults.values())
        return sizes


# The concrete Spec class: SpecBase + `adapters: list[Union[...configs of installed methods]]`.
Spec = SpecBase


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
