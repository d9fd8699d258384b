"""Exact simplifications of a captured graph, so it runs as fast as the eager model.

torch.export records what eager PyTorch skips at run time:

- full slices (``x[:, :, None]`` becomes ``slice(x, 0, 0, INT64_MAX)``): eager returns ``x``
  itself; in the graph each one is a view op forward and a zero-fill plus copy backward;
- grouped-query attention: eager transformers pass the key/value heads to
  ``scaled_dot_product_attention(enable_gqa=True)`` when it may; a traced model repeats them
  (``unsqueeze -> expand -> reshape``) to the query heads first, which copies K and V forward
  and sums them back backward.

:func:`simplify` removes both; outputs and gradients are unchanged. Grouped-query
attention is fused only on CPU, whose fused SDPA kernel takes a mask and grouped heads; on
CUDA a mask plus ``enable_gqa`` falls back to the math kernel, so :func:`expand_grouped_kv`
restores the repetition (one ``repeat_interleave`` per key and value) when a model moves
off the CPU. :func:`flatten_nested_cats` (run on the KV-cached graphs of :mod:`pefc.kvcache`)
writes ``[slots; [past; new]]`` in one copy.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from pefc.graphutil import get_arg, set_arg, static_dim

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_KV_GROUPS = "pefc_kv_groups"  # node meta of a fused attention: query heads per key/value head
_FULL = 2**62  # slice ends at or above this are "to the end" (export writes INT64_MAX)


def simplify(graph_module: fx.GraphModule, device: torch.device) -> None:
    """Drop full slices; on CPU, feed key/value heads straight to grouped-query attention."""
    graph = graph_module.graph
    drop_full_slices(graph)
    if device.type == "cpu":
        fuse_grouped_kv(graph)
    graph.lint()
    graph_module.recompile()


def drop_full_slices(graph: fx.Graph) -> int:
    """Replace every ``slice(x, dim, 0, end >= size, 1)`` by ``x``; return how many."""
    dropped = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.slice.Tensor and _is_full_slice(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            dropped += 1
    return dropped


def _is_full_slice(node: fx.Node) -> bool:
    source, dim = node.args[0], get_arg(node, "dim", 0)
    start, end, step = get_arg(node, "start"), get_arg(node, "end"), get_arg(node, "step", 1)
    if start not in (None, 0) or step != 1:
        return False
    if end is None or (isinstance(end, int) and end >= _FULL):
        return True
    size = static_dim(source, dim)
    return isinstance(end, int) and size is not None and end >= size


def fuse_grouped_kv(graph: fx.Graph) -> int:
    """``sdpa(q, repeat_kv(k), repeat_kv(v))`` -> ``sdpa(q, k, v, enable_gqa=True)``; return how many."""
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not SDPA or get_arg(node, "enable_gqa"):
            continue
        key, value = _repeated_heads(get_arg(node, "key")), _repeated_heads(get_arg(node, "value"))
        if key is None or value is None or key[1] != value[1]:
            continue
        old = [get_arg(node, "key"), get_arg(node, "value")]
        set_arg(node, "key", key[0])
        set_arg(node, "value", value[0])
        set_arg(node, "enable_gqa", True)
        node.meta[_KV_GROUPS] = key[1]
        for chain in old:
            _erase_unused_chain(graph, chain)
        fused += 1
    return fused


def _repeated_heads(node: object) -> tuple[fx.Node, int] | None:
    """``(x, groups)`` if ``node`` is ``reshape(expand(unsqueeze(x, 2), [b, h, groups, s, d]), [b, h*groups, s, d])``."""
    if not isinstance(node, fx.Node) or node.target not in _RESHAPES:
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target is not aten.expand.default or len(expand.users) != 1:
        return None
    unsqueeze = expand.args[0]
    if not isinstance(unsqueeze, fx.Node) or unsqueeze.target is not aten.unsqueeze.default:
        return None
    if unsqueeze.args[1] != 2 or len(unsqueeze.users) != 1:
        return None
    source, sizes = unsqueeze.args[0], expand.args[1]
    groups = sizes[2] if len(sizes) == 5 else None
    heads, out_heads = static_dim(source, 1), static_dim(node, 1)
    if not isinstance(source, fx.Node) or not isinstance(groups, int) or heads is None or out_heads != heads * groups:
        return None
    return source, groups


def _erase_unused_chain(graph: fx.Graph, node: fx.Node) -> None:
    while isinstance(node, fx.Node) and not node.users and node.op == "call_function":
        source = node.args[0]
        graph.erase_node(node)
        node = source  # type: ignore[assignment]


def expand_grouped_kv(graph: fx.Graph) -> int:
    """Undo :func:`fuse_grouped_kv`: repeat the key/value heads before each fused attention."""
    expanded = 0
    for node in list(graph.nodes):
        groups = node.meta.pop(_KV_GROUPS, None) if node.op == "call_function" else None
        if groups is None:
            continue
        with graph.inserting_before(node):
            for name in ("key", "value"):
                repeated = graph.call_function(aten.repeat_interleave.self_int, (get_arg(node, name), groups, 1))
                set_arg(node, name, repeated)
        set_arg(node, "enable_gqa", False)
        expanded += 1
    return expanded


def flatten_nested_cats(graph: fx.Graph) -> int:
    """``cat([a, ..., cat([b, c], d)], d)`` -> ``cat([a, ..., b, c], d)``; return how many.

    The inner concatenation's other readers get the outer one's tail as a slice (a view), so
    its values are written once instead of twice. In a KV-cached attention with prefix slots
    that is ``cat([slots, cat([past, new])])``, whose inner ``[past; new]`` is the cache's next
    state: one copy of the cache per step instead of two. Exact (the same values)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    flattened = 0
    for node in list(graph.nodes):
        if not _is_cat(node) or len(node.args[0]) < 2:
            continue
        *heads, inner = node.args[0]
        if not _is_cat(inner) or _cat_dim(inner) != _cat_dim(node) or inner in heads:
            continue
        others = [u for u in inner.users if u is not node]
        if any(order.get(u, len(order)) < order[node] for u in others):
            continue
        dim = _cat_dim(node)
        node.update_arg(0, [*heads, *inner.args[0]])
        if others:
            with graph.inserting_before(node.next):
                start: Any = graph.call_function(aten.sym_size.int, (heads[0], dim))
                for head in heads[1:]:
                    start = graph.call_function(operator.add, (start, graph.call_function(aten.sym_size.int,
                                                                                          (head, dim))))
                tail = graph.call_function(aten.slice.Tensor, (node, dim, start, 2**63 - 1))
            inner.replace_all_uses_with(tail)
        graph.erase_node(inner)
        flattened += 1
    return flattened


def _is_cat(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.cat.default


def _cat_dim(node: fx.Node) -> int:
    return int(get_arg(node, "dim", 0))
