"""Sequence-level graph edits: extra attention slots, position offsets, virtual tokens.

Everything here works from the dataflow and the symbolic shapes that ``torch.export``
records, never from module names:

- :func:`prepend_kv` puts extra key/value slots in front of an attention's keys and values
  and widens its mask so that every query sees them (prefix tuning);
- :func:`position_edges` finds where sequence positions (``arange`` over the sequence, or a
  buffer holding ``arange``) enter the model's computation: the RoPE angles, a position
  embedding lookup; :func:`offset_positions` shifts them;
- :func:`prepend_sequence` makes a module's output ``[n virtual; real]`` the sequence the
  rest of the graph sees: the sequence length downstream becomes ``S + n``, inputs that carry
  the sequence (attention mask, token types, labels) are widened, and outputs are sliced back
  to the real tokens (prompt tuning).

The runtime helpers (:func:`extend_attention_mask`, :func:`prepend_fill`) are plain
functions called from ``call_function`` nodes, so the graph stays exportable.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
import torch.fx as fx

from pefc.attention import Attention, find_attentions, heads_of
from pefc.errors import PluginError
from pefc.graphutil import attr_value, get_arg, meta_shape, module_path, set_arg
from pefc.relbias import slot_bias

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SLICE_END = 9223372036854775807
POSITIONS = "pefc_positions"  # meta flag of a graph input holding token positions (e.g. position_ids)
_LOSSES = {aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default,
           aten.nll_loss_forward.default, aten.nll_loss2d.default, aten.nll_loss2d_forward.default}
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
# ops after which a tensor still holds positions (shape moves, copies, dtype casts, + constant)
_POSITION_OPS = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.view.default,
                 aten.reshape.default, aten._unsafe_view.default, aten.expand.default, aten.slice.Tensor,
                 aten.select.int, aten.clone.default, aten.contiguous.default, aten.alias.default,
                 aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
                 aten.repeat.default, aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar}


# --- runtime helpers (called from the graph) ------------------------------------------------

def extend_attention_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                          slots: torch.Tensor, is_causal: bool,
                          visible: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """The SDPA mask for keys ``[slots; key]``: every query sees every slot.

    ``mask`` is bool (True = attend) or additive float, broadcastable to ``[..., L, S]``;
    ``None`` with ``is_causal`` becomes SDPA's top-left causal mask made explicit.
    ``visible`` (bool ``[batch]``, per-row selection) shows the slots to those rows only.
    ``bias`` (``[..., L, n]``, see :mod:`pefc.relbias`) is the float mask's value at the slots, else 0
    (without per-row selection).
    """
    if bias is not None and visible is None and mask is not None and mask.is_floating_point():
        return widen_key_axis(mask, slots, 0.0, bias)
    n, length = slots.shape[-2], key.shape[-2]
    if mask is None:
        if not is_causal and visible is None:
            return None
        mask = torch.ones(query.shape[-2], length, dtype=torch.bool, device=query.device)
        mask = mask.tril() if is_causal else mask
    mask = mask.expand(*mask.shape[:-1], length)
    fill = True if mask.dtype == torch.bool else 0
    if visible is not None:
        return torch.cat(_row_visible_pad(mask, visible, n), dim=-1)
    pad = torch.full((*mask.shape[:-1], n), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def _row_visible_pad(mask: torch.Tensor, visible: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``[pad, mask]`` with a batch dim: the ``n`` slots attendable in the ``visible`` rows only."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    rows = visible.shape[0]
    mask = mask.expand(rows, *mask.shape[1:])
    shown = visible.view(rows, 1, 1, 1).expand(*mask.shape[:-1], n)
    if mask.dtype == torch.bool:
        return [shown, mask]
    blocked = torch.full_like(shown, torch.finfo(mask.dtype).min, dtype=mask.dtype)
    return [torch.where(shown, torch.zeros_like(blocked), blocked), mask]


def prepend_positions(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Positions ``x`` with ``0 .. n-1`` prepended along ``dim`` and ``x`` itself shifted by ``n``."""
    shape = [1] * x.dim()
    shape[dim] = n
    lead = torch.arange(n, dtype=x.dtype, device=x.device).view(shape)
    sizes = list(x.shape)
    sizes[dim] = n
    return torch.cat([lead.expand(sizes), x + n], dim=dim)


def prepend_fill(x: torch.Tensor, dim: int, n: int, value: float) -> torch.Tensor:
    """``x`` with ``n`` entries equal to ``value`` prepended along ``dim``."""
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_full(shape, value), x], dim=dim)


