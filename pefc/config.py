"""The base pydantic model every method's adapter config derives from."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pefc.selector import split_kind

ADAPTER_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"


class AdapterConfig(BaseModel):
    """Keys shared by every adapter entry of a spec.

    A method's config subclasses this, narrows ``method`` to a ``Literal`` of its own name
    and may change the default ``target``::

        class LoraConfig(AdapterConfig):
            method: Literal["lora"] = "lora"
            r: PositiveInt = 8
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Default targets when the spec gives none; methods override this.
    default_target: ClassVar[tuple[str, ...]] = ()
    #: Keys that may differ between a checkpoint and the model it is loaded into.
    runtime_keys: ClassVar[tuple[str, ...]] = ("dropout",)

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, max_length=128,
                      description="Adapter name; prefixes its parameter names.")
    method: str = Field(description="The PEFT method, as listed by `pefc plugins`.")
    target: list[str] = Field(
        default_factory=list,
        description='Sites to adapt: roles ("@attn.q", "@mlp.down", "@attn", "@embed"), roles in one '
                    'kind of attention ("@attn.q[cross]", "@attn[self]", "@attn.v[encoder]", "@attn[decoder]") or '
                    'module-path globs ("*.q_proj"). Empty: the method\'s default targets.')
    layers: list[int] | None = Field(
        default=None, description="Only sites in these layer indices (the first integer in the module path).")

    @field_validator("target")
    @classmethod
    def _targets_not_blank(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.strip() or item.strip() == "@":
                raise ValueError("a target must be a role like '@attn.q' or a module-path glob like '*.q_proj'")
            split_kind(item.strip())  # raises for an unknown attention kind: '@attn.q[cross]'
        return value

    @field_validator("layers")
    @classmethod
    def _layers_non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(layer < 0 for layer in value):
            raise ValueError("layer indices must be >= 0")
        return value

    def targets(self) -> list[str]:
        """The targets to match: the spec's, or the method's defaults."""
        return list(self.target) or list(self.default_target)
