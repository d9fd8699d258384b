"""Relative position biases over the key axis, at keys joined in front of an attention's keys.

A learned relative position bias (T5) is computed in the graph from two ``arange`` position
tensors, the keys' ``[1, S]`` and the queries' ``[S, 1]``: ``bias = f(key_pos - query_pos)``
(bucketing, an embedding lookup, a permute). When prefix tuning puts ``n`` keys in front, HF
PEFT hands them to transformers as a cache of ``n`` past tokens: the prefix keys sit at positions
``0 .. n-1`` and the queries at ``n .. n+S-1``, so a query ``i`` sees prefix key ``m`` with the
bias ``f(m - (n + i))`` (the real keys keep ``f(j - i)``). :func:`slot_bias` finds such a bias
inside a mask and inserts the graph that computes it at the prefix keys: a copy of the bias's
computation with the key positions ``arange(n)`` and the query positions shifted by ``n``.

Only a bias computed from positions alone (no graph input's data, no size spelled out after
the positions) that reaches the mask through additions, ``where`` branches, casts and expands
is read; any other mask gives None and its new keys get the mask's plain fill (0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from pefc.graphutil import meta_shape

aten = torch.ops.aten
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_PASS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
         aten.alias.default, aten.type_as.default, aten.expand.default}
# ops after which a tensor still holds positions (shape moves, casts, + constant)
_POSITION_OPS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                 aten.expand.default, aten.clone.default, aten.contiguous.default, aten.to.dtype,
                 aten._to_copy.default, aten.add.Tensor, aten.add.Scalar, aten.sub.Scalar}


def leading_positions(like: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Positions ``0 .. n-1`` (``n = slots.shape[-2]``, the joined keys), as ``like``'s dtype and device."""
    return torch.arange(slots.shape[-2], dtype=like.dtype, device=like.device)


def shifted_positions(positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``positions + n``: the queries after ``n = slots.shape[-2]`` joined keys."""
    return positions + slots.shape[-2]


def slot_bias(graph: fx.Graph, mask: Any, slots: fx.Node, cache: dict[Any, fx.Node]) -> fx.Node | None:
    """A node computing ``mask``'s relative position bias at the keys ``slots`` joins in front, or None.

    The copy is inserted at the graph's insertion point (after ``slots``) and cached by bias node
    in ``cache``, so attentions sharing one bias (T5's layers) share its copy.
    """
    bias = _find_bias(mask)
    if bias is None:
        return None
    if ("relbias", bias) in cache:
        return cache[("relbias", bias)]
    roots = _position_roots(bias)
    if roots is None:
        return None
    key_root, query_root = roots
    nodes = _between(bias, {key_root, query_root})
    if any(_takes_size(n) for n in nodes):
        return None  # a size spelled out after the positions would not fit the prefix's length
    mapping: dict[fx.Node, fx.Node] = {
        key_root: graph.call_function(leading_positions, (key_root, slots)),
        query_root: graph.call_function(shifted_positions, (query_root, slots)),
    }
    for node in nodes:
        copy = graph.node_copy(node, lambda a: mapping.get(a, a))
        for key in ("val", "tensor_meta"):
            copy.meta.pop(key, None)
        mapping[node] = copy
    cache[("relbias", bias)] = mapping[bias]
    return mapping[bias]


def _find_bias(mask: Any) -> fx.Node | None:
    """Back from ``mask`` through additions, ``where`` branches, casts and expands to a position-only bias."""
    stack = [mask]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in _PASS:
            stack.append(node.args[0])
        elif node.target is aten.add.Tensor:
            stack.extend(node.args[:2])
        elif node.target in (aten.where.self, aten.where.ScalarOther):
            stack.append(node.args[1])
        elif node.target is aten.where.ScalarSelf:
            stack.append(node.args[2])
        elif _is_position_bias(node):
            return node
    return None


def _is_position_bias(node: fx.Node) -> bool:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
        return False
    return not any(n.op == "placeholder" for n in _data_ancestors(node)) and _position_roots(node) is not None


def _position_roots(bias: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(key positions, query positions)``: the two ``arange`` s whose difference the bias is computed from."""
    ancestors = _data_ancestors(bias)
    found: tuple[fx.Node, fx.Node] | None = None
    for node in ancestors:
        if node.target is not aten.sub.Tensor or len(node.args) < 2:
            continue
        sides = [(_root(arg), meta_shape(arg)) for arg in node.args[:2]]
        if any(root is None or not shape for root, shape in sides):
            continue
        keys = [root for root, shape in sides if _is_key_layout(shape)]
        queries = [root for root, shape in sides if _is_query_layout(shape)]
        if len(keys) != 1 or len(queries) != 1 or (found is not None and found != (keys[0], queries[0])):
            return None
        found = (keys[0], queries[0])
    return found


def _root(node: Any) -> fx.Node | None:
    """The ``arange`` a positions tensor comes from through shape moves and constant shifts, if any."""
    for _ in range(16):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target in _ARANGES:
            return node
        if node.target not in _POSITION_OPS:
            return None
        others = [a for a in node.args[1:] if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
        if others:
            return None
        node = node.args[0]
    return None


def _is_key_layout(shape: tuple[Any, ...]) -> bool:
    """``[..., 1, L]``: positions along the last (key) axis."""
    return not _is_one(shape[-1]) and all(_is_one(s) for s in shape[:-1])


def _is_query_layout(shape: tuple[Any, ...]) -> bool:
    """``[..., L, 1]``: positions along the query axis."""
    return len(shape) >= 2 and _is_one(shape[-1]) and not _is_one(shape[-2])


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


def _data_ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and what its data is computed from (not behind size values)."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if not isinstance(current.meta.get("val"), (torch.SymInt, int)):
            stack.extend(current.all_input_nodes)
    return seen


def _between(bias: fx.Node, roots: set[fx.Node]) -> list[fx.Node]:
    """Nodes from ``roots`` (excluded) to ``bias`` (included), in graph order."""
    ancestors = _data_ancestors(bias)
    depends: set[fx.Node] = set(roots)
    order: list[fx.Node] = []
    for node in bias.graph.nodes:
        if node in ancestors and node not in roots and any(a in depends for a in node.all_input_nodes):
            depends.add(node)
            order.append(node)
    return order


def _takes_size(node: fx.Node) -> bool:
    return any(isinstance(a.meta.get("val"), torch.SymInt) for a in node.all_input_nodes)