def widen_key_axis(x: torch.Tensor, slots: torch.Tensor, fill: float | bool,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """A mask or bias over the keys (last dim) with ``fill`` for the ``slots.shape[-2]`` new keys in front,
    or ``bias`` (``[..., L, n]``: a relative position bias at the new keys, :mod:`pefc.relbias`)."""
    if bias is None:
        return prepend_fill(x, -1, slots.shape[-2], fill)
    return torch.cat([bias.to(x.dtype).expand(*x.shape[:-1], bias.shape[-1]), x], dim=-1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B*H, S, D]`` -> ``[B, H, S, D]``."""
    return x.view(-1, heads, x.shape[-2], x.shape[-1])


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B*H, S, D]``."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


# --- graph queries ---------------------------------------------------------------------------

def ancestors(start: Iterable[Any], *, through_sdpa: bool = True, through_sizes: bool = True,
              stops: set[fx.Node] | None = None) -> set[fx.Node]:
    """Every node ``start`` depends on (itself included).

    ``through_sdpa=False`` does not look behind attention nodes (SDPA, and ``stops``: the
    outputs of attentions written out); ``through_sizes=False`` does not look behind size
    values (a ``sym_size`` depends on a shape, not on data).
    """
    seen: set[fx.Node] = set()
    stops = stops or set()
    stack = [n for n in start if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        behind = through_sdpa or (node.target is not SDPA and node not in stops)
        if behind and (through_sizes or not _is_symbolic(node)):
            stack.extend(node.all_input_nodes)
    return seen


def attention_operand_ancestors(graph: fx.Graph, attentions: list[Attention] | None = None) -> set[fx.Node]:
    """Nodes feeding some attention's query, key or value without passing through an attention."""
    attentions = find_attentions(graph)[0] if attentions is None else attentions
    operands = [n for a in attentions for n in (a.query, a.key, a.value)]
    outputs = {a.output for a in attentions}
    return {n for n in ancestors(operands, through_sdpa=False, through_sizes=False, stops=outputs)
            if n not in outputs}


def mask_ancestors(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose data feeds some attention's mask or bias over the keys (not through sizes)."""
    masks = [m.node for a in find_attentions(graph)[0] for m in a.masks]
    masks += [get_arg(n, "attn_mask") for n in graph.nodes if n.target is SDPA]
    return ancestors(masks, through_sizes=False)


def first_computation(graph: fx.Graph) -> fx.Node:
    """The first node after every graph input (where input-only computations can go)."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1:]
    return last[0].next if last else next(iter(graph.nodes))


def _is_arange_buffer(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    value = attr_value(graph_module, str(node.target))
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dim() == 0 \
            or value.device.type == "meta":
        return False
    return bool(torch.equal(value, torch.arange(value.shape[-1], device=value.device).expand_as(value)))


def _keeps_positions(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` maps positions ``source`` to positions (a shape op or ``+ constant``)."""
    if node.op != "call_function" or node.target not in _POSITION_OPS or not node.args or node.args[0] is not source:
        return False
    if node.target in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
        other = node.args[1] if len(node.args) > 1 else None
        return not (isinstance(other, fx.Node) and isinstance(other.meta.get("val"), torch.Tensor))
    return True


def position_edges(graph_module: fx.GraphModule,
                   attentions: Collection[fx.Node] | None = None) -> list[tuple[fx.Node, fx.Node]]:
    """``(positions, consumer)`` edges where sequence positions enter the computation.

    Positions start at ``arange`` nodes, integer buffers holding ``arange`` (BERT's
    ``position_ids``) or graph inputs flagged :data:`POSITIONS` and flow through shape ops and ``+ constant``; an edge is reported where
    a positions tensor sized by an attention's query length leaves that set for a node feeding
    an attention's query/key/value without crossing an attention (RoPE angles, position
    embeddings). Causal-mask index arithmetic (which only reaches ``attn_mask``) and aranges
    of other lengths (e.g. RoPE frequencies computed in the graph) are not reported.
    ``attentions`` (default: all) limits this to the positions of those attentions (an
    encoder-decoder's decoder, not its encoder).
    """
    graph = graph_module.graph
    roots = [n for n in graph.nodes if n.target in _ARANGES or _is_arange_buffer(graph_module, n)
             or n.meta.get(POSITIONS)]
    positions: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in positions:
            positions.add(node)
            stack.extend(u for u in node.users if _keeps_positions(u, node))
    found = [a for a in find_attentions(graph)[0] if attentions is None or a.output in attentions]
    operands = attention_operand_ancestors(graph, found)
    lengths = {_size_key(a.query, -2) for a in found} - {None}
    return [(node, user) for node in graph.nodes if node in positions and _has_size(node, lengths)
            for user in node.users if user not in positions and user in operands]


def _size_key(node: Any, dim: int) -> Any:
    """Dim ``dim`` of ``node``'s shape as a comparable key (sympy expression or int), or None."""
    shape = meta_shape(node)
    if shape is None or not -len(shape) <= dim < len(shape):
        return None
    size = shape[dim]
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _has_size(node: fx.Node, sizes: set[Any]) -> bool:
    return any(_size_key(node, d) in sizes for d in range(len(meta_shape(node) or ())))


def seq_symbol(node: fx.Node, dim: int) -> Any:
    """The symbolic size (a sympy expression) of ``node``'s dim ``dim``, or None if static or unknown."""
    shape = meta_shape(node)
    if shape is None or not -len(shape) <= dim < len(shape):
        return None
    size = shape[dim]
    return size.node.expr if isinstance(size, torch.SymInt) else None


def _sym_expr(node: fx.Node) -> Any:
    value = node.meta.get("val")
    return value.node.expr if isinstance(value, torch.SymInt) else None


def _is_symbolic(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool, torch.SymFloat, int, bool, float))


def _reads_data(node: fx.Node) -> bool:
    """Whether ``node`` uses its inputs' data (not only their sizes, dtypes or export guards)."""
    if "val" in node.meta:
        value = node.meta["val"]
        return isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple))
                                                   and any(isinstance(v, torch.Tensor) for v in value))
    return not (node.op == "call_module" and not node.users)


