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

from pefc import cpu_gemm
from pefc.frozen_linear import frozen_linear
from pefc.fused_linear import folded_weight, folds

_LINEAR = torch.ops.aten.linear.default
_PLAIN = (torch.Tensor, nn.Parameter)


@runtime_checkable
class UniformFoldable(Protocol):
    """A row-wise module ``forward(x, y, index, *stacks)`` that adds a low-rank update to ``y``.

    ``uniform_update(index, *stacks)``: ``(A, B, s)`` when every row's update is ``s (x Aᵀ) Bᵀ``
    with the same ``A`` ``[r, in]`` and ``B`` ``[out, r]`` (one member for the whole batch, nothing
    drawn at random), else ``None``."""

    def uniform_update(self, index: torch.Tensor, *stacks: Any) -> tuple[torch.Tensor, torch.Tensor, float] | None: ...


def uniform_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Module,
                        index: torch.Tensor, *stacks: Any) -> torch.Tensor:
    """``module(x, x Wᵀ + b, index, *stacks)``, with the rows' shared update folded where it is one."""
    update = module.uniform_update(index, *stacks) if _eager_inference(x, weight, bias, stacks) else None
    if update is None:
        return module(x, frozen_linear(x, weight, bias), index, *stacks)
    down, up, scale = update
    if not all(t.dtype == x.dtype for t in (weight, down, up)):
        return module(x, frozen_linear(x, weight, bias), index, *stacks)
    x2 = x.reshape(-1, x.shape[-1])
    if folds(x2.shape[0], x2.shape[1], x.dtype):
        out = cpu_gemm.linear(x2, folded_weight(weight, down, up, scale), bias)
    else:
        out = cpu_gemm.linear(x2, weight, bias).addmm_(cpu_gemm.linear(x2, down), up.t(), alpha=scale)
    return out.view(*x.shape[:-1], weight.shape[0])


def _eager_inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stacks: tuple[Any, ...]) -> bool:
    tensors = [x, weight, *([] if bias is None else [bias]), *(s for s in stacks if isinstance(s, torch.Tensor))]
    return (x.dim() >= 2 and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.is_autocast_enabled(x.device.type) and all(type(t) in _PLAIN for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def lower_uniform_rows(model: fx.GraphModule, graph: fx.Graph) -> int:
    """In ``graph`` (the copy the model's code is generated from), call :func:`uniform_rows_linear`
    for every :class:`UniformFoldable` row-wise module whose base output is a plain ``linear`` of
    its input on parameters read by ``get_attr``, read by that module alone; return how many."""
    lowered = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) < 3:
            continue
        if not isinstance(model.get_submodule(node.target), UniformFoldable):
            continue
        x, base, index, *stacks = node.args
        if not (isinstance(base, fx.Node) and base.target is _LINEAR and not base.kwargs and len(base.users) == 1
                and base.args[0] is x and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in base.args[1:])):
            continue
        weight, bias = base.args[1], base.args[2] if len(base.args) > 2 else None
        with graph.inserting_before(node):
            module = graph.get_attr(node.target)
            lowered_node = graph.call_function(uniform_rows_linear, (x, weight, bias, module, index, *stacks))
        lowered_node.meta = dict(node.meta)
        node.replace_all_uses_with(lowered_node)
        graph.erase_node(node)
        graph.erase_node(base)
        lowered += 1
    return lowered
