"""Attention in a captured graph, whichever form it takes.

Two forms are read, and both give an :class:`Attention` with the same fields:

- ``aten.scaled_dot_product_attention(query, key, value, attn_mask, is_causal)``;
- attention written out in ATen ops (``attn_implementation="eager"``, research code): scores
  from ``matmul`` / ``bmm`` / ``baddbmm`` / ``einsum`` of queries and keys, then any chain of
  scaling (before or after the product, or none as in T5), additive masks and biases (ALiBi as
  ``baddbmm``'s input, relative position bias, causal masks via ``where`` / ``masked_fill``),
  softcapping (``tanh(s / c) * c``) and dtype casts, then ``softmax``, optional casts and
  dropout, then the product with the values.

:class:`Attention` records where the keys and values join the computation (``key`` /
``value`` and the axis of the key positions in them) and every mask or bias operand that
carries the key axis (with the value that lets a query see an extra key: ``True`` for a
keep-mask, ``False`` for a masked-out mask, ``0`` for an additive bias), so that
:func:`pefc.sequence.prepend_kv` can join extra keys in either form.

A ``softmax`` whose probabilities are multiplied with values but whose scores pefc cannot
trace to a query-key product is reported as an :class:`Unread` attention, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from pefc.graphutil import get_arg, meta_shape, module_path

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
          aten.alias.default, aten.type_as.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SCALES = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_BIASES = {aten.add.Tensor, aten.sub.Tensor}
_WHERES = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
_MASKED_FILLS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
_TRANSPOSES = {aten.transpose.int, aten.permute.default}


@dataclass(eq=False)
class MaskEdge:
    """Argument ``index`` of ``consumer`` is a mask or bias over the keys; ``fill`` lets a query see a new key."""

    consumer: fx.Node
    index: int
    fill: float | bool

    @property
    def node(self) -> fx.Node:
        return self.consumer.args[self.index]  # type: ignore[return-value]


@dataclass(eq=False)
class Attention:
    """One attention: ``softmax(q k^T [* scale] [+ bias]) v``, as SDPA or written out.

    ``key`` and ``value`` are where keys and values join (joining extra ones along
    ``key_axis`` / ``value_axis`` of these nodes widens the attention), ``key_user`` /
    ``value_user`` the nodes that read them there. ``heads`` / ``key_heads`` are the heads
    of the query and key tensors (0 when the shapes do not tell), ``layout`` ``"bhsd"``
    (``[B, H, S, D]``) or ``"bsd"`` (heads folded into the batch, ``[B*H, S, D]``).
    """

    form: str  # "sdpa" or "eager"
    output: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    key_user: fx.Node
    value_user: fx.Node
    key_axis: int = -2
    value_axis: int = -2
    masks: list[MaskEdge] = field(default_factory=list)
    scores: fx.Node | None = None
    softmax: fx.Node | None = None
    pinned: list[fx.Node] = field(default_factory=list)  # reshapes that fix the key length
    heads: int = 0
    key_heads: int = 0
    layout: str = "bhsd"

    @property
    def mask(self) -> fx.Node | None:
        """The (first) mask or bias over the keys, if any."""
        if self.form == "sdpa":
            return get_arg(self.output, "attn_mask")
        return self.masks[0].node if self.masks else None


@dataclass(eq=False)
class Unread:
    """A softmax whose probabilities meet values, but whose scores pefc cannot read."""

    node: fx.Node
    path: str
    reason: str


def find_attentions(graph: fx.Graph) -> tuple[list[Attention], list[Unread]]:
    """Every attention of ``graph`` (SDPA and written out), and the softmaxes that look like one but cannot be read."""
    found: list[Attention] = []
    unread: list[Unread] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is SDPA:
            found.append(_sdpa(node))
        elif node.target in SOFTMAX:
            result = _eager(node)
            if isinstance(result, Attention):
                found.append(result)
            elif isinstance(result, Unread):
                unread.append(result)
    order = {n: i for i, n in enumerate(graph.nodes)}
    found.sort(key=lambda a: order[a.output])
    return found, unread


def attention_outputs(graph: fx.Graph) -> set[fx.Node]:
    return {a.output for a in find_attentions(graph)[0]}


# --- SDPA -----------------------------------------------------------------------------------

def _sdpa(node: fx.Node) -> Attention:
    q, k, v = (get_arg(node, name) for name in ("query", "key", "value"))
    return Attention(form="sdpa", output=node, query=q, key=k, value=v, key_user=node, value_user=node,
                     heads=heads_of(q), key_heads=heads_of(k), layout=_layout(q))


# --- written out ------------------------------------------------------------------------------

def _eager(softmax: fx.Node) -> Attention | Unread | None:
    """The attention around ``softmax``; None when its probabilities meet no values (a router, a head)."""
    if get_arg(softmax, "dim") not in (-1, len(meta_shape(softmax) or ()) - 1):
        return None
    found = _probs_product(softmax, [])
    if found is None:
        return None
    product, value, value_axis, pinned = found
    path = module_path(product) or product.name
    masks: list[MaskEdge] = []
    scores = _trace_scores(softmax.args[0], masks, pinned, 0)
    if scores is None:
        return Unread(node=product, path=path, reason=f"the scores of softmax {softmax.name!r} do not come from a "
                      "query-key product (matmul, bmm, baddbmm or einsum) through scaling, masks, biases and casts")
    operands = _qk(scores)
    if operands is None:
        return Unread(node=product, path=path, reason=f"cannot tell queries from keys in {scores.name!r}")
    query, key_operand, key_axis = operands
    key, key_user, key_axis = _untransposed(key_operand, scores, key_axis)
    if scores.target is aten.baddbmm.default:
        masks.append(MaskEdge(scores, 0, 0.0))
    masks = [m for m in masks if _has_key_axis(m.node)]
    return Attention(form="eager", output=product, query=query, key=key, value=value, key_user=key_user,
                     value_user=product, key_axis=key_axis, value_axis=value_axis, masks=masks, scores=scores,
                     softmax=softmax, pinned=pinned, heads=heads_of(query), key_heads=heads_of(key), layout=_layout(query))


def _probs_product(node: fx.Node, pinned: list[fx.Node], depth: int = 0
                   ) -> tuple[fx.Node, fx.Node, int, list[fx.Node]] | None:
    """From the probabilities forward (casts, dropout, reshapes) to the product with the values."""
    if depth > 8:
        return None
    for user in node.users:
        if user.op != "call_function":
            continue
        if user.target in (aten.matmul.default, aten.bmm.default) and user.args[0] is node:
            return user, user.args[1], -2, pinned  # type: ignore[return-value]
        if user.target is aten.einsum.default:
            hit = _einsum_value(user, node)
            if hit is not None:
                return user, hit[0], hit[1], pinned
        if user.target in _CASTS | _DROPOUTS or (user.target is operator.getitem and user.args[1] == 0):
            hit = _probs_product(user, pinned, depth + 1)
        elif user.target in _RESHAPES:
            hit = _probs_product(user, [*pinned, user] if _pins_last(user) else pinned, depth + 1)
        elif user.target is aten.native_dropout.default:
            hit = _probs_product(user, pinned, depth + 1)
        else:
            continue
        if hit is not None:
            return hit
    return None


def _trace_scores(node: Any, masks: list[MaskEdge], pinned: list[fx.Node], depth: int) -> fx.Node | None:
    """Back from the softmax input to the query-key product, collecting mask/bias operands on the way."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 16:
        return None
    if node.target in PRODUCTS:
        return node if _qk(node) is not None else None
    target = node.target
    if target in _CASTS or target is aten.tanh.default or target is aten.neg.default:
        return _trace_scores(node.args[0], masks, pinned, depth + 1)
    if target in _RESHAPES:
        if _pins_last(node):
            pinned.append(node)
        return _trace_scores(node.args[0], masks, pinned, depth + 1)
    if target in _SCALES | _BIASES:
        fill = 0.0 if target in _BIASES else 1.0
        return _through_one(node, [0, 1], masks, pinned, depth, lambda i: fill)
    if target in _WHERES:  # where(cond, a, b): a new key takes the branch the scores come from
        for taken in (1, 2):
            hit = _through_one(node, [taken], masks, pinned, depth,
                               lambda i, taken=taken: (taken == 1) if i == 0 else 0.0)
            if hit is not None:
                return hit
        return None
    if target in _MASKED_FILLS:
        masks.append(MaskEdge(node, 1, False))
        return _trace_scores(node.args[0], masks, pinned, depth + 1)
    return None


