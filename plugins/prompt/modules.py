"""Prompt tuning's module: virtual-token embeddings joined before the input's."""

from __future__ import annotations

import torch
from torch import nn


class PromptEmbedding(nn.Module):
    """``[prompt; embeds]`` along the sequence (dim -2); ``prompt_embeddings: [P, d_model]``."""

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.randn(length, dim))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_embeddings.to(embeds.dtype).expand(*embeds.shape[:-2], *self.prompt_embeddings.shape)
        return torch.cat([prompt, embeds], dim=-2)

    def copy_rows(self, table: torch.Tensor, seed: int | None) -> None:
        """Start from rows of the embedding ``table`` at random token ids (PEFT's ``SAMPLE_VOCAB``),
        drawn with ``seed`` or, without one, from torch's global generator."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = torch.randint(0, table.shape[0], (self.prompt_embeddings.shape[0],), generator=generator)
        with torch.no_grad():
            self.prompt_embeddings.copy_(table.detach()[ids.to(table.device)].to(self.prompt_embeddings.dtype))
