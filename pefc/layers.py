"""Per-layer regions of a CompiledModel's flat graph: what FSDP2 and activation checkpointing need.

A captured graph is one flat function that reads every parameter through ``get_attr``; the
decoder layers (``model.layers.3``) are never *called*. FSDP2 unshards a module's parameters
in that module's forward hooks, and activation checkpointing needs a callable region, so both
need each layer to be a module that runs its own part of the graph.

:func:`partition_layers` makes it so without changing what the model is:

- each decoder layer module (a bare container of parameters after capture) becomes a
  :class:`LayerBlock` holding the same children, so parameter names and ``state_dict`` keys
  are unchanged;
- ``CompiledModel.graph`` stays the flat graph (sites, merge, export and plugins see what
  they always saw). Every :meth:`CompiledModel.recompile` cuts it afresh into the code that
  runs: the root calls ``model.layers.i(...)``, and each block runs that layer's nodes (its
  base ops, its adapters' modules, its parameter reads) as a slice of the same graph, bound
  to the root, so the same ops run in the same order and outputs are bit-identical.

A layer's region is the span of graph nodes between the first and the last node that the
layer's module produced (``nn_module_stack``) or that an adapter placed at one of its sites;
nodes without a module in that span (graph edits such as a widened mask) belong to it, and
a ``get_attr`` belongs to the region of its only user region.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from pefc.errors import PefcError
from pefc.graphutil import module_path

_INDEXED = re.compile(r"^(?P<container>.+)\.(?P<index>\d+)$")


class LayerBlock(nn.Module):
    """A decoder layer that runs its region of the owning CompiledModel's graph.

    Holds the layer's original children (so parameter names do not change). ``checkpoint``
    recomputes the region in backward (activation checkpointing) while training.
    """

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint = False
        self.checkpoint_kwargs: dict[str, Any] = {}
        object.__setattr__(self, "_pefc_root", None)  # not a submodule: the owning CompiledModel
        self._pefc_fn: Any = None
        #: this layer's parameters that the graph reads outside the layer's region
        self.outside_reads: list[str] = []

    def bind(self, root: nn.Module, fn: Any) -> None:
        object.__setattr__(self, "_pefc_root", root)
        self._pefc_fn = fn

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles are unbound: the owning CompiledModel binds its blocks when it recompiles."""
        return {**self.__dict__, "_pefc_root": None, "_pefc_fn": None}

    def forward(self, *args: Any) -> tuple[Any, ...]:
        fn, root = self._pefc_fn, self._pefc_root
        if fn is None or root is None:
            raise PefcError("this LayerBlock is not bound to a CompiledModel; call the CompiledModel, not the layer")
        if self.checkpoint and self.training and torch.is_grad_enabled():
            options = {"use_reentrant": False, **self.checkpoint_kwargs}
            return checkpoint(fn, root, *args, **options)
        return fn(root, *args)

    def extra_repr(self) -> str:
        return "checkpoint=True" if self.checkpoint else ""


@dataclass
class Partition:
    """The flat graph cut into a root graph that calls one region per layer."""

    root: fx.Graph
    regions: dict[str, fx.Graph]
    #: per layer: its parameters read outside its region (FSDP cannot shard such a layer)
    outside_reads: dict[str, list[str]] = field(default_factory=dict)


def layer_paths(graph: fx.Graph) -> list[str]:
    """The decoder layers of a captured graph: the indexed modules (``model.layers.<i>``) of the
    container with the most of them, in index order."""
    found: dict[str, set[int]] = {}
    for node in graph.nodes:
        path = module_path(node) if node.op == "call_function" else None
        layer = _outer_layer(path) if path else None
        if layer is not None:
            match = _INDEXED.match(layer)
            assert match is not None
            found.setdefault(match["container"], set()).add(int(match["index"]))
    if not found:
        raise PefcError("no repeated layers (modules such as `model.layers.0`) were found in the captured graph",
                        hint="gradient checkpointing and per-layer FSDP need a model built from indexed layers")
    container = max(found, key=lambda c: len(found[c]))
    return [f"{container}.{i}" for i in sorted(found[container])]


def partition_layers(model: fx.GraphModule, paths: Sequence[str] | None = None) -> list[str]:
    """Make each decoder layer of ``model`` (a CompiledModel) a :class:`LayerBlock`; return their paths.

    ``paths`` defaults to :func:`layer_paths`. Idempotent; recompiles ``model``.
    """
    paths = list(paths) if paths is not None else layer_paths(model.graph)
    for path in paths:
        try:
            current = model.get_submodule(path)
        except AttributeError:
            raise PefcError(f"the model has no module {path!r} to make a layer of") from None
        if not isinstance(current, LayerBlock) and type(current) is not nn.Module:
            raise PefcError(f"module {path!r} is a {type(current).__name__}, not a captured layer container")
    plan_partition(model.graph, paths)  # fail before changing anything if the graph cannot be cut
    for path in paths:
        if not isinstance(model.get_submodule(path), LayerBlock):
            _replace(model, path, LayerBlock())
    model.recompile()
    return paths


