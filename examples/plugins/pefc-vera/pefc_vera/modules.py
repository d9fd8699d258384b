"""VeRA's module: the shared frozen projections and the trained scaling vectors at each site."""

from __future__ import annotations

import torch
from torch import nn

import pefc
from pefc_vera import VeraConfig


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
