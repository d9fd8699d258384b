"""The hook specifications of pefc (pluggy project name ``pefc``).

A plugin is any module or object with functions marked ``@pefc.hookimpl``, registered
through the ``pefc`` entry-point group::

    [project.entry-points.pefc]
    vera = "pefc_vera"

Method plugins implement :func:`pefc_methods`; the other hooks let a plugin add passes
around the rewrite and before export. The built-in methods use exactly this API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch.fx as fx

    from pefc.compiled import CompiledModel
    from pefc.method import Method
    from pefc.schema import SpecBase
    from pefc.sites import Site

PROJECT = "pefc"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def pefc_methods() -> list[Method]:
    """Return the PEFT methods this plugin provides (instances of :class:`pefc.Method`).

    Each method brings its pydantic config model (discriminated on ``method``), its
    rewrite rule, its parameter-count formula and, if mergeable, modules with a fold rule.
    """


@hookspec
def pefc_before_rewrite(graph_module: fx.GraphModule, sites: list[Site], spec: SpecBase) -> None:
    """Called after capture and site discovery, before any adapter is inserted.

    A pass may edit ``graph_module.graph`` in place (and must keep ``sites`` valid).
    """


@hookspec
def pefc_after_rewrite(model: CompiledModel, spec: SpecBase) -> None:
    """Called once every adapter of the spec has been inserted, before the model is returned."""


@hookspec
def pefc_before_export(model: CompiledModel, options: dict[str, Any]) -> None:
    """Called on the (possibly merged) model right before it is exported to ONNX."""
