"""HF PEFT interop: PEFT checkpoints in and out, and the equivalent ``peft`` config of an adapter.

>>> cm = pefc.interop.peft.load("peft_dir", base_model)   # adapter_config.json + adapter_model.safetensors
>>> pefc.interop.peft.save(cm, "out_dir")                  # PeftModel.from_pretrained(base, "out_dir") loads it

Supported: LoRA (``use_dora``, ``use_rslora``, ``rank_pattern`` / ``alpha_pattern``,
``layers_to_transform``, ``target_modules`` as a list or a regex), IA3
(``feedforward_modules``), prefix tuning (with or without ``prefix_projection``; PEFT saves
the projected table, so the imported adapter is a plain prefix) and prompt tuning. Only
safetensors are read and written. ``peft`` itself is needed only by :func:`peft_config`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from pefc.errors import CheckpointError, PefcError, SpecError
from pefc.interop.peft_files import (
    CONFIG_FILE,
    PeftCheckpoint,
    check_supported,
    read_peft_dir,
    write_peft_dir,
)
from pefc.interop.peft_load import adapter_entry, exact_entry, method_of, pefc_tensors, saved_modules
from pefc.interop.peft_save import PEFT_METHODS, adapter_of, peft_adapter, task_type
from pefc.schema import ModelSpec

if TYPE_CHECKING:
    from pefc.compiled import CompiledModel

__all__ = ["PEFT_METHODS", "load", "local_base_model", "peft_config", "save", "task_type"]


def load(peft_dir: str | Path, base_model: nn.Module | None = None, *, name: str | None = None,
         model_spec: ModelSpec | dict[str, Any] | None = None, inputs: dict[str, Any] | None = None,
         example_inputs: dict[str, torch.Tensor] | None = None, trust_code: bool = False) -> CompiledModel:
    """Compile ``base_model`` with the adapter of the PEFT checkpoint in ``peft_dir`` and load its tensors.

    The returned model (in eval mode, as ``PeftModel.from_pretrained``) computes what the
    ``PeftModel`` computes. Without ``base_model`` the base is built from ``model_spec``
    (the spec's ``model`` section), else from ``base_model_name_or_path`` when that is a
    local directory with a ``config.json``; ``model_spec`` is also written into the spec.
    ``name`` names the pefc adapter (default: the method). Transformers models get the
    inputs ``input_ids`` and ``attention_mask`` ``[batch, seq]`` (encoder-decoders also
    ``decoder_input_ids`` ``[batch, target]``; vision models ``pixel_values``
    ``[batch, channels, size, size]``); other modules need
    ``inputs`` (the spec's ``inputs``) and ``example_inputs``. ``trust_code=True`` consents to
    import and call a ``model_spec``'s ``python`` factory (:mod:`pefc.trust`).
    """
    from pefc.compiler import compile, compile_built

    checkpoint = read_peft_dir(peft_dir)
    check_supported(checkpoint)
    method = method_of(checkpoint)
    built = base_model is None  # built here from model_spec: compiled as the spec's model (capture cache)
    base_model, model_spec = _base(checkpoint, base_model, model_spec, trust_code)
    checkpoint, head_tensors, heads = saved_modules(checkpoint, base_model)
    name = name or method
    if method == "prefix":
        _warn_sliding_window(base_model)
    entry, modules = adapter_entry(checkpoint, base_model, name, method)

    def compiled(spec: Any) -> CompiledModel:
        if built and example_inputs is None:
            return compile_built(spec, base_model)
        return compile(spec, model=base_model, example_inputs=example_inputs)

    model = compiled(_spec(entry, base_model, model_spec, inputs, heads))
    if modules and {i.site_path for i in model.pefc.insertions} != set(modules):  # selectors picked others
        model = compiled(_spec(exact_entry(entry, modules), base_model, model_spec, inputs, heads))
    _copy_in(model, {**pefc_tensors(checkpoint, model, name, method), **head_tensors})
    return model.eval()


def save(model: CompiledModel, peft_dir: str | Path, *, adapter: str | None = None,
         base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapter as an HF PEFT checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(base, peft_dir)`` then computes what ``model`` computes.
    Refuses what PEFT cannot express: several adapters (unless ``adapter`` picks one), a
    method PEFT lacks (bottleneck ``adapter``), a merged adapter, a prefix on some layers only.
    """
    config = adapter_of(model, adapter)
    fields, tensors = peft_adapter(model, config)
    fields["base_model_name_or_path"] = base_model_name_or_path or _base_name(model)
    fields["revision"] = None
    return write_peft_dir(peft_dir, fields, tensors)


def peft_config(model: CompiledModel, adapter: str, *, base_class: str | None = None) -> Any:
    """The ``peft`` config equivalent to adapter ``adapter`` of ``model``, for training (same sites, same math)."""
    peft = _peft()
    fields, _ = peft_adapter(model, adapter_of(model, adapter), projection=True)
    if base_class:
        fields["task_type"] = task_type(base_class) or fields["task_type"]
    fields["inference_mode"] = False
    return peft.get_peft_config(fields)


def local_base_model(checkpoint: PeftCheckpoint | str | Path) -> ModelSpec:
    """``model: {hf: {pretrained: DIR}}`` from ``base_model_name_or_path`` when DIR is local (no download)."""
    if not isinstance(checkpoint, PeftCheckpoint):
        checkpoint = read_peft_dir(checkpoint)
    name = checkpoint.config.get("base_model_name_or_path")
    for candidate in ([Path(name), checkpoint.directory / name] if name else []):
        if (candidate / "config.json").is_file():
            return ModelSpec.model_validate({"hf": {"pretrained": str(candidate.resolve())}})
    raise CheckpointError(
        f"{checkpoint.directory / CONFIG_FILE}: base_model_name_or_path {name!r} is not a local directory with a "
        "config.json (pefc never downloads models)",
        hint="give the base model: load(peft_dir, base_model) or model_spec=...; "
             "on the command line --base DIR or --model-spec FILE")


def _base(checkpoint: PeftCheckpoint, base: nn.Module | None,
          model_spec: ModelSpec | dict[str, Any] | None, trust_code: bool = False) -> tuple[nn.Module, ModelSpec | None]:
    """The base model (given, or built from ``model_spec`` or the checkpoint's local base) and its spec."""
    from pefc.source import build_model

    if base is None and model_spec is None:
        model_spec = local_base_model(checkpoint)
    if isinstance(model_spec, dict):
        try:
            model_spec = ModelSpec.model_validate(model_spec)
        except ValidationError as exc:
            raise SpecError("model_spec is not a valid `model` section",
                            issues=[f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    if base is None:
        assert model_spec is not None
        base = build_model(model_spec, trust_code=trust_code)
    return base, model_spec


def _spec(entry: dict[str, Any], base: nn.Module, model_spec: ModelSpec | None,
          inputs: dict[str, Any] | None, modules_to_save: list[str]) -> Any:
    from pefc.spec import parse_spec

    data: dict[str, Any] = {"version": 1, "inputs": inputs or _hf_inputs(base), "adapters": [entry]}
    if modules_to_save:
        data["modules_to_save"] = modules_to_save
    if model_spec is not None:
        data["model"] = model_spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return parse_spec(data)


def _hf_inputs(base: nn.Module) -> dict[str, Any]:
    """``input_ids`` + optional ``attention_mask`` for a text model (plus ``decoder_input_ids`` for an
    encoder-decoder), or ``pixel_values`` for a vision one."""
    config = getattr(base, "config", None)
    vocab = getattr(config, "vocab_size", None)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if not vocab and size and isinstance(channels, int):
        height, width = (size, size) if isinstance(size, int) else size  # position embeddings fix the size
        dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
        return {"pixel_values": {"shape": ["batch", channels, int(height), int(width)], "dtype": dtype}}
    if not vocab:
        raise PefcError(f"{type(base).__name__} is not a transformers model: pass inputs= (the spec's `inputs`) "
                        "and example_inputs= to pefc.interop.peft.load")
    inputs = {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": int(vocab)},
              "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2, "optional": True}}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = {"shape": ["batch", "target"], "dtype": "int64", "high": int(vocab)}
    return inputs


def _warn_sliding_window(base: nn.Module) -> None:
    config = getattr(base, "config", None)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        warnings.warn(f"{type(base).__name__} uses sliding-window attention (sliding_window={window}): pefc lets "
                      "every query see every prefix slot, HF masks the slots outside the window, so outputs differ "
                      "once prefix + sequence length exceeds the window", stacklevel=3)


def _copy_in(model: CompiledModel, tensors: dict[str, torch.Tensor]) -> None:
    own = model.adapter_state_dict()
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CheckpointError(f"the PEFT checkpoint has no tensor for pefc parameter {missing[0]!r}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


def _base_name(model: CompiledModel) -> str | None:
    source = getattr(model.pefc.spec, "model", None)
    if source is not None and source.hf is not None and source.hf.pretrained:
        return source.hf.pretrained
    return model.pefc.base_info.get("name_or_path")


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise PefcError("this needs the `peft` package (pip install peft)") from None
    return peft
