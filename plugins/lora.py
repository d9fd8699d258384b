"""LoRA (Hu et al. 2021): y = W x + (alpha / r) B A dropout(x), with B = 0 at init.

``rank_pattern`` / ``alpha_pattern`` give some sites another rank or alpha (as HF PEFT's
keys of the same names): ``{selector: value}``, selectors being roles or module-path globs;
the first selector matching a site wins, the others keep ``r`` / ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from torch import nn

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


class LoraUpdate(pefc.SiteModule):
    """``y + s * B A dropout(x)``; ``A: [r, in]``, ``B: [out, r]``."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling()
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B A x`` (no dropout), in the adapter's dtype."""
        return self._scaled_down(x) @ self.lora_B.t()

    def add_low_rank(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + s * B A x``. ``s`` scales the rank-``r`` activation, and where the dtypes agree the
        sum is fused into the last product (``addmm``): no extra pass over the ``[tokens, out]`` output.
        Exported graphs keep product and sum apart (runtimes fuse them; onnxruntime's Gemm refuses
        the rank-0 LoRA inputs of ``export_onnx(lora_inputs=True)``)."""
        h = self._scaled_down(x)
        if h.dtype != y.dtype or torch.compiler.is_exporting():
            return y + (h @ self.lora_B.t()).to(y.dtype)
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t())
        return flat.view(y.shape)

    def _scaled_down(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.lora_A.dtype) @ self.lora_A.t()) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.add_low_rank(y, self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight + self.delta_weight().to(weight.dtype), bias


class Lora(pefc.Method):
    name = "lora"
    config = LoraConfig
    site_kinds = ("linear",)
    mergeable = True
    description = "Low-rank update of linear weights (Hu et al. 2021)"

    def rewrite(self, ctx: pefc.RewriteContext, config: LoraConfig, sites: Sequence[pefc.Site]) -> None:
        for site in sites:
            assert isinstance(site, pefc.LinearSite)
            ctx.wrap_output(site, LoraUpdate(site.in_features, site.out_features, config.for_site(site)))

    def param_count(self, config: LoraConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        return config.for_site(site).r * (site.in_features + site.out_features)


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Lora()]
