"""A selecting model's batch whose rows all run one adapter: its update folded into the frozen
product, as the single-adapter model computes it (a lowering, :mod:`pefc.lowering`).

A selected LoRA site computes its base product and then, per row, the update over that row's
gathered ``A`` and ``B`` (batched products, :mod:`pefc.selection`). When every row of the batch
picks the same adapter, as when one adapter serves a whole batch, the rows need no gathering:
:func:`uniform_rows_linear` computes ``x (W + s B A)ᵀ`` (or ``x Wᵀ + s (x Aᵀ) Bᵀ`` where that is
the cheaper order, :func:`pefc.fused_linear.folds`) with that adapter's ``A`` and ``B``. It does so
in inference only (nothing needs a gradient, no dropout draws) and eagerly; otherwise, and for a
mixed batch, the site runs as the graph has it. A row-wise module opts in with
:class:`UniformFoldable`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx as fx
from torch import nn

from pefc.cpu_gemm import PLAIN_TENSORS
from pefc.frozen_linear import frozen_linear
from pefc.fused_linear import site_products
from pefc.lowering import plain_linear
from pefc.selection import row_index, stack_rows


@runtime_checkable
class UniformFoldable(Protocol):
    """A row-wise module ``forward(x, y, index, *stacks)`` that adds a low-rank update to ``y``.

    ``uniform_update(*values)``: given one member's row values (what its stacks hold for it:
    tensors or numbers), ``(A, B, s)`` when that member's update of every row is ``s (x Aᵀ) Bᵀ``
    with ``A`` ``[r, in]`` and ``B`` ``[out, r]`` (nothing drawn at random), else ``None``."""

    def uniform_update(self, *values: Any) -> tuple[torch.Tensor, torch.Tensor, float] | None: ...


def uniform_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Module,
                        rows: tuple[Any, ...], stacks: tuple[tuple[Any, ...], ...]) -> torch.Tensor:
    """``module(x, x Wᵀ + b, index, *stacked)`` with ``index = row_index(*rows)`` and ``stacked[k] =
    stack_rows(*stacks[k])``; where every row runs one member, that member's update folded instead
    (and nothing gathered or stacked)."""
    member = _one_member(*rows) if _eager_inference(x, weight, bias, stacks) else None
    update = None if member is None else module.uniform_update(*(values[member] for values, _ in stacks))
    if update is None or not all(t.dtype == x.dtype for t in (weight, update[0], update[1])):
        return module(x, frozen_linear(x, weight, bias), row_index(*rows), *(stack_rows(*args) for args in stacks))
    down, up, scale = update  # one site of the fused node's products, in inference
    return site_products(x, None, [weight], [down], [up], [scale], [bias], for_backward=False)[0][0]


def _one_member(ids: torch.Tensor, enabled: torch.Tensor, slots: tuple[int, ...]) -> int | None:
    """The member every row runs (its position in ``slots``), or None (mixed rows, none, no rows)."""
    if ids.numel() == 0:
        return None
    slot = int(ids[0])
    if slot not in slots or not bool(enabled[slot]) or not bool((ids == slot).all()):
        return None
    return slots.index(slot)


def _eager_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stacks: tuple[tuple[Any, ...], ...]) -> bool:
    values = [v for members, _ in stacks for v in members if isinstance(v, torch.Tensor)]
    tensors = [x, weight, *([] if bias is None else [bias]), *values]
    return (x.dim() >= 2 and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.is_autocast_enabled(x.device.type) and all(type(t) in PLAIN_TENSORS for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def lower_uniform_rows(model: fx.GraphModule, graph: fx.Graph) -> int:
    """In ``graph`` (the copy the model's code is generated from), call :func:`uniform_rows_linear`
    for every :class:`UniformFoldable` row-wise module whose base output is a plain ``linear`` of
    its input on parameters read by ``get_attr`` and whose row index and stacks are its own
    (:mod:`pefc.selection`'s helpers), read by that module alone; return how many."""
    lowered = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) < 3:
            continue
        if not isinstance(model.get_submodule(node.target), UniformFoldable):
            continue
        x, base, index, *stacks = node.args
        if not (plain_linear(base) and base.args[0] is x and len(base.users) == 1 and _own_call(index, row_index)
                and all(_own_call(s, stack_rows) for s in stacks)):
            continue
        weight, bias = base.args[1], base.args[2] if len(base.args) > 2 else None
        with graph.inserting_before(node):
            module = graph.get_attr(node.target)
            lowered_node = graph.call_function(uniform_rows_linear, (x, weight, bias, module, index.args,
                                                                     tuple(s.args for s in stacks)))
        lowered_node.meta = dict(node.meta)
        node.replace_all_uses_with(lowered_node)
        for erased in (node, base, index, *stacks):
            graph.erase_node(erased)
        lowered += 1
    return lowered


def _own_call(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target and len(node.users) == 1