def _through_one(node: fx.Node, candidates: list[int], masks: list[MaskEdge], pinned: list[fx.Node], depth: int,
                 fill: Any) -> fx.Node | None:
    """Trace the scores through one of ``candidates`` args; the other tensor args are masks/biases."""
    args = node.args
    for index in sorted(candidates, key=lambda i: -_rank(args[i]) if i < len(args) else 0):
        if index >= len(args):
            continue
        inner_masks: list[MaskEdge] = []
        inner_pinned: list[fx.Node] = []
        hit = _trace_scores(args[index], inner_masks, inner_pinned, depth + 1)
        if hit is None:
            continue
        masks.extend(inner_masks)
        pinned.extend(inner_pinned)
        for other, arg in enumerate(args):
            if other != index and other < 3 and _is_tensor(arg):
                masks.append(MaskEdge(node, other, fill(other)))
        return hit
    return None


def _qk(product: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """``(query, key operand, key axis in it)`` of a scores product of two activations."""
    if product.target is aten.einsum.default:
        equation, operands = product.args[0], product.args[1]
        if not isinstance(equation, str) or len(operands) != 2:  # type: ignore[arg-type]
            return None
        axis = _einsum_axis(equation, 1, _einsum_output(equation)[-1:])
        q, k = operands  # type: ignore[misc]
        return (q, k, axis) if axis is not None and _activation(q) and _activation(k) else None
    q, k = (product.args[1], product.args[2]) if product.target is aten.baddbmm.default else product.args[:2]
    if not (_activation(q) and _activation(k)) or len(meta_shape(k) or ()) < 3:
        return None
    return q, k, -1  # type: ignore[return-value]


def _untransposed(operand: fx.Node, scores: fx.Node, axis: int) -> tuple[fx.Node, fx.Node, int]:
    """Where keys join: before the transpose (and scalings) that make ``[..., D, S]`` of ``[..., S, D]``."""
    if axis != -1:
        return operand, scores, axis
    node = operand
    for _ in range(6):
        if node.op != "call_function":
            break
        if node.target in _TRANSPOSES and _swaps_last_two(node):
            return node.args[0], node, -2  # type: ignore[return-value]
        if node.target in _CASTS or (node.target in _SCALES and _rank(node.args[1]) == 0):
            node = node.args[0]  # type: ignore[assignment]
            continue
        break
    return operand, scores, -1


def _swaps_last_two(node: fx.Node) -> bool:
    rank = len(meta_shape(node) or ())
    if node.target is aten.transpose.int:
        dims = {d % rank for d in node.args[1:3]}  # type: ignore[operator]
        return rank >= 2 and dims == {rank - 1, rank - 2}
    perm = [d % rank for d in node.args[1]]  # type: ignore[union-attr]
    return perm == [*range(rank - 2), rank - 1, rank - 2]


def _einsum_value(product: fx.Node, probs: fx.Node) -> tuple[fx.Node, int] | None:
    equation, operands = product.args[0], product.args[1]
    if not isinstance(equation, str) or len(operands) != 2 or operands[0] is not probs:  # type: ignore[arg-type,index]
        return None
    key_letter = equation.split("->")[0].split(",")[0].strip()[-1:]
    axis = _einsum_axis(equation, 1, key_letter)
    return (operands[1], axis) if axis is not None else None  # type: ignore[index]


def _einsum_output(equation: str) -> str:
    return equation.split("->")[1].strip() if "->" in equation else ""


def _einsum_axis(equation: str, operand: int, letter: str) -> int | None:
    """Negative axis of ``letter`` in einsum operand ``operand``."""
    subscripts = equation.split("->")[0].split(",")[operand].strip().replace("...", "")
    if not letter or subscripts.count(letter) != 1:
        return None
    return subscripts.index(letter) - len(subscripts)


# --- shapes ---------------------------------------------------------------------------------

def _is_tensor(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)


def _activation(node: Any) -> bool:
    """A tensor computed in the graph (not a parameter or buffer)."""
    return _is_tensor(node) and node.op != "get_attr"


def _rank(arg: Any) -> int:
    return len(meta_shape(arg) or ())


def _has_key_axis(node: Any) -> bool:
    """Whether a mask/bias tensor varies along the last (key) axis: not a scalar, not size 1 there."""
    shape = meta_shape(node)
    return bool(shape) and not (isinstance(shape[-1], int) and shape[-1] == 1)


def _pins_last(reshape: fx.Node) -> bool:
    """Whether a reshape of scores/probabilities spells out the key length (not ``-1``)."""
    sizes = reshape.args[1] if len(reshape.args) > 1 else None
    return isinstance(sizes, (list, tuple)) and bool(sizes) and sizes[-1] != -1


def heads_of(node: Any) -> int:
    """Heads of a ``[B, H, S, D]`` tensor, or of a ``[B*H, S, D]`` one whose batch dim reads ``H*batch``."""
    shape = meta_shape(node) or ()
    if len(shape) == 4 and isinstance(shape[1], int):
        return shape[1]
    if len(shape) == 3 and isinstance(shape[0], torch.SymInt):
        coefficient, _ = shape[0].node.expr.as_coeff_Mul()
        return int(coefficient) if coefficient.is_Integer else 0
    return 0


def _layout(node: Any) -> str:
    return "bsd" if len(meta_shape(node) or ()) == 3 else "bhsd"