# --- graph edits -------------------------------------------------------------------------------

def offset_positions(graph_module: fx.GraphModule, offset: int,
                     attentions: Collection[fx.Node] | None = None) -> int:
    """Add ``offset`` to the positions at every :func:`position_edges` edge (of ``attentions``,
    default all); return how many."""
    graph = graph_module.graph
    shifted: dict[fx.Node, fx.Node] = {}
    edges = position_edges(graph_module, attentions)
    for node, user in edges:
        if node not in shifted:
            with graph.inserting_after(node):
                shifted[node] = graph.call_function(aten.add.Tensor, (node, offset))
        user.replace_input_with(node, shifted[node])
    return len(edges)


def prepend_kv(graph: fx.Graph, attention: Attention, make_slots: Callable[[fx.Node, fx.Node], fx.Node],
               masks: dict[Any, fx.Node] | None = None, *, visible: fx.Node | None = None) -> fx.Node:
    """Feed ``attention`` keys ``[k_slots; key]`` and values ``[v_slots; value]``; return the slots node.

    ``make_slots(key, value)`` inserts (at the graph's insertion point) a node producing
    ``(k_slots, v_slots)`` shaped like key/value ``[..., H, S, D]`` with the slot count in
    dim -2 (SDPA: a key concatenated along the sequence, a KV cache's ``[past; new]``, is
    passed as its newest part, which has that shape but in dim -2). Every mask or bias over the keys is widened so that every query sees every slot
    (SDPA: by :func:`extend_attention_mask`, a ``None`` mask with ``is_causal`` becomes an
    explicit one; written out: :func:`widen_key_axis` with each mask's fill). ``masks``
    caches widened masks by original mask node so attentions sharing a mask share its
    widened form. ``visible`` (a bool ``[batch]`` node; SDPA only) shows the slots to those rows only.
    """
    cache = masks if masks is not None else {}
    if attention.form == "sdpa":
        slots = _prepend_kv_sdpa(graph, attention.output, make_slots, cache, visible)
        attention.key, attention.value = get_arg(attention.output, "key"), get_arg(attention.output, "value")
        return slots
    return _prepend_kv_eager(graph, attention, make_slots, cache)


