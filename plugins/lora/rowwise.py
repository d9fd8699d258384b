"""LoRA selected per row: batched products over each row's gathered ``A`` and ``B`` (BGMV)."""

from __future__ import annotations

import torch
from pefc_plugins.lora.dropout import MaskDropout
from torch import nn

from pefc.selection import by_row


def low_rank_rows(x: torch.Tensor, index: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scaling: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``s_i B_i A_i x`` for each row ``i`` as ``[batch, tokens, out]`` (plus ``add`` of that shape, in one
    product); ``a`` ``[n, r, in]``, ``b`` ``[n, out, r]``, ``scaling`` ``[n]`` stacked over the members,
    ``index`` ``[batch]`` each row's member."""
    rows = by_row(x, index.shape[0]).to(a.dtype)
    h = torch.bmm(rows, a[index].transpose(1, 2)) * scaling.to(a.dtype)[index][:, None, None]
    up = b[index].transpose(1, 2)
    return torch.bmm(h, up) if add is None else torch.baddbmm(add, h, up)


class LoraRows(nn.Module):
    """``y + s_i B_i A_i dropout(x)`` per row (rows of no member: ``y``)."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = MaskDropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: torch.Tensor) -> torch.Tensor:
        if y.dtype == a.dtype:  # the base output and the update in one product
            return low_rank_rows(self.dropout(x), index, a, b, scaling, add=by_row(y, index.shape[0])).view(y.shape)
        delta = low_rank_rows(self.dropout(x), index, a, b, scaling)
        return y + delta.reshape(y.shape).to(y.dtype)

    def uniform_update(self, a: torch.Tensor, b: torch.Tensor,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """A member's ``(A, B, s)`` when no dropout draws (``pefc.uniform_rows``: every row runs it)."""
        if self.training and not isinstance(self.dropout, nn.Identity):
            return None
        return a, b, float(scaling)
