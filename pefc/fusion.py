"""Horizontal fusion: the sites of one adapter that read the same tensor share one down-projection.

q/k/v read the same normalised hidden state, gate/up the same one too. A low-rank method
placed at each of them computes ``drop(x) @ A_iᵀ`` once per site; fused, the adapter drops
``x`` once and multiplies it by the stacked ``[A_1; A_2; ...]`` once, and each site finishes
its own branch from its slice of the product. Backward, the input's gradient then takes one
product with the stacked ``A`` instead of one per site plus the sums, and only one dropped copy
of ``x`` (and one mask) is kept for backward instead of one per site.

The outputs are the unfused ones up to float rounding; with dropout the sites of a group
share one mask (``dropout_masks: shared``, LoRA's and DoRA's default; ``per_site`` keeps a
mask per site, as HF PEFT, and leaves those sites unfused).

Any method benefits whose site module (placed with :meth:`pefc.RewriteContext.wrap_output`)
declares the structure, :class:`SharedInputFusable`: the pass runs from the public
``pefc_after_rewrite`` hook (the built-in ``fusion`` plugin), over every adapter alike.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from pefc.compiled import CompiledModel
    from pefc.rewrite import Insertion

#: node meta set on every node the pass inserts (a merge drops them once they are unused)
FUSED = "pefc_inserted"


@runtime_checkable
class SharedInputFusable(Protocol):
    """A site module whose output is ``finish(x, y, ..., down=drop(x) @ Aᵀ)``.

    - ``fusion_key()``: sites of one adapter reading the same input fuse when their keys are
      equal; ``None`` keeps the site apart (e.g. a mask per site was asked for).
    - ``fusion_weight``: the name of its ``A`` parameter, ``[r, in]``.
    - ``fusion_dropout``: the name of the submodule applied to ``x`` once for the group (the
      first site's), or ``None``.
    - ``forward(x, y, ..., down=h)``: given ``down``, ``x`` is the group's branch input (after
      dropout) and ``h`` its product with ``Aᵀ`` (``x`` cast to ``A``'s dtype); the site must
      then not drop ``x`` again.
    """

    fusion_weight: str
    fusion_dropout: str | None

    def fusion_key(self) -> Hashable | None: ...


def stacked_down(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x @ Aᵢᵀ`` for every ``Aᵢ`` as one product with ``[A_1; A_2; ...]``, split back per site.

    Exported graphs keep one product per site (an ONNX file with rank-0 LoRA inputs must not
    depend on the ranks traced)."""
    x = x.to(weights[0].dtype)
    if torch.compiler.is_exporting():
        return tuple(x @ w.t() for w in weights)
    return (x @ torch.cat(weights).t()).split([w.shape[0] for w in weights], dim=-1)


def fuse_shared_inputs(model: CompiledModel) -> int:
    """Fuse every group of same-adapter, same-input :class:`SharedInputFusable` sites of
    ``model`` in place; return the number of groups fused."""
    nodes = {n.name: n for n in model.graph.nodes}
    groups: dict[tuple[Hashable, ...], list[tuple[fx.Node, Insertion]]] = {}
    for ins in model.pefc.insertions:
        node = nodes.get(ins.node)
        module = model.get_submodule(ins.module)
        if ins.placement != "output" or node is None or "down" in node.kwargs:
            continue
        if not isinstance(module, SharedInputFusable) or (key := module.fusion_key()) is None:
            continue
        groups.setdefault((ins.adapter, node.args[0], key), []).append((node, ins))
    fused = [members for members in groups.values() if len(members) > 1]
    order = {n: i for i, n in enumerate(model.graph.nodes)}
    for members in fused:
        _fuse(model, sorted(members, key=lambda m: order[m[0]]))
    if fused:
        model.graph.lint()
        model.recompile()
    return len(fused)


def _fuse(model: CompiledModel, members: list[tuple[fx.Node, Insertion]]) -> None:
    """One dropout and one stacked down-projection before the group's first site."""
    graph = model.graph
    first, first_ins = members[0]
    x = first.args[0]
    head = model.get_submodule(first_ins.module)
    with graph.inserting_before(first):
        branch = x
        if head.fusion_dropout is not None:
            branch = _mark(graph.call_module(f"{first_ins.module}.{head.fusion_dropout}", (x,)), first)
        weights = [_mark(graph.get_attr(f"{ins.module}.{model.get_submodule(ins.module).fusion_weight}"), first)
                   for _, ins in members]
        downs = _mark(graph.call_function(stacked_down, (branch, *weights)), first)
        for i, (node, _) in enumerate(members):
            down = _mark(graph.call_function(operator.getitem, (downs, i)), first)
            node.update_arg(0, branch)
            node.update_kwarg("down", down)


def _mark(node: fx.Node, like: fx.Node) -> fx.Node:
    node.meta[FUSED] = True
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    return node
