"""What the compiler knows about a compiled model beyond its graph (``CompiledModel.pefc``).

A leaf module: passes over a compiled model (:mod:`pefc.merge`, :mod:`pefc.distributed`) read
the state without importing :mod:`pefc.compiled`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pefc.rewrite import Insertion


@dataclass
class CompileState:
    """What the compiler knows about a CompiledModel beyond its graph."""

    spec: Any
    insertions: list[Insertion]
    base_params: int
    mergeable: dict[str, bool]
    base_node_count: int
    formula_params: dict[str, int | None] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    #: the base model: ``class`` and, for transformers models, ``name_or_path``, ``vocab_size`` and
    #: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (used by generate and HF PEFT interop)
    base_info: dict[str, Any] = field(default_factory=dict)
    #: base parameters trained in full (the spec's ``modules_to_save``): name -> module path
    saved_params: dict[str, str] = field(default_factory=dict)
    #: passes over the code the model runs, not over its graph (:mod:`pefc.lowering`)
    lowerings: list[Any] = field(default_factory=list)

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.spec.adapters]
