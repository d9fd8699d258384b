"""Frozen linears in the faster CPU library (:mod:`pefc.cpu_gemm`): a lowering of every plain
``linear`` on the model's own weights that no adapter lowering took (a head, an unadapted
projection, every linear of a merged model).

:func:`frozen_linear` computes ``x Wᵀ + b`` as ``aten.linear`` does, with both products (forward,
and the input's gradient in backward) through :func:`pefc.cpu_gemm.linear`. It falls back to
``aten.linear`` wherever that library choice does not apply: a weight or bias that trains (a
trainable head), tensor subclasses, other dtypes or devices, under ``torch.compile``,
``torch.export`` or autocast, or in ``torch`` mode. The graph keeps its ``linear`` node
(:mod:`pefc.lowering`): export, merging and planning see the model unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from pefc import cpu_gemm
from pefc.lowering import plain_linear

_LINEAR = torch.ops.aten.linear.default


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``aten.linear(x, weight, bias)``, its products in :mod:`pefc.cpu_gemm` where that applies."""
    if not _applies(x, weight, bias):
        return _LINEAR(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenLinear.apply(x, weight, bias)
    return _product(x, weight, bias)


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if (cpu_gemm.mode() == "torch" or x.dim() < 2 or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.is_autocast_enabled("cpu") or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return cpu_gemm.takes(x, weight) if bias is None else cpu_gemm.takes(x, weight, bias)


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = cpu_gemm.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    # not a view of the 2-d product (as aten.linear's output is not): a model's output may be this
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


class FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with a frozen ``W`` and ``b``: backward gives the input's gradient, ``g W``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        return _product(grad, weight.t(), None), None, None


def lower_frozen_linears(model: fx.GraphModule, graph: fx.Graph) -> int:
    """In ``graph`` (the copy the model's code is generated from), call :func:`frozen_linear` for
    every ``aten.linear`` on parameters read by ``get_attr``; return how many."""
    lowered = 0
    for node in graph.nodes:
        if plain_linear(node):
            node.target = frozen_linear
            lowered += 1
    return lowered
