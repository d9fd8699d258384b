"""Merged transformers checkpoints: fold every adapter and write a ``save_pretrained`` directory.

``cm.save_merged(dir)`` (and ``pefc export-hf SPEC --adapters DIR -o HF_DIR``) writes
``config.json``, ``model.safetensors`` and ``generation_config.json`` of the base
architecture with the folded weights, so vLLM, TGI, llama.cpp's converter or
``AutoModelForCausalLM.from_pretrained`` load the fine-tuned model with no pefc at run time.
A spec with a method that cannot be folded (prefix, prompt, adapter) is refused by name.
The directory appears whole or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pefc.atomic import remove_stale_temporaries, temp_prefix
from pefc.errors import ExportError


def save_merged(model: Any, directory: str | Path) -> Path:
    """Write ``model`` with every adapter folded as a transformers ``save_pretrained`` directory."""
    _refuse_unmergeable(model)
    merged = model.merge()
    base = _merged_base(merged)
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        base.save_pretrained(tmp, safe_serialization=True)
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _refuse_unmergeable(model: Any) -> None:
    state = model.pefc
    bad = [f"{a.name!r} ({a.method})" for a in state.spec.adapters if not state.mergeable.get(a.method, False)]
    if bad:
        raise ExportError(f"cannot merge adapter{'s' if len(bad) > 1 else ''} {', '.join(bad)} into the base "
                          "weights: a merged transformers checkpoint holds mergeable methods only",
                          hint="export ONNX with `pefc export --no-merge`, or keep the adapters with save_adapters")
    if state.base_info.get("hf_config") is None:
        raise ExportError(f"{state.base_info.get('class')} is not a transformers model; save_merged writes "
                          "a transformers checkpoint")


def _merged_base(merged: Any) -> Any:
    """A fresh base model of ``merged``'s architecture holding ``merged``'s (folded) tensors."""
    import torch

    from pefc.kvcache import rebuild_base

    with torch.random.fork_rng(devices=[]):
        base = rebuild_base(merged)
    own = merged.state_dict()
    state = base.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise ExportError(f"the merged model has no tensor {missing[0]!r} of {type(base).__name__} "
                          f"({len(missing)} missing)")
    base.load_state_dict({k: own[k] for k in state}, strict=True)
    info = merged.pefc.base_info
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if info.get(key) is not None and getattr(base, "generation_config", None) is not None:
            setattr(base.generation_config, key, info[key])
    return base


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` directory onto ``target`` (replacing an older one)."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
