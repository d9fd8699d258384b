"""The files of an HF PEFT checkpoint directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only safetensors are read or written (never ``adapter_model.bin``, which is a pickle).
Tensor keys drop PEFT's ``base_model.model.`` prefix on reading; :func:`peft_key` adds it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pefc.atomic import atomic_path, write_text
from pefc.errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

#: config keys whose non-empty value asks for something pefc cannot express, per PEFT type
UNSUPPORTED = {
    "LORA": ("layer_replication", "target_parameters", "trainable_token_indices",
             "alora_invocation_tokens", "use_qalora", "use_bdlora", "lora_bias", "megatron_config",
             "arrow_config"),
}


@dataclass
class PeftCheckpoint:
    """A PEFT directory read into memory: its config and tensors (keys without ``base_model.model.``)."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))

    @property
    def weights_file(self) -> Path:
        return self.directory / WEIGHTS_FILE

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def required(self, key: str) -> Any:
        if self.config.get(key) is None:
            raise CheckpointError(f"{self.directory / CONFIG_FILE} has no `{key}`")
        return self.config[key]


def read_peft_dir(directory: str | Path) -> PeftCheckpoint:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` from ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected an HF PEFT checkpoint written by "
                              "save_pretrained)")
    config = _read_config(directory / CONFIG_FILE)
    return PeftCheckpoint(directory, config, _read_tensors(directory))


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {CONFIG_FILE}; is it an HF PEFT checkpoint?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{path} has no `peft_type`; is it an HF PEFT adapter config?")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickled = (directory / PICKLE_FILE).is_file()
        raise CheckpointError(
            f"{directory} has no {WEIGHTS_FILE}" + (f" (only {PICKLE_FILE}, a pickle, which pefc never loads)"
                                                    if pickled else ""),
            hint="re-save the adapter with save_pretrained(..., safe_serialization=True)" if pickled else None)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {_strip(key): handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def check_supported(checkpoint: PeftCheckpoint) -> None:
    """Refuse config options pefc cannot express, naming the key and the file."""
    where = checkpoint.directory / CONFIG_FILE
    for key in UNSUPPORTED.get(checkpoint.peft_type, ()):
        if checkpoint.config.get(key):
            raise CheckpointError(f"{where}: `{key}: {checkpoint.config[key]!r}` has no pefc equivalent; "
                                  f"pefc imports {checkpoint.peft_type} adapters without it")
    bias = checkpoint.config.get("bias", "none")
    if checkpoint.peft_type == "LORA" and bias not in (None, "none"):
        raise CheckpointError(f"{where}: `bias: {bias!r}` (trained base biases) has no pefc equivalent; "
                              "pefc imports LoRA with bias: none")
    submodules = checkpoint.get("num_transformer_submodules", 1)
    if submodules != 1 and not (submodules == 2 and checkpoint.peft_type == "PREFIX_TUNING"):
        raise CheckpointError(f"{where}: num_transformer_submodules is "
                              f"{checkpoint.config['num_transformer_submodules']} (an encoder-decoder model); "
                              "pefc imports prefix tuning on encoder-decoders, prompt tuning on one stack of layers")


def peft_key(module_path: str, leaf: str) -> str:
    """PEFT's saved name of tensor ``leaf`` of the adapter layer wrapping ``module_path``."""
    return f"{PREFIX}{module_path}.{leaf}"


def write_peft_dir(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` (JSON) and ``tensors`` (safetensors, keys as given) into ``directory``, atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    flat = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(flat, str(tmp), metadata={"format": "pt"})
    write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
