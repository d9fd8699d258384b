"""Interoperability with other PEFT tools (HF PEFT)."""
