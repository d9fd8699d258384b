"""(IA)^3 (Liu et al. 2022): learned scale vectors on a linear's output, or on its input for FFN sites."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

import pefc


class IA3Config(pefc.AdapterConfig):
    method: Literal["ia3"] = "ia3"
    default_target: ClassVar[tuple[str, ...]] = ("@attn.k", "@attn.v", "@mlp.down")
    feedforward: list[str] = Field(
        default_factory=lambda: ["@mlp.down"],
        description="Targets scaled on the input side (roles or path globs); the others scale the output.")

    @field_validator("feedforward")
    @classmethod
    def _selectors_not_blank(cls, value: list[str]) -> list[str]:
        if any(not item.strip() or item.strip() == "@" for item in value):
            raise ValueError("a feedforward selector must be a role like '@mlp.down' or a module-path glob")
        return value

    def is_feedforward(self, site: pefc.Site) -> bool:
        return any(pefc.selector_matches(selector, site) for selector in self.feedforward)


class IA3Output(pefc.SiteModule):
    """``y * l`` (the bias is scaled too, as in HF PEFT); ``l: [out]``, ones at init."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.ia3_l.to(y.dtype)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = self.ia3_l.to(weight.dtype)
        return weight * scale[:, None], bias * scale if bias is not None else None


class IA3Input(pefc.SiteModule):
    """``x * l`` fed to the linear; ``l: [in]``, ones at init."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.to(x.dtype)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight * self.ia3_l.to(weight.dtype)[None, :], bias


class IA3(pefc.Method):
    name = "ia3"
    config = IA3Config
    site_kinds = ("linear",)
    mergeable = True
    description = "Learned rescaling of attention k/v outputs and FFN inputs (Liu et al. 2022, (IA)^3)"

    def rewrite(self, ctx: pefc.RewriteContext, config: IA3Config, sites: Sequence[pefc.Site]) -> None:
        for site in sites:
            assert isinstance(site, pefc.LinearSite)
            if config.is_feedforward(site):
                ctx.wrap_input(site, IA3Input(site.in_features))
            else:
                ctx.wrap_output(site, IA3Output(site.out_features))

    def param_count(self, config: IA3Config, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        return site.in_features if config.is_feedforward(site) else site.out_features


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [IA3()]
