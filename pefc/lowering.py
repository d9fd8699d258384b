"""Lowerings: passes over the code a CompiledModel runs, not over its graph.

``CompiledModel.graph`` is the model as the compiler and its plugins see it: one node per base
op and per adapter module, which merging, export, planning and per-layer partitioning read.
A lowering rewrites a *copy* of that graph each time the model's code is generated
(``recompile``), so it may replace nodes by faster equivalents (several sites' products as one
autograd node, :func:`pefc.fusion.lower_base_products`) without anything else seeing it.

A lowering is ``fn(model, graph) -> object``: it edits ``graph`` in place (any value it returns
is ignored). Register one with :func:`add_lowering` (plugins do so from ``pefc_after_rewrite``);
it stays with the model through ``clone``, ``merge`` and ``to``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

Lowering = Callable[[fx.GraphModule, fx.Graph], Any]


def add_lowering(model: fx.GraphModule, lowering: Lowering) -> None:
    """Run ``lowering`` whenever ``model`` (a CompiledModel) generates its code; regenerates it now."""
    passes = model.pefc.lowerings
    if lowering not in passes:
        passes.append(lowering)
    model.recompile()


def plain_linear(node: Any) -> bool:
    """Whether ``node`` is an ``aten.linear`` on the model's own weight (and bias), read by ``get_attr``:
    the base product the lowerings replace."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.linear.default
            and not node.kwargs and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args[1:]))


def lowered_graph(model: fx.GraphModule, graph: fx.Graph) -> fx.Graph:
    """``graph`` itself if ``model`` has no lowerings, else a lowered copy of it."""
    state = getattr(model, "pefc", None)
    passes = getattr(state, "lowerings", None)
    if not passes:
        return graph
    copy = fx.Graph(owning_module=model)
    copy.set_codegen(graph._codegen)
    output = copy.graph_copy(graph, {})
    copy.output(output)
    for lowering in passes:
        lowering(model, copy)
    copy.lint()
    return copy
