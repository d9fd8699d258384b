"""Small helpers over ``torch.fx`` nodes of ATen graphs."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx


def _schema_index(node: fx.Node, name: str) -> int:
    for index, argument in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if argument.name == name:
            return index
    raise KeyError(f"{node.target} has no argument {name!r}")


def get_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen call node, wherever it was passed."""
    if name in node.kwargs:
        return node.kwargs[name]
    index = _schema_index(node, name)
    if index < len(node.args):
        return node.args[index]
    schema_default = node.target._schema.arguments[index].default_value  # type: ignore[union-attr]
    return schema_default if schema_default is not None else default


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set argument ``name`` of an ATen call node (positionally if it was passed so)."""
    index = _schema_index(node, name)
    if name in node.kwargs or index >= len(node.args):
        node.update_kwarg(name, value)
    else:
        node.update_arg(index, value)


def meta_shape(node: Any) -> tuple[Any, ...] | None:
    """The (possibly symbolic) shape recorded by export for ``node``, if any."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def static_dim(node: Any, dim: int) -> int | None:
    shape = meta_shape(node)
    if shape is None or not -len(shape) <= dim < len(shape):
        return None
    size = shape[dim]
    return size if isinstance(size, int) else None


def search(start: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
           stop: Callable[[fx.Node], bool], *, limit: int = 512) -> list[fx.Node]:
    """Breadth-first search from ``start``; return the first nodes on each path where ``stop`` holds."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    queue = deque(start)
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if stop(node):
            if node not in found:
                found.append(node)
            continue
        queue.extend(step(node))
    return found


def is_tensor_node(node: fx.Node) -> bool:
    """Whether ``node`` produces tensor data (a tensor or a tuple of tensors, not a size)."""
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor) or node.op == "call_module"


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs of ``node`` that carry tensor data (shape-only inputs such as sym sizes excluded)."""
    return [n for n in node.all_input_nodes if is_tensor_node(n)]


def producers(node: fx.Node) -> list[fx.Node]:
    """Tensor data inputs of ``node`` (parameters, buffers and graph inputs excluded)."""
    return [n for n in tensor_inputs(node) if n.op not in ("get_attr", "placeholder")]


def consumers(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def module_path(node: fx.Node) -> str | None:
    """Path of the innermost module that produced ``node`` (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def attr_value(graph_module: fx.GraphModule, target: str) -> Any:
    value: Any = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    return value
