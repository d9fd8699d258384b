"""Calling a CompiledModel as the original: omitted optional inputs, and ``labels`` giving ``.loss``.

The spec marks an input ``optional: true`` when the original ``forward`` lets a caller omit it:

- an optional input with a ``default`` (by name: ``*attention_mask`` all ones, ``token_type_ids``
  zeros, ``position_ids`` arange) stays an input of the graph; when omitted (or ``None``) it
  gets that value, which is what transformers models use when it is omitted;
- an optional input without one, such as ``labels``, is a *loss input*: the nodes the capture
  computed from it (the model's own loss) are split off into a :class:`LossHead`, which runs
  only when the caller gives it. Without it the output's loss is ``None``, as in the original.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from pefc.errors import SpecError

LOSS_HEAD = "_pefc_loss"
DEFAULT_BY_NAME = {"token_type_ids": "zeros", "position_ids": "arange"}


def default_of(name: str, spec: Any) -> str | None:
    """The fill of an omitted optional input: the spec's ``default``, else one by name (None: a loss input)."""
    if spec.default is not None:
        return spec.default
    return "ones" if name.endswith("attention_mask") else DEFAULT_BY_NAME.get(name)


def loss_inputs(spec: Any) -> list[str]:
    """Names of the spec's loss inputs: optional, without a default."""
    return [name for name, entry in spec.inputs.items() if entry.optional and default_of(name, entry) is None]


def placeholders(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "placeholder"]


# --- the call signature ------------------------------------------------------------------------

def call_signature(names: list[str], optional: set[str]) -> inspect.Signature:
    """``forward(required..., optional=None, ...)``; a required input after an optional one is keyword-only."""
    params, seen_optional = [], False
    for name in names:
        keyword_only = (seen_optional and name not in optional) or any(
            p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
        seen_optional |= name in optional
        kind = inspect.Parameter.KEYWORD_ONLY if keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(name, kind, default=None if name in optional else inspect.Parameter.empty))
    return inspect.Signature(params)


def signature_of(model: Any) -> inspect.Signature:
    """The CompiledModel's call signature (without ``self``): graph inputs, then loss inputs."""
    spec = model.pefc.spec
    names = placeholders(model.graph)
    names += [n for n in loss_inputs(spec) if n not in names and hasattr(model, LOSS_HEAD)]
    optional = {n for n in names if n in spec.inputs and spec.inputs[n].optional}
    return call_signature(names, optional)


