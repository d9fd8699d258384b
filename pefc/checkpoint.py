"""Adapter checkpoints: ``adapters.safetensors`` (+ ``spec.json``), never pickle.

The safetensors metadata carries the spec the adapters were compiled from and a SHA-256
digest of every tensor, so the tensor file alone says what it fits and whether its bytes
are intact; loading reads only that file, in one read (never a memory map reopened by name,
which a concurrent save could swap underneath). ``spec.json`` is the same spec for people
and tools. A save writes ``spec.json`` first and ``adapters.safetensors`` last, each atomically
(temporary file, then rename), under an advisory lock on the directory so concurrent
writers take turns: a save killed midway leaves the previous checkpoint or none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from pefc.atomic import atomic_path, locked_directory, write_text
from pefc.errors import CheckpointError

ADAPTERS_FILE = "adapters.safetensors"
SPEC_FILE = "spec.json"
FORMAT = "pefc.adapters/1"
DIGESTS_KEY = "tensor_sha256"


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], spec_json: str,
                    extra: dict[str, str] | None = None) -> Path:
    """Write ``directory/spec.json`` then ``directory/adapters.safetensors``, each atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    flat = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    digests = json.dumps({name: tensor_digest(t) for name, t in flat.items()}, sort_keys=True)
    metadata = {"format": FORMAT, "spec": spec_json, DIGESTS_KEY: digests, **(extra or {})}
    directory.mkdir(parents=True, exist_ok=True)
    with locked_directory(directory):
        write_text(directory / SPEC_FILE, spec_json + "\n")
        with atomic_path(directory / ADAPTERS_FILE) as tmp:
            save_file(flat, str(tmp), metadata=metadata)
    return directory


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and the embedded spec (as a dict) from a checkpoint directory or file."""
    tensors, metadata, file = read_checkpoint_file(directory)
    return tensors, metadata_spec(file, metadata)


def read_checkpoint_file(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Tensors (digests checked) and metadata of a pefc checkpoint, and the file they came from."""
    path = Path(directory)
    file = path / ADAPTERS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no adapter checkpoint at {file}",
                              hint="`pefc compile SPEC -o DIR` or `CompiledModel.save_adapters(DIR)` writes one")
    try:
        data = file.read_bytes()  # one read of one file: a writer replacing it meanwhile cannot mix two versions
        metadata = _header_metadata(data)
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); it may be truncated, "
                              "corrupted or in another format (pefc never loads pickle files)") from None
    if metadata.get("format") != FORMAT or "spec" not in metadata:
        raise CheckpointError(f"{file} is a safetensors file but not a pefc adapter checkpoint "
                              f"(metadata format {metadata.get('format')!r})",
                              hint="HF PEFT checkpoints are read with pefc.interop.peft.load / `pefc import-peft`")
    check_digests(file, tensors, metadata)
    return tensors, metadata, file


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"header of {size} bytes in a file of {len(data)}")
    header = json.loads(data[8:8 + size])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("malformed header metadata")
    return metadata


def metadata_spec(file: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The spec embedded in a checkpoint's metadata, checked to be a spec with a list of named adapters."""
    try:
        spec = json.loads(metadata["spec"])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{file}: the embedded spec is not valid JSON") from None
    adapters = spec.get("adapters") if isinstance(spec, dict) else None
    if not isinstance(adapters, list) or not all(isinstance(a, dict) and isinstance(a.get("name"), str)
                                                 for a in adapters):
        raise CheckpointError(f"{file}: the embedded spec has no list of named adapters; the file is corrupted")
    return spec


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes (any dtype, bfloat16 included)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def check_digests(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse tensors whose bytes differ from the digests saved with them (older files carry none)."""
    if DIGESTS_KEY not in metadata:
        return
    try:
        digests = json.loads(metadata[DIGESTS_KEY])
    except (json.JSONDecodeError, RecursionError):
        digests = None
    if not isinstance(digests, dict):
        raise CheckpointError(f"{file}: the tensor digests in its metadata are unreadable; the file is corrupted")
    for name, tensor in tensors.items():
        if name not in digests:
            raise CheckpointError(f"{file}: tensor {name!r} has no saved digest; the file is corrupted")
        if tensor_digest(tensor) != digests[name]:
            raise CheckpointError(f"{file}: tensor {name!r} does not match the digest saved with it; "
                                  "the file is corrupted")


def check_tensor_fits(where: str, key: str, value: torch.Tensor, target: torch.Tensor, *,
                      holder: str = "the model", hint: str = "", same_dtype: bool = True) -> None:
    """Refuse checkpoint tensor ``value`` for ``target`` (in ``holder``): another shape, another dtype
    (with ``same_dtype``), or NaN / Inf values. ``hint`` follows the shape message."""
    if tuple(value.shape) != tuple(target.shape):
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(value.shape)} in the checkpoint but "
                              f"{list(target.shape)} in {holder}{hint}")
    if same_dtype and value.dtype != target.dtype:
        raise CheckpointError(f"{where}: tensor {key!r} is {value.dtype} in the checkpoint but "
                              f"{target.dtype} in {holder}")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CheckpointError(f"{where}: tensor {key!r} holds NaN or Inf values")


def other_model_note(metadata: dict[str, str], spec: dict[str, Any], base_class: str | None,
                     base_params: int) -> str:
    """``"; it was saved for X (N base params), this model is Y (M)"`` when the base models differ, else ``""``."""
    saved_class = metadata.get("base_class") or _spec_model_class(spec)
    saved_params = metadata.get("base_params", "")
    same_class = not saved_class or not base_class or saved_class == base_class
    same_params = not saved_params.isdigit() or int(saved_params) == base_params
    if same_class and same_params:
        return ""
    saved = f"{saved_class or 'another model'}" + (f" ({int(saved_params):,} base params)" if saved_params.isdigit()
                                                  else "")
    return f"; the checkpoint was saved for {saved}, this model is {base_class or 'another'} ({base_params:,})"


def _spec_model_class(spec: dict[str, Any]) -> str | None:
    model = spec.get("model")
    if not isinstance(model, dict):
        return None
    hf = model.get("hf")
    if isinstance(hf, dict):
        return hf.get("class") or hf.get("pretrained")
    python = model.get("python")
    return python if isinstance(python, str) else None
