"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024), as a pefc plugin.

    y = W x + diag(b) B diag(d) A x

``A [r, d_in]`` and ``B [d_out, r]`` are frozen random matrices shared by every site of the
adapter (drawn once from ``projection_seed`` at the largest widths, each site uses a slice);
only the vectors ``d [r]`` (init ``d_initial``) and ``b [d_out]`` (init 0, so a fresh adapter
is the identity) are trained. Mergeable: ``W' = W + diag(b) B diag(d) A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

import pefc


class VeraConfig(pefc.AdapterConfig):
    method: Literal["vera"] = "vera"
    r: PositiveInt = Field(default=256, le=65536, description="rank of the shared random projections")
    d_initial: float = Field(default=0.1, description="initial value of the scaling vector d")
    projection_seed: int = Field(default=0, ge=0, description="seed of the frozen shared A and B")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def shared_projections(config: VeraConfig, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's frozen A [r, max_in] and B [max_out, r] (kaiming-uniform, seeded)."""
    generator = torch.Generator().manual_seed(config.projection_seed)
    a, b = torch.empty(config.r, max_in), torch.empty(max_out, config.r)
    for matrix in (a, b):
        bound = (6.0 / matrix.shape[1]) ** 0.5
        matrix.uniform_(-bound, bound, generator=generator)
    return a, b


class VeraUpdate(pefc.SiteModule):
    """``y + b * (B (d * (A dropout(x))))`` with frozen slices of the shared A and B."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, config: VeraConfig) -> None:
        super().__init__()
        self.register_buffer("vera_A", a.clone(), persistent=False)  # regenerated from the seed
        self.register_buffer("vera_B", b.clone(), persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial))
        self.vera_lambda_b = nn.Parameter(torch.zeros(b.shape[0]))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (self.dropout(x) @ self.vera_A.t()) * self.vera_lambda_d
        return y + ((h @ self.vera_B.t()) * self.vera_lambda_b).to(y.dtype)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta = (self.vera_lambda_b[:, None] * self.vera_B) @ (self.vera_lambda_d[:, None] * self.vera_A)
        return weight + delta.to(weight.dtype), bias


class Vera(pefc.Method):
    name = "vera"
    config = VeraConfig
    site_kinds = ("linear",)
    mergeable = True
    description = "Shared frozen random projections, trained scaling vectors (Kopiczko et al. 2024, VeRA)"

    def rewrite(self, ctx: pefc.RewriteContext, config: VeraConfig, sites: Sequence[pefc.Site]) -> None:
        linears = [s for s in sites if isinstance(s, pefc.LinearSite)]
        a, b = shared_projections(config, max(s.in_features for s in linears), max(s.out_features for s in linears))
        for site in linears:
            ctx.wrap_output(site, VeraUpdate(a[:, : site.in_features], b[: site.out_features], config))

    def param_count(self, config: VeraConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        return config.r + site.out_features


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Vera()]