def _prepend_kv_sdpa(graph: fx.Graph, attention: fx.Node, make_slots: Callable[[fx.Node, fx.Node], fx.Node],
                     masks: dict[Any, fx.Node], visible: fx.Node | None = None) -> fx.Node:
    query, key, value = (get_arg(attention, name) for name in ("query", "key", "value"))
    mask, is_causal = get_arg(attention, "attn_mask"), get_arg(attention, "is_causal")
    if isinstance(is_causal, fx.Node):
        raise PluginError(f"{attention.name}: is_causal is computed in the graph; cannot widen its mask")
    with graph.inserting_before(attention):
        slots = make_slots(_newest(key), _newest(value))
        k_slots = graph.call_function(operator.getitem, (slots, 0))
        v_slots = graph.call_function(operator.getitem, (slots, 1))
        new_key = graph.call_function(aten.cat.default, ([k_slots, key], -2))
        new_value = graph.call_function(aten.cat.default, ([v_slots, value], -2))
        new_mask = None
        if mask is not None or is_causal or visible is not None:
            cache = masks if mask is not None else {}
            new_mask = cache.get(mask)
            if new_mask is None:
                bias = slot_bias(graph, mask, k_slots, masks)
                args = (mask, query, key, k_slots, bool(is_causal), visible, bias)
                new_mask = graph.call_function(extend_attention_mask, args)
                cache[mask] = new_mask
    set_arg(attention, "key", new_key)
    set_arg(attention, "value", new_value)
    if new_mask is not None:
        set_arg(attention, "attn_mask", new_mask)
        if is_causal or visible is not None:
            set_arg(attention, "is_causal", False)
    return slots


