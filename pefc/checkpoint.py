"""Adapter checkpoints: ``adapters.safetensors`` (+ ``spec.json``), never pickle.

The safetensors metadata carries the spec the adapters were compiled from, so the tensor
file alone says what it fits; ``spec.json`` is the same spec for people and tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pefc.atomic import atomic_path, write_text
from pefc.errors import CheckpointError

ADAPTERS_FILE = "adapters.safetensors"
SPEC_FILE = "spec.json"
FORMAT = "pefc.adapters/1"


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], spec_json: str,
                    extra: dict[str, str] | None = None) -> Path:
    """Write ``directory/adapters.safetensors`` and ``directory/spec.json`` atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    metadata = {"format": FORMAT, "spec": spec_json, **(extra or {})}
    flat = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(directory / ADAPTERS_FILE) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
    write_text(directory / SPEC_FILE, spec_json + "\n")
    return directory


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and the embedded spec (as a dict) from a checkpoint directory or file."""
    path = Path(directory)
    file = path / ADAPTERS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no adapter checkpoint at {file}",
                              hint="`pefc compile SPEC -o DIR` or `CompiledModel.save_adapters(DIR)` writes one")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); it may be truncated, "
                              "corrupted or in another format (pefc never loads pickle files)") from None
    if metadata.get("format") != FORMAT or "spec" not in metadata:
        raise CheckpointError(f"{file} is a safetensors file but not a pefc adapter checkpoint "
                              f"(metadata format {metadata.get('format')!r})",
                              hint="HF PEFT checkpoints are read with pefc.interop.peft.load / `pefc import-peft`")
    try:
        spec = json.loads(metadata["spec"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{file}: the embedded spec is not valid JSON") from None
    return tensors, spec
