"""Builds the base model and the example inputs a spec describes."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pefc.errors import ModelSourceError
from pefc.hfcheck import read_pretrained_config
from pefc.ramcheck import check_fits, tensor_bytes
from pefc.schema import InputSpec, ModelSpec, SpecBase
from pefc.trust import require_consent


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def build_model(model: ModelSpec, *, device: str | None = None, trust_code: bool = False) -> nn.Module:
    """Instantiate ``spec.model`` on ``device`` (default: the spec's), seeded, in its dtype.

    A ``python`` source runs only with consent (``trust_code`` or :mod:`pefc.trust`); an ``hf``
    source is first built on the meta device to check that its weights fit in memory.
    """
    device = device or model.device
    require_consent(model, trust_code)
    dtype = torch_dtype(model.dtype)
    if device != "meta" and model.hf is not None:
        check_fits(tensor_bytes(_meta_twin(model, dtype)), f"{_name(model)} in {model.dtype}")
    torch.manual_seed(model.seed)
    module = _build(model, device, dtype)
    if not isinstance(module, nn.Module):
        raise ModelSourceError(f"the model source returned {type(module).__name__}, not a torch.nn.Module")
    return _move(module, device, dtype) if device != "meta" else module.to(dtype)


def _build(model: ModelSpec, device: str, dtype: torch.dtype) -> Any:
    """The model source's module, created in ``dtype`` (no float32 copy first)."""
    context = torch.device("meta") if device == "meta" else nullcontext()
    with context, _default_dtype(dtype):
        return _build_hf(model) if model.hf is not None else _build_python(model)


def _meta_twin(model: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The ``hf`` model on the meta device (a pretrained one from its config alone): no weights read."""
    hf = model.hf
    assert hf is not None
    if hf.pretrained is None:
        return _build(model, "meta", dtype)
    transformers = _transformers()
    path = Path(hf.pretrained)
    values = read_pretrained_config(path)
    cls = _hf_class(transformers, hf.class_ or _architecture(path, values))
    try:
        config = cls.config_class.from_dict(values)  # the config.json already read (and checked), no hub lookup
        with torch.device("meta"), _default_dtype(dtype):
            return cls(config)
    except Exception as exc:
        raise ModelSourceError(f"cannot load {cls.__name__} from {path}: {type(exc).__name__}: {exc}") from None


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _name(model: ModelSpec) -> str:
    hf = model.hf
    return (hf.class_ or f"the model in {hf.pretrained}") if hf is not None else str(model.python)


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
    config = read_pretrained_config(path)
    class_name = class_name or _architecture(path, config)
    cls = _hf_class(transformers, class_name)
    try:
        return cls.from_pretrained(str(path), local_files_only=True, attn_implementation=attn_implementation(cls, attention),
                                   dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelSourceError(f"cannot load {class_name} from {path}: {type(exc).__name__}: {exc}") from None


def _architecture(path: Path, config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if not architectures:
        raise ModelSourceError(f"{path / 'config.json'} names no architectures; set model.hf.class")
    return str(architectures[0])


def _build_python(model: ModelSpec) -> nn.Module:
    assert model.python is not None
    module_name, _, attr = model.python.partition(":")
    try:
        factory: Any = _import(module_name, model._origin.folder)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        where = f" (looked in the spec's folder {model._origin.folder} first, then sys.path)" if model._origin.folder else ""
        raise ModelSourceError(f"model.python: cannot import {model.python!r}: {exc}{where}",
                               hint=f"put {module_name.split('.')[0]}.py next to the spec, or make the module "
                                    "importable (pip install -e, or PYTHONPATH)") from None
    try:
        return factory(**model.kwargs)
    except Exception as exc:
        raise ModelSourceError(f"model.python: {model.python}(**kwargs) failed: {type(exc).__name__}: {exc}") from None


def _import(module_name: str, folder: str | None) -> Any:
    """Import ``module_name``, looking in ``folder`` (the spec's) before ``sys.path``."""
    if folder is None:
        return importlib.import_module(module_name)
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(module_name)
    finally:
        with suppress(ValueError):
            sys.path.remove(folder)


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