def _newest(node: Any) -> Any:
    """The last part of a key or value concatenated along the sequence (a KV cache's ``[past; new]``), else itself.

    It has the key's shape but in dim -2, which is all the slot module may read; the cache then
    has no reader before ``[slots; past; new]``, which :func:`pefc.simplify.flatten_nested_cats`
    writes in one copy."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not aten.cat.default:
        return node
    parts, dim = node.args[0], get_arg(node, "dim", 0)
    rank = len(node.meta["val"].shape) if isinstance(node.meta.get("val"), torch.Tensor) else None
    return parts[-1] if dim == -2 or (rank is not None and dim == rank - 2) else node


def _prepend_kv_eager(graph: fx.Graph, att: Attention, make_slots: Callable[[fx.Node, fx.Node], fx.Node],
                      masks: dict[Any, fx.Node]) -> fx.Node:
    """Join slots where an attention written out reads its keys and values, and widen its masks and biases."""
    where = att.output.name
    stuck = [r for r in att.pinned if _size_key(r.args[0], -1) is None or _size_key(r.args[0], -1) != _size_key(r, -1)]
    if stuck:
        raise PluginError(f"attention {where} ({module_path(att.output) or 'top level'}): {_described(stuck[0])} "
                          "spells out the key length and moves the key axis, so extra keys cannot join this attention")
    if att.value_axis != -2:
        raise PluginError(f"attention {where}: the values carry the key positions in dim {att.value_axis}, not -2")
    for node in (att.key, att.value):
        if len(meta_shape(node) or ()) == 3 and not heads_of(node):
            raise PluginError(f"attention {where}: {node.name} is [batch*heads, S, D] and the graph does not tell "
                              "the heads")
    assert att.scores is not None
    order = {n: i for i, n in enumerate(graph.nodes)}
    if order[att.value] > order[att.key_user]:
        raise PluginError(f"attention {where}: its values are computed after its scores; cannot join both there")
    for reshape in att.pinned:
        _unpin(graph, reshape)
    with graph.inserting_before(att.key_user):
        key = _canonical(graph, att.key, att.key_axis)
        value = _canonical(graph, att.value, -2)
        slots = make_slots(key, value)
        k_slots = graph.call_function(operator.getitem, (slots, 0))
        v_slots = graph.call_function(operator.getitem, (slots, 1))
        new_key = graph.call_function(aten.cat.default, ([_restored(graph, k_slots, att.key, att.key_axis), att.key],
                                                         att.key_axis))
        new_value = graph.call_function(aten.cat.default, ([_restored(graph, v_slots, att.value, -2), att.value], -2))
    att.key_user.replace_input_with(att.key, new_key)
    att.value_user.replace_input_with(att.value, new_value)
    for edge in att.masks:
        old = edge.node
        wide = masks.get((old, edge.fill))
        if wide is None:
            with graph.inserting_before(edge.consumer):
                bias = slot_bias(graph, old, k_slots, masks) if _is_additive(edge.fill) else None
                wide = graph.call_function(widen_key_axis, (old, k_slots, edge.fill, bias))
            masks[(old, edge.fill)] = wide
        edge.consumer.update_arg(edge.index, wide)
    att.key, att.value = new_key, new_value
    return slots


def _unpin(graph: fx.Graph, reshape: fx.Node) -> None:
    """Make a reshape of scores or probabilities that spells out the key length (DeBERTa's
    ``view(-1, H, S, S)``) read it from its input, which then may carry extra keys."""
    source = reshape.args[0]
    with graph.inserting_before(reshape):
        length = graph.call_function(aten.sym_size.int, (source, len(meta_shape(source) or ()) - 1))
    sizes = list(reshape.args[1])  # type: ignore[arg-type]
    sizes[-1] = length
    reshape.update_arg(1, sizes)


def _described(node: fx.Node) -> str:
    """``reshape 'view_7' (modeling.py:12: `code`)``: a node and the model line it comes from, where known."""
    lines = [line.strip() for line in str(node.meta.get("stack_trace") or "").splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines[:-1]) if line.startswith("File ")]
    if not frames:
        return f"reshape {node.name!r}"
    match = re.match(r'File "(?:.*/)?([^/"]+)", line (\d+)', lines[frames[-1]])
    where = f"{match.group(1)}:{match.group(2)}" if match else lines[frames[-1]]
    return f"reshape {node.name!r} ({where}: `{lines[frames[-1] + 1]}`)"


def _is_additive(fill: float | bool) -> bool:
    return not isinstance(fill, bool) and fill == 0.0


def _canonical(graph: fx.Graph, node: fx.Node, axis: int) -> fx.Node:
    """``node`` as ``[..., H, S, D]`` (what slot modules see), from ``[..., D, S]`` or ``[B*H, S, D]``."""
    heads = heads_of(node) if len(meta_shape(node) or ()) == 3 else 0
    if axis == -1:
        node = graph.call_function(aten.transpose.int, (node, -1, -2))
    if heads:
        node = graph.call_function(split_heads, (node, heads))
    return node


def _restored(graph: fx.Graph, slots: fx.Node, like: fx.Node, axis: int) -> fx.Node:
    """Slots ``[..., H, P, D]`` back in the layout of ``like``, the node they join."""
    if len(meta_shape(like) or ()) == 3:
        slots = graph.call_function(merge_heads, (slots,))
    if axis == -1:
        slots = graph.call_function(aten.transpose.int, (slots, -1, -2))
    return slots


def prepend_sequence(graph_module: fx.GraphModule, original: fx.Node, widened: fx.Node, n: int,
                     *, keep: Iterable[fx.Node] = ()) -> None:
    """Make ``widened`` (``original`` with ``n`` items prepended along dim -2) the sequence downstream.

    ``original`` must have a dynamic sequence size ``S`` in dim -2 (its export ``meta``).
    Every use of ``original`` becomes a use of ``widened``; every use of ``S`` downstream
    becomes ``S + n`` (reshapes, ``arange`` positions, the causal mask), except in ``keep``
    and in the nodes ``original`` is computed from (e.g. the token ids of an embedding keep
    ``S``); graph inputs carrying ``S`` are widened (labels feeding a loss with its
    ``ignore_index``, attention masks with ones, others with zeros) and graph outputs carrying
    ``S`` are sliced back to their last ``S``.
    """
    graph = graph_module.graph
    seq = seq_symbol(original, -2)
    if seq is None:
        raise PluginError(f"{original.name}: the sequence dim is static; make it a named (dynamic) dim "
                          "in the spec's `inputs` so it can be widened")
    kept = ancestors([original], through_sizes=False) | set(keep) | {widened}
    original.replace_all_uses_with(widened, delete_user_cb=lambda user: user is not widened)
    outputs = _output_seq_dims(graph, seq)
    new_len = _widen_lengths(graph, seq, n, kept)
    _widen_inputs(graph, seq, n, kept | {new_len})
    _slice_outputs(graph, outputs, n)


def _widen_lengths(graph: fx.Graph, seq: Any, n: int, kept: set[fx.Node]) -> fx.Node:
    """Rewire every downstream use of the size ``seq`` to ``seq + n``; return the new size node."""
    sizes = [node for node in graph.nodes if _sym_expr(node) == seq and node.target is aten.sym_size.int]
    if not sizes:
        raise PluginError(f"no graph node holds the sequence size {seq}; cannot widen the sequence")
    with graph.inserting_after(sizes[0]):
        new_len = graph.call_function(operator.add, (sizes[0], n))
    mapping: dict[fx.Node, fx.Node] = dict.fromkeys(sizes, new_len)
    for node in list(graph.nodes):
        if node in mapping or node is new_len:
            continue
        hits = [a for a in node.all_input_nodes if a in mapping]
        if not hits:
            continue
        if _is_symbolic(node):  # a size expression: a widened copy, the original stays for `kept`
            with graph.inserting_after(node):
                mapping[node] = graph.node_copy(node, lambda a: mapping.get(a, a))
        elif node not in kept:
            for arg in hits:
                node.replace_input_with(arg, mapping[arg])
    return new_len


def loss_target_fills(graph: fx.Graph) -> dict[fx.Node, int]:
    """Nodes whose data feeds a loss's class targets, with that loss's ``ignore_index``."""
    fills: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _LOSSES:
            ignore = get_arg(node, "ignore_index", -100)
            fills.update(dict.fromkeys(ancestors([get_arg(node, "target")], through_sizes=False), ignore))
    return fills


def _widen_inputs(graph: fx.Graph, seq: Any, n: int, kept: set[fx.Node]) -> None:
    """Prepend ``n`` entries to graph inputs carrying ``seq``.

    The fill is the loss's ``ignore_index`` for inputs feeding a loss's targets (labels; they and
    attention masks, e.g. one over a KV cache's past and new tokens, are widened where the token
    inputs carry the sequence even if export gave them their own size symbol),
    ones for inputs feeding an attention mask, ``0 .. n-1`` (the rest shifted by ``n``) for
    inputs flagged :data:`POSITIONS`, zeros otherwise (e.g. token types).
    """
    masks, targets = mask_ancestors(graph), loss_target_fills(graph)
    placeholders = [p for p in graph.nodes if p.op == "placeholder"]
    # where the sequence sits in the token inputs, by rank: labels may carry their own size symbol
    token_dims = {len(meta_shape(p) or ()): d for p in placeholders if p in kept
                  for d in range(len(meta_shape(p) or ())) if _size_key(p, d) == seq}
    first = first_computation(graph)
    for node in (p for p in placeholders if p not in kept):
        dim = _input_seq_dim(node, seq, token_dims if node in targets or node in masks else {})
        if dim is None:
            continue
        fill = targets.get(node, 1 if node in masks else 0)
        with graph.inserting_before(first):
            wide = (graph.call_function(prepend_positions, (node, dim, n)) if node.meta.get(POSITIONS)
                    else graph.call_function(prepend_fill, (node, dim, n, fill)))
        node.replace_all_uses_with(wide, delete_user_cb=lambda u, w=wide: u is not w and _reads_data(u))


def _input_seq_dim(node: fx.Node, seq: Any, token_dims: dict[int, int]) -> int | None:
    """The dim of input ``node`` of size ``seq``, else the token inputs' sequence dim for its rank if dynamic."""
    shape = meta_shape(node) or ()
    dims = [d for d in range(len(shape)) if _size_key(node, d) == seq]
    if dims:
        return dims[0]
    dim = token_dims.get(len(shape))
    return dim if dim is not None and isinstance(shape[dim], torch.SymInt) else None


