"""Dropout that keeps a one-byte mask for backward: the draws and values of ``nn.Dropout``, a quarter of its memory.

On CPU ``nn.Dropout`` multiplies the input by a float mask ``bernoulli(1 − p) / (1 − p)`` and
autograd keeps that mask, four bytes per element, for every dropout until backward. Here the mask
is drawn as booleans from the same generator (the same draws: same seed, same mask) and the
output is ``x ⊙ keep · 1/(1 − p)`` with the same float32 factor, so outputs and gradients are
bit-identical to ``nn.Dropout``'s; backward keeps only ``keep``, one byte per element, and
widens it to the input's dtype again (a transient copy) when it multiplies. Elsewhere
(CUDA's fused dropout keeps a boolean mask already; ``torch.compile`` and ``torch.export`` draw
their own) it is ``nn.Dropout``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` keeping a boolean mask for backward (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or not 0 < self.p < 1 or self.inplace or x.device.type != "cpu" or not x.is_floating_point()
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return super().forward(x)
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - self.p)
        return _KeepMask.apply(x, keep, x.new_ones(()).div_(1 - self.p))


class _KeepMask(torch.autograd.Function):
    """``x ⊙ keep · scale`` (``keep`` boolean, ``scale`` a 0-dim tensor of ``x``'s dtype)."""

    @staticmethod
    def forward(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.mul(keep.to(x.dtype)).mul_(scale)  # a float x bool product is a slow, unvectorized path

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, keep, scale = inputs
        ctx.save_for_backward(keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        keep, scale = ctx.saved_tensors
        return grad.mul(keep.to(grad.dtype)).mul_(scale), None, None
