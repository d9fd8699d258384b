"""pefc: a plugin-based compiler for parameter-efficient fine-tuning specs.

>>> import pefc
>>> spec = pefc.load_spec("specs/llama-lora.yaml")
>>> cm = pefc.compile(spec)
>>> cm.parameter_report()
"""

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

__version__ = "0.1.0"

__all__ = [
    "ActivationSite", "AdapterConfig", "AttentionSite", "BakeableModule", "CaptureError", "CheckpointError",
    "CompiledModel", "EmbeddingSite", "ExportError", "LinearSite", "Method", "ModelSourceError", "NumericalError", "PefcError",
    "Plan", "PluginError", "RewriteContext", "Site", "SiteModule", "Spec", "SpecError", "TargetError",
    "VerificationError", "compile", "export_onnx", "extend_attention_mask", "hookimpl", "interop", "load_spec",
    "offset_positions", "parse_spec", "plan", "position_edges", "prepend_kv", "prepend_sequence", "selector_matches",
]
