"""Builds the base model and the example inputs a spec describes."""

from __future__ import annotations

import importlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pefc.errors import ModelSourceError
from pefc.spec import InputSpec, ModelSpec, SpecBase


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def build_model(model: ModelSpec, *, device: str | None = None) -> nn.Module:
    """Instantiate ``spec.model`` on ``device`` (default: the spec's), seeded, in its dtype."""
    device = device or model.device
    torch.manual_seed(model.seed)
    context = torch.device("meta") if device == "meta" else nullcontext()
    with context:
        module = _build_hf(model) if model.hf is not None else _build_python(model)
    if not isinstance(module, nn.Module):
        raise ModelSourceError(f"the model source returned {type(module).__name__}, not a torch.nn.Module")
    if device != "meta":
        module = _move(module, device, torch_dtype(model.dtype))
    else:
        module = module.to(torch_dtype(model.dtype))
    return module


def _move(module: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"the spec asks for device {device!r} but CUDA is not available here",
                               hint="set model.device: cpu, or run on a machine with a GPU")
    return module.to(device=device, dtype=dtype)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelSourceError("model.hf needs transformers; install pefc[hf]") from None
    return transformers


def _build_hf(model: ModelSpec) -> nn.Module:
    transformers = _transformers()
    hf = model.hf
    assert hf is not None
    if hf.pretrained is not None:
        return _load_pretrained(transformers, Path(hf.pretrained), hf.class_, model.dtype, hf.attn_implementation)
    cls = _hf_class(transformers, hf.class_)
    config_cls = getattr(cls, "config_class", None)
    if config_cls is None:
        raise ModelSourceError(f"transformers.{hf.class_} has no config_class")
    try:
        config = config_cls(**hf.config)
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"model.hf.config is not a valid {config_cls.__name__}: {exc}") from None
    config._attn_implementation = attn_implementation(cls, hf.attn_implementation)
    try:
        return cls(config)
    except Exception as exc:
        raise ModelSourceError(f"transformers.{hf.class_}(config) failed: {type(exc).__name__}: {exc}") from None


def attn_implementation(cls: type, asked: str | None) -> str:
    """The attention implementation to build ``cls`` with: ``asked``, else sdpa where the class has it, else eager."""
    if asked is not None:
        if asked == "sdpa" and getattr(cls, "_supports_sdpa", True) is False:
            raise ModelSourceError(f"model.hf.attn_implementation: {cls.__name__} has no sdpa attention",
                                   hint="use attn_implementation: eager, or leave it out")
        return asked
    return "sdpa" if getattr(cls, "_supports_sdpa", True) is not False else "eager"


def _hf_class(transformers: Any, name: str | None) -> type[nn.Module]:
    cls = getattr(transformers, name or "", None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelSourceError(f"model.hf.class: transformers has no model class {name!r}",
                               hint="use a class name such as LlamaForCausalLM, GPT2LMHeadModel or BertModel")
    return cls


def _load_pretrained(transformers: Any, path: Path, class_name: str | None, dtype: str,
                     attention: str | None = None) -> nn.Module:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"model.hf.pretrained: {path} has no config.json",
                               hint="point it at a directory written by save_pretrained")
    if class_name is None:
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ModelSourceError(f"{config_file} is not readable JSON: {exc}") from None
        architectures = (config.get("architectures") if isinstance(config, dict) else None) or []
        if not architectures:
            raise ModelSourceError(f"{config_file} names no architectures; set model.hf.class")
        class_name = architectures[0]
    cls = _hf_class(transformers, class_name)
    try:
        return cls.from_pretrained(str(path), local_files_only=True, attn_implementation=attn_implementation(cls, attention),
                                   dtype=torch_dtype(dtype), use_safetensors=True)
    except Exception as exc:
        raise ModelSourceError(f"cannot load {class_name} from {path}: {type(exc).__name__}: {exc}") from None


def _build_python(model: ModelSpec) -> nn.Module:
    assert model.python is not None
    module_name, _, attr = model.python.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise ModelSourceError(f"model.python: cannot import {model.python!r}: {exc}") from None
    try:
        return factory(**model.kwargs)
    except Exception as exc:
        raise ModelSourceError(f"model.python: {model.python}(**kwargs) failed: {type(exc).__name__}: {exc}") from None


def example_inputs(spec: SpecBase, *, device: str | torch.device = "cpu", seed: int = 0,
                   sizes: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Random tensors matching ``spec.inputs``; named dims take ``sizes`` (default: the capture's)."""
    dims = {**spec.dims(), **(sizes or {})}
    generator = torch.Generator().manual_seed(seed)
    return {name: make_input(value, dims, generator).to(device) for name, value in spec.inputs.items()}


def make_input(spec: InputSpec, dims: dict[str, int], generator: torch.Generator) -> torch.Tensor:
    shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
    dtype = torch_dtype(spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    high = spec.high if spec.high is not None else spec.low + 2
    return torch.randint(spec.low, high, shape, generator=generator, dtype=dtype)
