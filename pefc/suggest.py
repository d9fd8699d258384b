""""Did you mean ...?": the closest known name to a misspelt one, and the keys a spec allows where."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel


def closest(word: str, candidates: Iterable[str], *, cutoff: float = 0.75) -> str | None:
    """The candidate closest to ``word`` (difflib), or None when none is close."""
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.75) -> str:
    """``"; did you mean X?"`` for the closest candidate, else ``""``."""
    match = closest(word, candidates, cutoff=cutoff)
    return f"; did you mean {match}?" if match else ""


def keys_at(root: type[BaseModel], loc: Sequence[Any], data: Any) -> list[str]:
    """The keys the pydantic model reached from ``root`` along ``loc`` accepts (``[]`` if none is a model).

    ``data`` is the raw tree, used to pick a union member by its ``method`` (adapter entries).
    """
    annotation: Any = root
    node = data
    for part in loc:
        model = _model_of(annotation, node)
        if model is not None:
            field = _field(model, part)
            if field is None:
                return []
            annotation = field.annotation
        else:
            annotation = _item_type(annotation, part)
            if annotation is None:
                return []
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    model = _model_of(annotation, node)
    if model is None:
        return []
    return sorted({f.alias or name for name, f in model.model_fields.items()})


def _field(model: type[BaseModel], key: Any) -> Any:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


def _members(annotation: Any) -> list[Any]:
    """Union members (and Annotated's type) unwrapped, NoneType dropped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg) if m is not type(None)]
    return [annotation]


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) > 1 and isinstance(node, dict):  # a discriminated union: the member of node's method
        tagged = [m for m in models if "method" in m.model_fields
                  and m.model_fields["method"].default == node.get("method")]
        models = tagged or models
    return models[0] if len(models) == 1 else None


def _item_type(annotation: Any, part: Any) -> Any:
    """The item type of a ``list[...]`` (for an index) or the value type of a ``dict[...]`` (for a key)."""
    for member in _members(annotation):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if origin is list and isinstance(part, int) and args:
            return args[0]
        if origin is dict and isinstance(part, str) and len(args) == 2:
            return args[1]
    return None
