"""LoRA (Hu et al. 2021): y = W x + (alpha / r) B A dropout(x), with B = 0 at init.

``rank_pattern`` / ``alpha_pattern`` give some sites another rank or alpha (as HF PEFT's
keys of the same names): ``{selector: value}``, selectors being roles or module-path globs;
the first selector matching a site wins, the others keep ``r`` / ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

import pefc


class LoraConfig(pefc.AdapterConfig):
    method: Literal["lora"] = "lora"
    r: PositiveInt = Field(default=8, le=65536, description="rank of the update")
    alpha: float = Field(default=16.0, gt=0, description="scaling numerator: s = alpha / r")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch input")
    rslora: bool = Field(default=False, description="rank-stabilised scaling s = alpha / sqrt(r)")
    init: Literal["kaiming", "gaussian"] = Field(
        default="kaiming", description="init of A (B is zero): kaiming-uniform (a=sqrt(5)) or N(0, 1/r)")
    rank_pattern: dict[str, PositiveInt] = Field(
        default_factory=dict, description="per-site rank {selector: r}; the first matching selector wins")
    alpha_pattern: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="per-site alpha {selector: alpha}; the first matching selector wins")

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _selectors_not_blank(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not key.strip() or key.strip() == "@" for key in value):
            raise ValueError("a pattern key must be a role like '@attn.v' or a module-path glob like '*.v_proj'")
        return value

    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def for_site(self, site: pefc.Site) -> LoraConfig:
        """This config with ``r`` and ``alpha`` as ``rank_pattern`` / ``alpha_pattern`` set them at ``site``."""
        r = _first_match(self.rank_pattern, site, self.r)
        alpha = _first_match(self.alpha_pattern, site, self.alpha)
        if (r, alpha) == (self.r, self.alpha):
            return self
        return self.model_copy(update={"r": r, "alpha": alpha})


def _first_match(pattern: dict[str, float], site: pefc.Site, default: float) -> float:
    return next((value for selector, value in pattern.items() if pefc.selector_matches(selector, site)), default)


class Lora(pefc.Method):
    name = "lora"
    config = LoraConfig
    site_kinds = ("linear",)
    mergeable = True
    selectable = True
    description = "Low-rank update of linear weights (Hu et al. 2021)"

    def rewrite(self, ctx: pefc.RewriteContext, config: LoraConfig, sites: Sequence[pefc.Site]) -> None:
        from pefc_plugins.lora.modules import LoraUpdate

        for site in sites:
            assert isinstance(site, pefc.LinearSite)
            ctx.wrap_output(site, LoraUpdate(site.in_features, site.out_features, config.for_site(site)))

    def param_count(self, config: LoraConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        return config.for_site(site).r * (site.in_features + site.out_features)


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Lora()]

