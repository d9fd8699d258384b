"""Dropout that keeps a one-byte mask for backward and draws four elements from each 64-bit draw of the generator.

On CPU ``nn.Dropout`` multiplies the input by a float mask ``bernoulli(1 − p) / (1 − p)`` and
autograd keeps that mask, four bytes per element, for every dropout until backward. Its draws are
slow where MKL's generator is not used (any non-Intel CPU): one 64-bit draw of the Mersenne
Twister per element. Here every 64-bit draw of the same generator gives four 16-bit uniform
integers ``u``, and an element is dropped when ``u < k`` with ``k = round(p · 2¹⁶)``: the drop
probability is ``p′ = k / 2¹⁶`` (within 2⁻¹⁷ of ``p``; at least 2⁻¹⁶) and the output
``x ⊙ keep / (1 − p′)`` is unbiased. The same seed gives the same mask (``torch.manual_seed``,
as for ``nn.Dropout``); the mask differs from ``nn.Dropout``'s. Backward keeps only ``keep``,
one byte per element, and widens it to the input's dtype through ``uint8`` (a vectorised
conversion; ``bool`` to float is not) when it multiplies. Elsewhere (CUDA's fused dropout keeps a
boolean mask and draws with Philox already; ``torch.compile`` and ``torch.export`` draw their own)
it is ``nn.Dropout``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the mask's resolution: 16-bit uniform integers, four per 64-bit draw
_LEVELS = 1 << 16


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` with fast draws and a boolean mask kept for backward (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or not 0 < self.p < 1 or self.inplace or x.device.type != "cpu" or not x.is_floating_point()
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return super().forward(x)
        dropped = drop_levels(self.p)
        keep = keep_mask(x.shape, dropped)
        return _KeepMask.apply(x, keep, x.new_full((), _LEVELS / (_LEVELS - dropped)))


def drop_levels(p: float) -> int:
    """``k``: an element is dropped with probability ``k / 2¹⁶``, the nearest to ``p`` in ``[2⁻¹⁶, 1 − 2⁻¹⁶]``."""
    return min(max(round(p * _LEVELS), 1), _LEVELS - 1)


def keep_mask(shape: torch.Size, dropped: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of ``shape``, each element ``False`` with probability ``dropped / 2¹⁶``, independently."""
    numel = shape.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    uniform = words.view(torch.int16)[:numel].view(shape)  # uniform over [−2¹⁵, 2¹⁵)
    return uniform >= dropped - (_LEVELS >> 1)


class _KeepMask(torch.autograd.Function):
    """``x ⊙ keep · scale`` (``keep`` boolean, ``scale`` a 0-dim tensor of ``x``'s dtype)."""

    @staticmethod
    def forward(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _masked(x, keep, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, keep, scale = inputs
        ctx.save_for_backward(keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        keep, scale = ctx.saved_tensors
        return _masked(grad, keep, scale), None, None


def _masked(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.mul(keep.view(torch.uint8).to(x.dtype)).mul_(scale)
