"""Prefix tuning's modules: per-site prefixes, the reparameterisation MLP and its baked table."""

from __future__ import annotations

import torch
from torch import nn

import pefc


class PrefixKV(nn.Module):
    """The prefix of one attention site, shaped like its key/value: ``[..., heads, P, head_dim]``.

    Holds ``prefix_key`` / ``prefix_value`` ``[P, d_kv]``, or (``index`` given) reads them
    from the shared table ``[P, n_sites*2*d_kv]`` passed to :meth:`forward`.
    """

    def __init__(self, length: int, kv_heads: int, width: int, index: int | None = None) -> None:
        super().__init__()
        self.kv_heads, self.width, self.index = kv_heads, width, index
        if index is None:
            self.prefix_key = nn.Parameter(torch.randn(length, width))
            self.prefix_value = nn.Parameter(torch.randn(length, width))

    def forward(self, key: torch.Tensor, value: torch.Tensor,
                table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if table is None:
            k, v = self.prefix_key, self.prefix_value
        else:
            start = 2 * self.index * self.width
            k, v = table[:, start:start + self.width], table[:, start + self.width:start + 2 * self.width]
        return self._like(k, key), self._like(v, value)

    def _like(self, prefix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        heads = like.shape[-3]
        x = prefix.view(prefix.shape[0], self.kv_heads, -1).transpose(0, 1)  # [kv_heads, P, head_dim]
        if heads != self.kv_heads:  # the graph repeats kv heads before the attention (repeat_kv)
            x = x.repeat_interleave(heads // self.kv_heads, dim=0)
        return x.to(like.dtype).expand(*like.shape[:-3], heads, x.shape[1], x.shape[2])


class PrefixEncoder(pefc.BakeableModule):
    """PEFT's reparameterisation: ``transform(embedding.weight)`` -> ``[P, n_sites*2*d_kv]``."""

    def __init__(self, length: int, width: int, hidden: int, n_sites: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(length, width)
        self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, n_sites * 2 * width))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)

    def bake(self) -> nn.Module:
        with torch.no_grad():
            return PrefixTable(self())


class PrefixTable(nn.Module):
    """The baked prefix table ``prompt_embeddings [P, n_sites*2*d_kv]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(table.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.prompt_embeddings