def unpartition_layers(model: fx.GraphModule) -> None:
    """Undo :func:`partition_layers`: layers become plain containers again; recompiles ``model``."""
    blocks = list(layer_blocks(model))
    for path, _ in blocks:
        _replace(model, path, nn.Module())
    if blocks:
        model.recompile()


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` holding the old module's children, parameters and buffers (same names)."""
    old = model.get_submodule(path)
    new._modules = old._modules
    new._parameters = old._parameters
    new._buffers = old._buffers
    new._non_persistent_buffers_set = old._non_persistent_buffers_set
    new.training = old.training
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def layer_blocks(model: nn.Module) -> Iterator[tuple[str, LayerBlock]]:
    for name, module in model.named_modules():
        if isinstance(module, LayerBlock):
            yield name, module


def bind_layer_blocks(model: fx.GraphModule, blocks: dict[str, LayerBlock], partition: Partition) -> None:
    """Give each block the compiled code of its region, run against ``model``."""
    for path, block in blocks.items():
        code = partition.regions[path].python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<pefc layer {path}>", "exec"), namespace)  # noqa: S102
        block.bind(model, namespace["forward"])
        block.outside_reads = partition.outside_reads.get(path, [])


def plan_partition(graph: fx.Graph, paths: Sequence[str]) -> Partition:
    """Cut ``graph`` into a root graph calling ``call_module(path)`` once per layer, and the regions."""
    members = _members(graph, paths)
    regions = {path: [n for n in graph.nodes if members.get(n) == path] for path in paths}
    inputs = {path: _inputs(nodes, members, path) for path, nodes in regions.items()}
    outputs = {path: [n for n in nodes if any(members.get(u) != path for u in n.users)]
               for path, nodes in regions.items()}
    last = {nodes[-1]: path for path, nodes in regions.items() if nodes}
    root = fx.Graph()
    root.set_codegen(graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node not in members:
            env[node] = root.node_copy(node, lambda n: env[n])
        elif node in last:
            _call_region(root, last[node], inputs[last[node]], outputs[last[node]], env)
    region_graphs = {path: _region_graph(nodes, inputs[path], outputs[path]) for path, nodes in regions.items()}
    return Partition(root, region_graphs, _outside_reads(graph, members, paths))


# -- internals -----------------------------------------------------------------------------

def _outer_layer(path: str) -> str | None:
    """``model.layers.3.self_attn`` -> ``model.layers.3`` (the outermost indexed module)."""
    parts = path.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return None


def _owner(target: str, paths: Iterable[str]) -> str | None:
    """The layer a ``get_attr`` / ``call_module`` target belongs to: a base path under the layer,
    or ``<adapter>.<path under the layer>``."""
    rest = target.split(".", 1)[1] if "." in target else ""
    for path in paths:
        prefix = path + "."
        if target.startswith(prefix) or rest.startswith(prefix) or rest == path:
            return path
    return None


def _tag(node: fx.Node, paths: frozenset[str]) -> str | None:
    if node.op == "call_module":
        return _owner(str(node.target), paths)
    if node.op in ("call_function", "call_method"):
        path = module_path(node)
        layer = _outer_layer(path) if path else None
        return layer if layer in paths else None
    return None


def _members(graph: fx.Graph, paths: Sequence[str]) -> dict[fx.Node, str]:
    """Which layer region each node belongs to (nodes outside every region are absent)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    known = frozenset(paths)
    tags = {node: tag for node in graph.nodes if (tag := _tag(node, known)) is not None}
    nodes = list(graph.nodes)
    spans: dict[str, list[int]] = {}
    for node, tag in tags.items():
        span = spans.setdefault(tag, [order[node], order[node]])
        span[1] = order[node]
    _check_disjoint(spans)
    members: dict[fx.Node, str] = {}
    for path, (first, last) in spans.items():
        for node in nodes[first:last + 1]:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if tags.get(node, path) != path:
                raise PefcError(f"graph node {node.name!r} of layer {tags[node]!r} lies inside the region of "
                                f"layer {path!r}; this graph cannot be cut into per-layer regions")
            members[node] = path
    for node in graph.nodes:
        if node.op == "get_attr" and node.users:
            owners = {members.get(user) for user in node.users}
            if len(owners) == 1 and None not in owners:
                members[node] = owners.pop()  # type: ignore[assignment]
    return members


def _check_disjoint(spans: dict[str, list[int]]) -> None:
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    for (a, (_, a_end)), (b, (b_start, _)) in zip(ordered, ordered[1:], strict=False):
        if b_start <= a_end:
            raise PefcError(f"the graph nodes of layers {a!r} and {b!r} interleave; "
                            "this graph cannot be cut into per-layer regions")


def _inputs(nodes: list[fx.Node], members: dict[fx.Node, str], path: str) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    for node in nodes:
        for used in node.all_input_nodes:
            if members.get(used) != path:
                seen.setdefault(used, None)
    return list(seen)


def _call_region(root: fx.Graph, path: str, inputs: list[fx.Node], outputs: list[fx.Node],
                 env: dict[fx.Node, fx.Node]) -> None:
    call = root.call_module(path, tuple(env[n] for n in inputs))
    for index, node in enumerate(outputs):
        item = root.call_function(operator.getitem, (call, index))
        item.meta = dict(node.meta)
        env[node] = item


def _region_graph(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return graph


def _outside_reads(graph: fx.Graph, members: dict[fx.Node, str], paths: Sequence[str]) -> dict[str, list[str]]:
    reads: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.users:
            owner = next((p for p in paths if str(node.target).startswith(p + ".")), None)
            if owner is not None and members.get(node) != owner:
                reads.setdefault(owner, []).append(str(node.target))
    return reads
