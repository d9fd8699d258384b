"""The spec's schema: pydantic models of every section but the adapter list.

These models depend on nothing but pydantic; :mod:`pefc.spec` adds the adapter list (a union
of the installed methods' configs, from the plugin registry) and parsing. Hook specifications
and low-level modules import the schema from here, so importing it never loads the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator


@dataclass(eq=False)
class Origin:
    """Where a ``model`` section came from: consent to run its code, and the spec file's folder (its
    ``python`` module is looked up there first). Not part of the spec's value: any two are equal."""

    trust_code: bool = False
    folder: str | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Origin)

    __hash__ = None  # type: ignore[assignment]


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
