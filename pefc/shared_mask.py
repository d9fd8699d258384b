"""One additive attention mask for every layer, instead of one per layer.

A captured transformers model hands every layer's ``scaled_dot_product_attention`` the same
boolean mask (eager transformers often pass none: it may skip an all-ones mask, a graph with
dynamic sizes cannot). The kernel turns a boolean mask into its additive form, ``0`` where
``True`` and ``-inf`` where ``False``, at every call, and keeps that float copy for backward:
one ``[batch, 1, seq, seq]`` float tensor per layer. :func:`share_additive_masks` converts the
mask once, exactly as the kernel does, and feeds the result to every attention that read it:
the same numbers, one conversion and one saved copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from pefc.graphutil import get_arg, set_arg
from pefc.simplify import SDPA

if TYPE_CHECKING:
    from pefc.compiled import CompiledModel


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float mask ``scaled_dot_product_attention`` makes of a boolean one (``0`` / ``-inf``)."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask.logical_not(), float("-inf"))


def share_additive_masks(model: CompiledModel) -> int:
    """Convert each boolean mask read by several attentions (of one query dtype) once; return how many."""
    graph = model.graph
    readers: dict[tuple[fx.Node, torch.dtype], list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        mask, query = get_arg(node, "attn_mask"), get_arg(node, "query")
        if _dtype(mask) is torch.bool and (dtype := _dtype(query)) is not None and dtype.is_floating_point:
            readers.setdefault((mask, dtype), []).append(node)
    shared = {key: nodes for key, nodes in readers.items() if len(nodes) > 1}
    for (mask, dtype), nodes in shared.items():
        with graph.inserting_after(mask):
            additive = graph.call_function(additive_mask, (mask, dtype))
        for node in nodes:
            set_arg(node, "attn_mask", additive)
    if shared:
        graph.lint()
        model.recompile()
        model.pefc.base_node_count += len(shared)  # the base graph as it runs now (a merge keeps these nodes)
    return len(shared)


def _dtype(node: object) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None