def _output_seq_dims(graph: fx.Graph, seq: Any) -> dict[fx.Node, list[int]]:
    """Graph outputs whose shape carries ``seq``, with those dims (read before any rewiring)."""
    output = next(n for n in graph.nodes if n.op == "output")
    found = {leaf: _seq_dims(leaf, seq) for leaf in _leaves(output.args)}
    return {leaf: dims for leaf, dims in found.items() if dims}


def _leaves(args: Any) -> list[fx.Node]:
    leaves: list[fx.Node] = []
    fx.node.map_arg(args, lambda a: leaves.append(a) or a)
    return leaves


def _seq_dims(node: fx.Node, seq: Any) -> list[int]:
    """Dims of ``node`` of size ``seq``; for a module inserted without export meta, those of its inputs."""
    if "val" in node.meta or node.op != "call_module":
        return [d for d in range(len(meta_shape(node) or ())) if _size_key(node, d) == seq]
    return next((dims for arg in node.all_input_nodes if (dims := _seq_dims(arg, seq))), [])


def _slice_outputs(graph: fx.Graph, outputs: dict[fx.Node, list[int]], n: int) -> None:
    output = next(node for node in graph.nodes if node.op == "output")
    replaced: dict[fx.Node, fx.Node] = {}
    for leaf, dims in outputs.items():
        node = leaf
        with graph.inserting_before(output):
            for dim in dims:
                node = graph.call_function(aten.slice.Tensor, (node, dim, n, SLICE_END))
        replaced[leaf] = node
    output.args = fx.node.map_arg(output.args, lambda a: replaced.get(a, a))
