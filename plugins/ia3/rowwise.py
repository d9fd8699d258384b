"""(IA)^3 selected per row: each row scales by its gathered vector (rows of no member: by 1)."""

from __future__ import annotations

import torch
from torch import nn


def row_scales(index: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, d]``: each row's vector; the last (zero) entry of ``stacked`` reads as ones."""
    table = torch.cat([stacked[:-1], torch.ones_like(stacked[-1:])])
    return table[index][:, None, :]


class IA3Rows(nn.Module):
    """``y * l_i`` (output side) or ``x * l_i`` fed to the linear (input side), per row."""

    def __init__(self, output: bool) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        scaled = rest[0] if self.output else x  # output side: (x, y, index, l); input side: (x, index, l)
        index, stacked = rest[-2], rest[-1]
        rows = scaled.reshape(index.shape[0], -1, scaled.shape[-1])
        return (rows * row_scales(index, stacked).to(scaled.dtype)).reshape(scaled.shape)
