"""Products of the sites that read one input: the shared down-projection (:func:`stacked_down`,
:mod:`pefc.fusion`'s graph node) and the base products with their low-rank updates as one
autograd node (:func:`fused_linear_sites`, what :func:`pefc.fusion.lower_base_products` lowers to).

A LoRA-style site computes ``y_i = x W_iᵀ (+ b_i) + s_i (d(x) A_iᵀ) B_iᵀ``. Run op by op, every
site writes its base output, then a copy of it with the update added (``addmm``), and backward
sums the input's gradient over the base products and the low-rank ones with an out-of-place
add each. :class:`FusedLinearLowRank` does the same arithmetic with less traffic over memory:

- forward: ``u = d(x) [A_1; A_2; ...]ᵀ`` once, then per site ``y_i = x W_iᵀ`` and the update
  accumulated into ``y_i`` in place (``addmm_``);
- backward: ``gx = Σ g_i W_i + Σ (s_i g_i B_i) A_i`` accumulated into one buffer in place, ``A``'s
  gradient for the group as one product, ``B_i``'s as ``s_i g_iᵀ u_i``.

Where there is no dropout (``d(x) = x``) the node also picks the cheaper association, as a
matrix-chain order: ``x (W_i + s_i B_i A_i)ᵀ`` costs ``out·in·r`` multiply-adds for the weight
against ``tokens·out·r`` for ``(x A_iᵀ) B_iᵀ``, so forward folds the update into a temporary
weight when the input has more rows than features, and backward does the same for the input's
gradient when the rows outnumber the group's output features (:func:`folds`). Only float32 and
float64 fold: a half-precision ``W + s B A`` would round the update to ``W``'s grid.

The frozen base gets no weight gradient. The products go through :func:`pefc.cpu_gemm.linear`
(on a CPU, the faster of torch's BLAS and oneDNN for each shape), except the scaled low-rank terms
(``s u Bᵀ``, ``s g B``, ``B``'s gradient and the fold), which stay in torch's in-place ``addmm``.
The result equals the op-by-op graph up to float rounding (sums in another order);
:func:`fused_linear_sites` takes the op-by-op path whenever the fused one does not apply (see
:func:`_fusable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pefc.cpu_gemm import PLAIN_TENSORS, linear

#: one site: (module, base weight, base bias or None, the module's arguments after ``y``)
Member = tuple[nn.Module, torch.Tensor, torch.Tensor | None, tuple[Any, ...]]


def stacked_down(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x @ Aᵢᵀ`` for every ``Aᵢ`` as one product with ``[A_1; A_2; ...]``, split back per site.

    Exported graphs keep one product per site (an ONNX file with rank-0 LoRA inputs must not
    depend on the ranks traced)."""
    x = x.to(weights[0].dtype)
    if torch.compiler.is_exporting():
        return tuple(x @ w.t() for w in weights)
    return (x @ torch.cat(weights).t()).split([w.shape[0] for w in weights], dim=-1)


def fused_linear_sites(x: torch.Tensor, branch: torch.Tensor | None,
                       members: Sequence[Member]) -> tuple[torch.Tensor, ...]:
    """Every member's output for input ``x``: ``module(d, x Wᵀ + bias, *extra[, down=...])``.

    ``branch`` is the group's dropped input ``d`` (shared by members that take ``down``), or
    ``None`` for a single site that drops its own input. Fused where :func:`_fusable`; otherwise
    the op-by-op computation the graph had (under ``torch.compile``, ``torch.export`` or autocast,
    for tensor subclasses, mixed dtypes or a trainable base)."""
    downs = [getattr(m[0], m[0].fusion_weight) for m in members]
    ups = [getattr(m[0], m[0].fusion_up) for m in members]
    if not _fusable(x, members, downs, ups):
        return _op_by_op(x, branch, members, downs)
    if branch is None:  # one site: its own dropout, drawn as its forward would
        module = members[0][0]
        if module.training and isinstance(getattr(module, "dropout", None), nn.Dropout):
            branch = module.dropout(x)
    return _fused(x, None if branch is x else branch, members, downs, ups)


