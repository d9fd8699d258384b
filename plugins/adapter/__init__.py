"""Bottleneck adapters: sequential (Houlsby et al. 2019, Pfeiffer et al. 2021) or parallel (He et al. 2022).

sequential: ``y' = y + s * (f(y W_down + b_down) W_up + b_up)`` on the target's output;
parallel:   ``y' = y + s * (f(x W_down + b_down) W_up + b_up)`` reading the target's input ``x``.
``W_up`` and ``b_up`` start at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

import pefc

PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": {"target": ["@attn.o", "@mlp.down"], "activation": "swish", "reduction_factor": 16},
    "pfeiffer": {"target": ["@mlp.down"], "activation": "relu", "reduction_factor": 16},
    "parallel": {"placement": "parallel", "reduction_factor": 2, "scaling": 4.0},
}


DEFAULT_SIZE = 64


WHAT = {"size": "the bottleneck width m", "reduction_factor": "m = d // reduction_factor"}


class BottleneckConfig(pefc.AdapterConfig):
    method: Literal["adapter"] = "adapter"
    default_target: ClassVar[tuple[str, ...]] = ("@attn.o", "@mlp.down")
    preset: Literal["houlsby", "pfeiffer", "parallel"] | None = Field(
        default=None, description="fills the keys not given: houlsby, pfeiffer or parallel (He et al.)")
    size: int | None = Field(default=None, description=f"bottleneck width m (default {DEFAULT_SIZE})")
    reduction_factor: float | None = Field(default=None, description="m = d // reduction_factor instead of size")
    activation: Literal["relu", "gelu", "silu", "swish", "tanh"] = "relu"
    placement: Literal["sequential", "parallel"] = "sequential"
    scaling: float = Field(default=1.0, description="s, the factor on the adapter's output")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("preset"), str) or data["preset"] not in PRESETS:
            return data
        filled = dict(data)
        for key, value in PRESETS[data["preset"]].items():
            sized = key == "reduction_factor" and filled.get("size") is not None
            if filled.get(key) in (None, []) and not sized:
                filled[key] = value
        return filled

    @field_validator("size", "reduction_factor")
    @classmethod
    def _positive(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"`{info.field_name}` must be > 0 ({WHAT[info.field_name]})")
        return value

    @model_validator(mode="after")
    def _size_or_factor(self) -> BottleneckConfig:
        if self.size is not None and self.reduction_factor is not None:
            raise ValueError("give `size` or `reduction_factor`, not both")
        return self

    def bottleneck(self, site: pefc.LinearSite) -> int:
        """m at ``site``: ``size``, or the target's output width // ``reduction_factor``."""
        if self.reduction_factor is not None:
            return int(site.out_features // self.reduction_factor)
        return self.size if self.size is not None else DEFAULT_SIZE


class Adapter(pefc.Method):
    name = "adapter"
    config = BottleneckConfig
    site_kinds = ("linear",)
    mergeable = False
    selectable = True
    description = "Bottleneck adapter after (sequential) or beside (parallel) a sublayer (Houlsby 2019, He 2022)"

    def rewrite(self, ctx: pefc.RewriteContext, config: BottleneckConfig, sites: Sequence[pefc.Site]) -> None:
        from pefc_plugins.adapter.modules import Bottleneck

        for site in sites:
            assert isinstance(site, pefc.LinearSite)
            ctx.wrap_output(site, Bottleneck(self._d_in(config, site), config.bottleneck(site),
                                             site.out_features, config))

    def param_count(self, config: BottleneckConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        size = config.bottleneck(site)
        return self._d_in(config, site) * size + size + size * site.out_features + site.out_features

    def validate_sites(self, config: BottleneckConfig, sites: Sequence[pefc.Site]) -> None:
        for site in sites:
            assert isinstance(site, pefc.LinearSite)
            if config.bottleneck(site) < 1:
                raise pefc.TargetError(
                    f"adapter {config.name!r}: reduction_factor {config.reduction_factor:g} leaves no bottleneck "
                    f"at {site.path} ({site.out_features} features); use a smaller factor or `size`")

    @staticmethod
    def _d_in(config: BottleneckConfig, site: pefc.LinearSite) -> int:
        return site.in_features if config.placement == "parallel" else site.out_features


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Adapter()]

