"""pefc: a plugin-based compiler for parameter-efficient fine-tuning specs.

>>> import pefc
>>> spec = pefc.load_spec("specs/llama-lora.yaml")
>>> cm = pefc.compile(spec)
>>> cm.parameter_report()

The names below are imported on first use (PEP 562), so ``import pefc`` costs nothing until a
name is used: the CLI answers ``--help`` and validates specs without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "interop": "pefc.interop",
    "CompiledModel": "pefc.compiled",
    "compile": "pefc.compiler",
    "AdapterConfig": "pefc.config",
    **dict.fromkeys(("CaptureError", "CheckpointError", "ExportError", "ModelSourceError", "NumericalError",
                     "PefcError", "PluginError", "SpecError", "TargetError", "VerificationError"), "pefc.errors"),
    "export_onnx": "pefc.export",
    "hookimpl": "pefc.hookspecs",
    "Method": "pefc.method",
    **dict.fromkeys(("Plan", "plan"), "pefc.planner"),
    **dict.fromkeys(("BakeableModule", "RewriteContext", "SiteModule"), "pefc.rewrite"),
    **dict.fromkeys(("extend_attention_mask", "offset_positions", "position_edges", "prepend_kv",
                     "prepend_sequence"), "pefc.sequence"),
    **dict.fromkeys(("ActivationSite", "AttentionSite", "EmbeddingSite", "LinearSite", "Site"), "pefc.sites"),
    **dict.fromkeys(("Spec", "load_spec", "parse_spec"), "pefc.spec"),
    "selector_matches": "pefc.targets",
}

__all__ = [
    "ActivationSite", "AdapterConfig", "AttentionSite", "BakeableModule", "CaptureError", "CheckpointError",
    "CompiledModel", "EmbeddingSite", "ExportError", "LinearSite", "Method", "ModelSourceError",
    "NumericalError", "PefcError", "Plan", "PluginError", "RewriteContext", "Site", "SiteModule", "Spec",
    "SpecError", "TargetError", "VerificationError", "compile", "export_onnx", "extend_attention_mask",
    "hookimpl", "interop", "load_spec", "offset_positions", "parse_spec", "plan", "position_edges",
    "prepend_kv", "prepend_sequence", "selector_matches",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pefc' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "interop":
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from pefc import interop
    from pefc.compiled import CompiledModel
    from pefc.compiler import compile
    from pefc.config import AdapterConfig
    from pefc.errors import (
        CaptureError,
        CheckpointError,
        ExportError,
        ModelSourceError,
        NumericalError,
        PefcError,
        PluginError,
        SpecError,
        TargetError,
        VerificationError,
    )
    from pefc.export import export_onnx
    from pefc.hookspecs import hookimpl
    from pefc.method import Method
    from pefc.planner import Plan, plan
    from pefc.rewrite import BakeableModule, RewriteContext, SiteModule
    from pefc.sequence import (
        extend_attention_mask,
        offset_positions,
        position_edges,
        prepend_kv,
        prepend_sequence,
    )
    from pefc.sites import ActivationSite, AttentionSite, EmbeddingSite, LinearSite, Site
    from pefc.spec import Spec, load_spec, parse_spec
    from pefc.targets import selector_matches