def _op_by_op(x: torch.Tensor, branch: torch.Tensor | None, members: Sequence[Member],
              downs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What the graph computes: the base ``linear`` of each site, then the site module."""
    if branch is None:
        (module, weight, bias, extra), = members
        return (module(x, F.linear(x, weight, bias), *extra),)
    products = stacked_down(branch, *downs)
    return tuple(module(branch, F.linear(x, weight, bias), *extra, down=products[i])
                 for i, (module, weight, bias, extra) in enumerate(members))


def _fused(x: torch.Tensor, branch: torch.Tensor | None, members: Sequence[Member],
           downs: list[torch.Tensor], ups: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    weights = [m[1] for m in members]
    biases = [m[2] for m in members]
    scales = tuple(float(m[0].fusion_scale) for m in members)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *downs, *ups)):
        outs = FusedLinearLowRank.apply(x, branch, len(members), scales, tuple(b is not None for b in biases),
                                        *weights, *downs, *ups, *(b for b in biases if b is not None))
    else:  # inference: nothing kept for backward (and no down-projection where the update folds)
        outs = site_products(x, branch, weights, downs, ups, scales, biases, for_backward=False)[0]
    return tuple(module.finish(out, *extra) for (module, _, _, extra), out in zip(members, outs, strict=True))


def _fusable(x: torch.Tensor, members: Sequence[Member], downs: list[torch.Tensor], ups: list[torch.Tensor]) -> bool:
    """Plain tensors of one dtype and device, a frozen base, and every module willing
    (``fuses_base()``: e.g. DoRA's ``dropout_scope: update`` while training is not)."""
    if (x.dim() < 2 or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.is_autocast_enabled(x.device.type)):
        return False
    dtype, device = x.dtype, x.device
    tensors = [x, *downs, *ups]
    for module, weight, bias, _ in members:
        if not module.fuses_base() or weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        tensors.append(weight)
        if bias is not None:
            tensors.append(bias)
    return all(type(t) in PLAIN_TENSORS and t.dtype == dtype and t.device == device for t in tensors)


def folds(tokens: int, features: int, dtype: torch.dtype) -> bool:
    """Whether ``tokens`` rows against ``features`` make ``x (W + s B A)ᵀ`` the cheaper order (see
    the module docstring)."""
    return tokens > features and dtype in (torch.float32, torch.float64)


def folded_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + s B A``, a temporary that no gradient flows through."""
    return torch.addmm(weight, up, down, alpha=scale)


def site_products(x: torch.Tensor, branch: torch.Tensor | None, weights: Sequence[torch.Tensor],
                   downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], scales: Sequence[float],
                   biases: Sequence[torch.Tensor | None], *, for_backward: bool
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(outputs, u, [A_1; A_2; ...], d2)``: every site's ``x W_iᵀ + b_i + s_i u_i B_iᵀ`` (or
    ``x (W_i + s_i B_i A_i)ᵀ + b_i``, see :func:`folds`), with ``u = d2 [A_1; ...]ᵀ`` computed
    where the outputs or backward (``for_backward``) need it."""
    x2 = x.reshape(-1, x.shape[-1])
    d2 = x2 if branch is None else branch.reshape(-1, branch.shape[-1])
    stacked = torch.cat(downs) if len(downs) > 1 else downs[0]
    fold = branch is None and folds(*x2.shape, x.dtype)  # rows against in-features
    u = linear(d2, stacked) if for_backward or not fold else None
    outs, start = [], 0
    for weight, down, up, scale, bias in zip(weights, downs, ups, scales, biases, strict=True):
        rank = down.shape[0]
        w = folded_weight(weight, down, up, scale) if fold else weight
        y = linear(x2, w, bias)
        if not fold:
            y.addmm_(u[:, start:start + rank], up.t(), alpha=scale)
        outs.append(y.view(*x.shape[:-1], weight.shape[0]))
        start += rank
    return outs, u, stacked, d2


class FusedLinearLowRank(torch.autograd.Function):
    """``acc_i = x W_iᵀ + b_i + s_i (d Aᵀ)_i B_iᵀ`` for every site ``i`` of one input (``d``: the
    dropped input, or ``x`` itself when ``branch`` is None); see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, branch: torch.Tensor | None, n: int, scales: tuple[float, ...],
                has_bias: tuple[bool, ...], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, downs, ups = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n]
        biases = iter(tensors[3 * n:])
        outs, u, stacked, d2 = site_products(x, branch, weights, downs, ups, scales,
                                              [next(biases) if b else None for b in has_bias], for_backward=True)
        ctx.save_for_backward(d2, u, stacked, *weights, *ups)
        ctx.meta = (n, scales, has_bias, x.shape, None if branch is None else branch.shape,
                    [d.shape[0] for d in downs])
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n, scales, has_bias, x_shape, branch_shape, ranks = ctx.meta
        d2, u, stacked, *rest = ctx.saved_tensors
        weights, ups = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        need_x, need_branch = need[0], branch_shape is not None and need[1]
        need_downs = any(need[5 + n:5 + 2 * n])
        need_ups = need[5 + 2 * n:5 + 3 * n]
        tokens = d2.shape[0]
        # the input's gradient: rows against the group's out-features
        fold = need_x and branch_shape is None and folds(tokens, sum(w.shape[0] for w in weights), u.dtype)
        low_into_x = need_x and branch_shape is None and not fold
        # g_low = [s_1 g_1 B_1, s_2 g_2 B_2, ...], [tokens, Σ r] (row-major: the faster layout here)
        g_low = torch.empty(tokens, sum(ranks), dtype=u.dtype, device=u.device) \
            if need_downs or need_branch or low_into_x else None
        ignored = u.new_zeros(())  # addmm's input where beta=0: the product alone, scaled by alpha
        gx = None
        up_grads: list[torch.Tensor | None] = []
        start = 0
        for weight, up, scale, rank, grad, wants_up in zip(weights, ups, scales, ranks, grads, need_ups, strict=True):
            g2 = grad.reshape(-1, grad.shape[-1])
            up_grads.append(torch.addmm(ignored, g2.t(), u[:, start:start + rank], beta=0, alpha=scale)
                            if wants_up else None)
            if g_low is not None:
                g_low[:, start:start + rank].addmm_(g2, up, beta=0, alpha=scale)
            if need_x:
                w = folded_weight(weight, stacked[start:start + rank], up, scale) if fold else weight
                gx = linear(g2, w.t(), add=gx)
            start += rank
        down_grads: list[torch.Tensor | None] = [None] * n
        if need_downs:
            down_grads = list(linear(g_low.t(), d2.t()).split(ranks))
        g_branch = None
        if need_branch:
            g_branch = linear(g_low, stacked.t()).view(branch_shape)
        elif low_into_x:
            gx = linear(g_low, stacked.t(), add=gx)
        if gx is not None:
            gx = gx.view(x_shape)
        return (gx, g_branch, None, None, None, *([None] * n), *down_grads, *up_grads,
                *([None] * sum(has_bias)))
