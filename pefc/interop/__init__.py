"""Interoperability with other PEFT tools: :mod:`pefc.interop.peft` (HF PEFT checkpoints)."""

from pefc.interop import peft

__all__ = ["peft"]