def bind(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(graph inputs, loss inputs)`` of a call: omitted optional inputs filled, loss inputs apart."""
    signature = signature_of(model)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"CompiledModel{signature}: {exc}{_labels_hint(model, kwargs)}") from None
    given = {k: v for k, v in bound.arguments.items() if v is not None or k not in _optional(signature)}
    head = getattr(model, LOSS_HEAD, None)
    loss = {k: given.pop(k) for k in (head.inputs if head is not None else []) if k in given}
    spec = model.pefc.spec
    for name in placeholders(model.graph):
        if name not in given:
            given[name] = fill(name, spec.inputs[name], spec.inputs, given)
    return given, loss


@dataclass(frozen=True)
class CallPlan:
    """What :func:`bind` reads from the model, as plain data: what ``torch.compile`` traces instead
    (dynamo does not trace into ``fx.Graph`` or ``inspect``)."""

    names: tuple[str, ...]
    optional: frozenset[str]
    placeholders: tuple[str, ...]
    loss: tuple[str, ...]


def call_plan(model: Any) -> CallPlan:
    signature = signature_of(model)
    head = getattr(model, LOSS_HEAD, None)
    return CallPlan(tuple(signature.parameters), frozenset(_optional(signature)), tuple(placeholders(model.graph)),
                    tuple(head.inputs) if head is not None else ())


def bind_planned(model: Any, plan: CallPlan, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`bind` from ``plan``, for a call ``torch.compile`` traces."""
    unknown = [k for k in kwargs if k not in plan.names]
    if len(args) > len(plan.names) or unknown:
        raise TypeError(f"CompiledModel({', '.join(plan.names)}): got {len(args)} positional and {unknown} unknown "
                        "keyword arguments")
    bound = {**dict(zip(plan.names, args, strict=False)), **kwargs}
    given = {k: v for k, v in bound.items() if v is not None or k not in plan.optional}
    loss = {k: given.pop(k) for k in plan.loss if k in given}
    for name in plan.placeholders:
        if name not in given:
            given[name] = fill(name, model.pefc.spec.inputs[name], model.pefc.spec.inputs, given)
    return given, loss


def _optional(signature: inspect.Signature) -> set[str]:
    return {n for n, p in signature.parameters.items() if p.default is None}


def _labels_hint(model: Any, kwargs: dict[str, Any]) -> str:
    if "labels" in kwargs and "labels" not in model.pefc.spec.inputs:
        return ("; to get .loss, add `labels` to the spec's inputs with `optional: true` "
                "(e.g. labels: {shape: [batch, seq], high: VOCAB, optional: true})")
    return ""


def fill(name: str, entry: Any, entries: Mapping[str, Any], given: dict[str, Any]) -> torch.Tensor:
    """The value of omitted input ``name``: its default, shaped by the named dims of the given inputs."""
    sizes: dict[str, int] = {}
    device = None
    for other, value in given.items():
        if isinstance(value, torch.Tensor) and other in entries:
            device = device or value.device
            for dim, size in zip(entries[other].shape, value.shape, strict=False):
                if isinstance(dim, str):
                    sizes.setdefault(dim, int(size))
    missing = [d for d in entry.shape if isinstance(d, str) and d not in sizes]
    if missing:
        raise TypeError(f"CompiledModel: input {name!r} was omitted and its dim {missing[0]!r} is not a dim of "
                        "any given input; pass it")
    shape = [sizes[d] if isinstance(d, str) else d for d in entry.shape]
    dtype = getattr(torch, entry.dtype)
    kind = default_of(name, entry)
    if kind == "arange":
        return torch.arange(shape[-1], dtype=dtype, device=device).expand(shape)
    return (torch.ones if kind == "ones" else torch.zeros)(shape, dtype=dtype, device=device)


# --- the loss head -----------------------------------------------------------------------------

class LossHead(nn.Module):
    """The loss nodes of a captured graph, run on the model's outputs when the loss inputs are given.

    ``sources`` says what feeds each of its graph's inputs: ``("output", i)`` the model's i-th
    output leaf, ``("input", name)`` a model input (the loss inputs among them).
    """

    def __init__(self, graph_module: fx.GraphModule, sources: list[tuple[str, Any]], positions: list[int],
                 out_spec: Any, inputs: list[str]) -> None:
        super().__init__()
        self.loss = graph_module
        self.sources, self.positions, self.out_spec, self.inputs = sources, positions, out_spec, inputs

    def forward(self, out: Any, given: dict[str, Any], labels: dict[str, Any]) -> Any:
        """``out`` (the model's output, loss ``None``) with the loss computed from ``labels``."""
        leaves = pytree.tree_leaves(out)
        values = {**given, **labels}
        args = [leaves[self._leaf(i)] if kind == "output" else values[i] for kind, i in self.sources]
        losses = self.loss(*args)
        full = list(leaves)
        for position, loss in sorted(zip(self.positions, losses, strict=True)):
            full.insert(position, loss)
        return pytree.tree_unflatten(full, self.out_spec)

    def _leaf(self, position: int) -> int:
        """Index among the model's returned leaves of output leaf ``position`` (the losses are absent)."""
        return position - sum(1 for p in self.positions if p < position)


def split_loss(graph_module: fx.GraphModule, names: list[str], where: str = "inputs") -> LossHead | None:
    """Cut the nodes computed from the loss inputs ``names`` out of ``graph_module`` into a :class:`LossHead`.

    The graph then returns ``None`` for each loss and no longer takes the loss inputs. A loss
    input must feed scalar outputs only (a loss), from the model's outputs, inputs and values
    computed from inputs alone (recomputed in the head).
    """
    graph = graph_module.graph
    starts = [n for n in graph.nodes if n.op == "placeholder" and n.target in names]
    if not starts:
        return None
    order = {n: i for i, n in enumerate(graph.nodes)}
    loss_nodes = _descendants(starts)
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = list(output.args[0])
    positions = [i for i, v in enumerate(leaves) if isinstance(v, fx.Node) and v in loss_nodes]
    for i in positions:
        value = leaves[i].meta.get("val")
        if not (isinstance(value, torch.Tensor) and value.dim() == 0):
            raise SpecError(f"{where}: {', '.join(names)} is optional without a `default`, so it must feed the "
                            f"model's loss only; but output {i} ({leaves[i].name}, not a scalar) depends on it",
                            hint="give the input a `default`, or make it required")
    sources, head = _head_graph(graph, loss_nodes, starts, leaves, positions, order, where)
    _cut(graph, output, leaves, positions, loss_nodes, starts)
    loss_graph = fx.GraphModule(_attrs(graph_module, head), head, class_name="LossGraph")
    return LossHead(loss_graph, sources, positions, graph._codegen.pytree_info.out_spec,
                    [s.target for s in starts])


def _descendants(starts: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.op != "output" and user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _head_graph(graph: fx.Graph, loss_nodes: set[fx.Node], starts: list[fx.Node], leaves: list[Any],
                positions: list[int], order: dict[fx.Node, int], where: str) -> tuple[list[Any], fx.Graph]:
    """A graph computing the losses; its inputs are model outputs, model inputs and the loss inputs."""
    outputs = {v: i for i, v in enumerate(leaves) if isinstance(v, fx.Node) and i not in positions}
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    sources: list[tuple[str, Any]] = []

    def need(node: fx.Node) -> None:
        if node in env or node in loss_nodes:
            return
        if node in outputs:
            env[node] = head.placeholder(f"out_{outputs[node]}")
            sources.append(("output", outputs[node]))
        elif node.op == "placeholder":
            env[node] = head.placeholder(node.target)
            sources.append(("input", node.target))
        elif node.op == "get_attr" or (node.op == "call_function" and _recomputable(node, outputs)):
            for arg in node.all_input_nodes:
                need(arg)
            env[node] = head.node_copy(node, env.__getitem__)
        else:
            raise SpecError(f"{where}: the loss computed from {', '.join(s.target for s in starts)} uses "
                            f"{node.name}, an inner value of the model that is not an output; pefc cannot split "
                            "that loss off", hint="make the loss input required (optional: false)")

    for start in starts:
        need(start)
    for node in sorted(loss_nodes, key=order.__getitem__):
        for arg in node.all_input_nodes:
            need(arg)
        env[node] = head.node_copy(node, env.__getitem__)
    head.output(tuple(env[leaves[i]] for i in positions))
    return sources, head


def _recomputable(node: fx.Node, outputs: Mapping[fx.Node, int]) -> bool:
    """``node`` is computed from the model's inputs and outputs alone (no parameter, no module call)."""
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        if current in seen or current in outputs:
            continue
        seen.add(current)
        if current.op in ("get_attr", "call_module"):
            return False
        todo.extend(current.all_input_nodes)
    return True


def _cut(graph: fx.Graph, output: fx.Node, leaves: list[Any], positions: list[int], loss_nodes: set[fx.Node],
         starts: list[fx.Node]) -> None:
    """Return ``None`` for the losses, drop the loss nodes, the loss inputs and what only they used."""
    output.args = (tuple(None if i in positions else v for i, v in enumerate(leaves)),)
    inputs = {a for n in loss_nodes for a in n.all_input_nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(loss_nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    for node in starts:
        graph.erase_node(node)
    candidates = inputs - loss_nodes - set(starts)
    while candidates:
        node = candidates.pop()
        if not node.users and node.op in ("call_function", "get_attr"):
            candidates |= set(node.all_input_nodes)
            graph.erase_node(node)
    info = graph._codegen.pytree_info
    kept = [a for a in info.orig_args if a not in {s.target for s in starts}]
    in_spec = pytree.tree_structure(((), {name: 0 for name in kept}))
    graph._codegen.pytree_info = info._replace(orig_args=kept, in_spec=in_spec)


def _attrs(graph_module: fx.GraphModule, head: fx.Graph) -> dict[str, Any]:
    """The attributes the head's ``get_attr`` nodes read and the modules it calls (export's input guards),
    shared with the model."""
    from pefc.graphutil import attr_value

    return {n.target: attr_value(graph_module, n.target) for n in head.nodes if n.op in ("get_attr", "call_module")}
