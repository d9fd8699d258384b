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

A second step, :func:`lower_base_products`, is a *lowering* (:mod:`pefc.lowering`): it changes
the code the model runs, not its graph. Where a :class:`BaseFusable` site's base output is a
plain ``linear`` read by that site alone, the base products and low-rank updates of the sites
of one input run as one autograd node (:mod:`pefc.fused_linear`): no copy of the base output,
the input's gradient accumulated in one buffer.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.fx as fx

from pefc.fused_linear import fused_linear_sites, stacked_down
from pefc.lowering import plain_linear

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


@runtime_checkable
class BaseFusable(SharedInputFusable, Protocol):
    """A :class:`SharedInputFusable` site module whose output is ``finish(y + s (h Bᵀ), *extra)``
    for the base output ``y``, ``h = drop(x) Aᵀ`` and its extra arguments (DoRA: weight and bias).

    - ``fusion_up``: the name of its ``B`` parameter, ``[out, r]``; ``fusion_scale``: ``s``.
    - ``fuses_base()``: whether the current mode computes that form (checked on every call).
    - ``finish(acc, *extra)``: the output from ``acc = y + s h Bᵀ`` (``y`` with the bias).
    """

    fusion_up: str
    fusion_scale: float

    def fuses_base(self) -> bool: ...

    def finish(self, acc: torch.Tensor, *extra: Any) -> torch.Tensor: ...


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


# -- lowering: base products and updates as one node (pefc.fused_linear) ---------------------

def lower_base_products(model: fx.GraphModule, graph: fx.Graph) -> int:
    """In ``graph`` (the copy the model's code is generated from), run each group of
    :class:`BaseFusable` sites of one input, with their plain ``linear`` base products, as one
    :func:`pefc.fused_linear.fused_linear_sites` call; return the number of groups lowered.

    A group is the sites sharing one :func:`stacked_down` product, or one site alone; it is
    lowered only if every member's base output is an ``aten.linear`` of the group's input on
    parameters read by ``get_attr`` and used by that member alone."""
    groups: dict[fx.Node, list[tuple[fx.Node, fx.Node]]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), BaseFusable):
            continue
        base = node.args[1] if len(node.args) > 1 else None
        if not plain_linear(base) or len(base.users) != 1:
            continue
        down = node.kwargs.get("down")
        key = down.args[0] if isinstance(down, fx.Node) and down.target is operator.getitem else node
        groups.setdefault(key, []).append((node, base))
    order = {n: i for i, n in enumerate(graph.nodes)}
    lowered = 0
    for key, members in groups.items():
        shared = key.op == "call_function" and key.target is stacked_down
        if shared and len(members) != len(key.users):
            continue  # a member of the shared product is not lowerable: keep the group as it is
        if not shared and ("down" in key.kwargs or key.args[0] is not members[0][1].args[0]):
            continue
        if _lower(model, graph, members, key if shared else None, order):
            lowered += 1
    model.pefc.extras.setdefault("fusion", {})["base_products"] = lowered
    return lowered


def _lower(model: fx.GraphModule, graph: fx.Graph, members: list[tuple[fx.Node, fx.Node]],
           shared: fx.Node | None, order: dict[fx.Node, int]) -> bool:
    members = sorted(members, key=lambda m: order[m[0]])
    x = members[0][1].args[0]
    branch = shared.args[0] if shared is not None else None
    first = members[0][0]
    extras = [tuple(site.args[2:]) for site, _ in members]
    if any(base.args[0] is not x for _, base in members) or any(
            shared is not None and site.args[0] is not branch for site, _ in members):
        return False
    inputs = [x, *([branch] if branch is not None else []), *(a for e in extras for a in e if isinstance(a, fx.Node))]
    if any(order[n] > order[first] for n in inputs):
        return False
    like = members[0][1]  # the first base product: its module stack places the node in its layer
    with graph.inserting_before(first):
        entries = tuple((_mark(graph.get_attr(site.target), like), base.args[1],
                         base.args[2] if len(base.args) > 2 else None, extra)
                        for (site, base), extra in zip(members, extras, strict=True))
        fused = _mark(graph.call_function(fused_linear_sites, (x, branch, entries)), like)
        outs = [_mark(graph.call_function(operator.getitem, (fused, i)), like) for i in range(len(members))]
    for (site, base), out in zip(members, outs, strict=True):
        site.replace_all_uses_with(out)
        graph.erase_node(site)
        graph.erase_node(base)
    if shared is not None:
        for user in list(shared.users):
            graph.erase_node(user)
        weights = [w for w in shared.args[1:] if isinstance(w, fx.Node)]
        graph.erase_node(shared)
        for weight in weights:
            if not weight.users:
                graph.erase_node(weight)
    return True
