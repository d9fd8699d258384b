"""Bottleneck adapters selected per row: batched products over each row's gathered weights.

Members of one group share activation and placement; their widths may differ (zero-padded
units add ``f(0) W_up = 0``, as ``f(0) = 0`` for every activation offered).
"""

from __future__ import annotations

import torch
from torch import nn

from pefc.selection import by_row


class BottleneckRows(nn.Module):
    """``y + s_i (f(h W_down_i + b_down_i) W_up_i + b_up_i)`` per row, ``h`` = ``y`` or (parallel) ``x``."""

    def __init__(self, act: nn.Module, parallel: bool) -> None:
        super().__init__()
        self.act, self.parallel = act, parallel

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, down: torch.Tensor,
                down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
                scaling: torch.Tensor) -> torch.Tensor:
        h = by_row(x if self.parallel else y, index.shape[0]).to(down.dtype)
        hidden = self.act(torch.bmm(h, down[index].transpose(1, 2)) + down_bias[index][:, None, :])
        out = torch.bmm(hidden, up[index].transpose(1, 2)) + up_bias[index][:, None, :]
        out = out * scaling.to(out.dtype)[index][:, None, None]
        return y + out.reshape(y.shape).to(y.dtype)
