"""DoRA's output with a hand-written backward: ``g ⊙ (y − b + h Bᵀ) + b`` in one pass and one product.

Autograd through the plain formula makes four passes over the ``[tokens, out]`` output forward
(``y − b``, the copy inside ``addmm``, ``g ⊙``, ``+ b``) and keeps the sum ``z = y − b + h Bᵀ`` for
``g``'s gradient. Here the forward is ``(1 − g) ⊙ b + g ⊙ y`` (one pass, ``addcmul``) with
``h (g ⊙ B)ᵀ`` accumulated into it in place (the product's own pass). Backward keeps ``y`` (the
frozen base's output, the size of ``z``) and ``h``, and takes the magnitude's gradient from cheap
quantities, with ``Gᵀ h`` (``[out, r]``, needed for ``B``'s gradient anyway):

``∂L/∂m = (Σ_t G ⊙ y − b ⊙ Σ_t G + rowsum(Gᵀ h ⊙ B)) / n``, ``∂L/∂B = g ⊙ Gᵀ h``,
``∂L/∂h = (g ⊙ G) B``, ``∂L/∂y = g ⊙ G``; ``g = m / n``, the norm ``n`` gets no gradient (as HF PEFT).

No weight gradient of ``W0`` is ever formed. Equal to autograd through the plain formula up to
float rounding (``tests/test_dora_matches_peft.py``); traced by ``torch.compile`` as one function
(forward and backward), without a graph break.
"""

from __future__ import annotations

from typing import Any

import torch


class MagnitudeScaled(torch.autograd.Function):
    """``g ⊙ (y − b + h Bᵀ) + b`` with ``g = m / n`` (see the module); ``y``, ``h`` and ``B`` of one dtype."""

    @staticmethod
    def forward(y: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, lora_b: torch.Tensor,
                magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        g = (magnitude / norm).to(y.dtype)
        flat = y.reshape(-1, y.shape[-1])
        out = flat * g if bias is None else torch.addcmul((1 - g) * bias.to(y.dtype), flat, g)
        out.addmm_(h.reshape(-1, h.shape[-1]), (lora_b * g[:, None]).t())
        return out.view(y.shape)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        y, bias, h, lora_b, magnitude, norm = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(y, bias if bias is not None else y.new_empty(0), h, lora_b, magnitude, norm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, bias, h, lora_b, magnitude, norm = ctx.saved_tensors
        need_y, need_bias, need_h, need_b, need_m, _ = ctx.needs_input_grad
        g = (magnitude / norm).to(grad.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        flat_h = h.reshape(-1, h.shape[-1])
        scaled = flat * g if need_y or need_h else None
        grad_y = scaled.view(y.shape) if need_y else None
        grad_h = (scaled @ lora_b).view(h.shape) if need_h else None
        grad_bias = grad_b = grad_m = None
        if need_b or need_m:
            gt_h = flat.t() @ flat_h  # [out, r]
            grad_b = gt_h * g[:, None] if need_b else None
            if need_m:
                wide = norm.dtype
                along = (flat * y.reshape(flat.shape)).sum(0, dtype=wide) + torch.linalg.vecdot(gt_h, lora_b).to(wide)
                if ctx.has_bias:
                    along = along - bias.to(wide) * flat.sum(0, dtype=wide)
                grad_m = (along / norm).to(magnitude.dtype)
        if ctx.has_bias and need_bias:
            grad_bias = ((1 - g) * flat.sum(0)).to(bias.dtype)
        return grad_y, grad_bias, grad_h, grad_b, grad_m, None


def magnitude_scaled(y: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, lora_b: torch.Tensor,
                     magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``(m / n) ⊙ (y − b + h Bᵀ) + b`` through :class:`MagnitudeScaled` (``n`` without gradient)."""
    return MagnitudeScaled.apply(y, bias, h, lora_b, magnitude, norm)
