"""DoRA selected per row: each member's magnitude over its row norm, gathered per row, and LoRA's
batched products (:mod:`pefc_plugins.lora.rowwise`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pefc_plugins.lora.dropout import MaskDropout
from pefc_plugins.lora.rowwise import low_rank_rows
from torch import nn


def member_scales(weight: torch.Tensor, layout: str, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor,
                  magnitude: torch.Tensor) -> torch.Tensor:
    """``[n, out]``: ``m_j / ||W0 + s_j B_j A_j||_row`` per member ``j`` (the norm without gradient, factored
    as in :class:`pefc_plugins.dora.modules.DoraUpdate`); the last entry (no member) is 1."""
    dtype = torch.promote_types(torch.promote_types(torch.float32, weight.dtype), a.dtype)
    with torch.no_grad():
        w, a32, b32, s = weight.to(dtype), a.to(dtype), b.to(dtype), scaling.to(dtype)[:, None, None]
        w0_at = (a32 @ w).transpose(1, 2) if layout == "in_out" else w @ a32.transpose(1, 2)  # [n, out, r]
        both = 2 * s * w0_at + s * s * (b32 @ (a32 @ a32.transpose(1, 2)))
        sq_w = torch.linalg.vector_norm(w, dim=0 if layout == "in_out" else 1).square()
        sq = sq_w + (both * b32).sum(-1)
        norm = torch.where(sq > 0, sq, 1.0).sqrt()
    scales = magnitude.to(dtype) / norm
    last = torch.arange(scales.shape[0], device=scales.device)[:, None] == scales.shape[0] - 1
    return torch.where(last, torch.ones_like(scales), scales)


class DoraRows(nn.Module):
    """``g_i (W0 x + s_i B_i A_i x) + b`` per row, ``g_i = m_i / ||W0 + s_i B_i A_i||`` (rows of no member: ``y``)."""

    def __init__(self, dropout: float, scope: str, layout: str) -> None:
        super().__init__()
        self.dropout = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.scope, self.layout = scope, layout

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor,
                magnitude: torch.Tensor) -> torch.Tensor:
        rows = index.shape[0]
        g = member_scales(weight, self.layout, a, b, scaling, magnitude)[index].to(y.dtype)[:, None, :]
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if dropping:
            x = self.dropout(x)
        y3 = y.reshape(rows, -1, y.shape[-1])
        low = low_rank_rows(x, index, a, b, scaling).to(y.dtype)
        if dropping and self.scope == "update":  # as HF PEFT: W0 drop(x) in the correction too
            base = x.to(weight.dtype) @ weight if self.layout == "in_out" else F.linear(x.to(weight.dtype), weight)
            out = y3 + (g - 1) * base.reshape(y3.shape).to(y.dtype) + g * low
            return out.reshape(y.shape)
        b3 = bias.to(y.dtype) if bias is not None else None
        plain = y3 - b3 if b3 is not None else y3
        out = g * (plain + low)
        return (out + b3 if b3 is not None else out).reshape(y.shape)
