"""Safe YAML loading with duplicate-key and alias-bomb protection, and line lookup.

Only YAML's safe subset is constructed (no Python objects). The document is composed once
(with libyaml when PyYAML has it) and kept, so validation errors can name lines cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from pefc.errors import SpecError

MAX_EXPANDED_NODES = 1_000_000  # nodes after expanding aliases ("billion laughs" guard)
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _SafeLoader(_Base):  # type: ignore[misc, valid-type]
    """A safe loader that rejects duplicate keys and non-scalar keys."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


@dataclass
class YamlDocument:
    """Parsed data plus the composed node tree, for line lookups."""

    data: Any
    root: Any

    def line(self, loc: list[Any]) -> int | None:
        """1-based line of the node at key path ``loc`` (the deepest one that exists)."""
        node, line = self.root, None
        for part in loc:
            if node is None:
                break
            line = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == str(part)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
            else:
                node = None
        if node is not None:
            line = node.start_mark.line + 1
        return line


def parse_yaml(text: str, *, source: str | None = None) -> YamlDocument:
    """Parse YAML text safely; errors become :class:`SpecError` with the line."""
    loader = _SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None and _expanded_size(root, {}) > MAX_EXPANDED_NODES:
            raise SpecError(f"invalid YAML: aliases expand to more than {MAX_EXPANDED_NODES:,} nodes",
                            source=source)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(f"invalid YAML at {where}{exc.problem or exc.context}", source=source) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError(f"invalid YAML: {type(exc).__name__}", source=source) from None
    finally:
        loader.dispose()
    return YamlDocument(data, root)


def load_yaml(text: str, *, source: str | None = None) -> Any:
    """Parse YAML text safely into plain data."""
    return parse_yaml(text, source=source).data


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Node count of ``node`` with every alias expanded (memoised: linear in the document)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = min(size, MAX_EXPANDED_NODES + 1)
    return memo[id(node)]
