"""Validation of the spec's ``select`` section (torch-free: ``pefc validate`` runs it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pefc.registry import Registry


def select_problem(select: Any, adapters: list[str], inputs: list[str]) -> str | None:
    """Why ``select`` does not fit the spec's adapter names and inputs, or None."""
    seen: set[str] = set()
    for index, name in enumerate(select.adapters):
        if name not in adapters:
            known = ", ".join(adapters) or "none"
            return f"select.adapters.{index}: unknown adapter {name!r} (the spec's adapters: {known})"
        if name in seen:
            return f"select.adapters.{index}: adapter {name!r} is listed twice; each adapter takes one index"
        seen.add(name)
    if select.input in inputs:
        return (f"select.input: {select.input!r} is already one of the spec's inputs; the selection input is "
                "added by pefc, give it another name")
    return None


def unselectable(spec: Any, registry: Registry) -> list[tuple[list[Any], str]]:
    """``(key path, message)`` for each selected adapter whose method does not opt in to per-row selection."""
    if spec.select is None:
        return []
    by_name = {a.name: a for a in spec.adapters}
    issues = []
    for index, name in enumerate(spec.select.adapters):
        method = registry.methods.get(by_name[name].method)
        if method is not None and not getattr(method, "selectable", False):
            issues.append((["select", "adapters", index], refusal(name, by_name[name].method)))
    return issues


def refusal(adapter: str, method: str) -> str:
    """The message refusing to select ``adapter`` (of ``method``) per row."""
    why = (" (prompt tuning prepends virtual tokens, which would change every row's sequence length)"
           if method == "prompt" else "")
    return (f"adapter {adapter!r}: method {method!r} cannot be selected per row{why}; keep it out of "
            "`select` (it then stays on for every row), or use a method that opts in (Method.selectable)")
