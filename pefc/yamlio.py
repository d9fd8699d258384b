"""Safe YAML loading with duplicate-key and alias-bomb protection, and line lookup."""

from __future__ import annotations

from typing import Any

import yaml

from pefc.errors import SpecError

MAX_ALIASES = 100


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader (no object construction) that rejects duplicate keys and alias floods."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.MarkedYAMLError(None, None, f"more than {MAX_ALIASES} aliases (*refs)",
                                           event.start_mark)
        return super().compose_node(parent, index)

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


def load_yaml(text: str, *, source: str | None = None) -> Any:
    """Parse YAML text safely; errors become :class:`SpecError` with the line."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader derives from SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(f"invalid YAML at {where}{exc.problem or exc.context}", source=source) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError(f"invalid YAML: {type(exc).__name__}", source=source) from None


def yaml_line(text: str, loc: list[Any]) -> int | None:
    """1-based line of the node at key path ``loc`` in YAML ``text`` (deepest found)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(part)), None)
            if node is not None:
                line = _key_line(node, line)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _key_line(node: Any, fallback: int) -> int:
    return node.start_mark.line + 1 if node is not None else fallback
