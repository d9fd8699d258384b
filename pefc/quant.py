"""Quantized bases: NF4 (QLoRA) and int8 weight-only linears, dequantized in the graph.

``model.quantize`` replaces each ``nn.Linear`` of the base (but ``skip``) by a
:class:`QuantizedLinear` before capture. Its weight is stored as buffers, quantized with torchao
(``to_nf4``: QLoRA's 16-value normal-float codebook, absmax per block of ``block_size`` weights,
the absmaxes themselves quantized to int8 per ``scaler_block_size`` blocks; int8: symmetric per
output row). Its forward dequantizes them with plain aten ops (shifts, a codebook gather,
products) and calls ``F.linear``, so the captured graph shows ``aten.linear`` whose weight
operand traces back to the ``weight_nf4`` / ``weight_int8`` buffer (see
:func:`pefc.sites.find_sites`), and the model exports to ONNX as it is. Dequantizing needs no
torchao; quantizing does (``pip install pefc[quant]``).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pefc.errors import SpecError

if TYPE_CHECKING:
    from pefc.schema import QuantizeSpec, SpecBase
    from pefc.sites import LinearSite, Site


@dataclass(frozen=True)
class Format:
    """One storage format: its buffer names (the first holds the codes) and how it dequantizes."""

    name: str
    buffers: tuple[str, ...]
    dequantize: Callable[[dict[str, torch.Tensor], tuple[int, int]], torch.Tensor]


def _dequantize_nf4(b: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Codes -> codebook values, times each block's absmax (itself int8 / factor + mean)."""
    codebook = b["weight_nf4_codebook"]
    factor = b["weight_nf4_factor"]
    scalers = b["weight_nf4_scalers"].to(factor.dtype).view(factor.shape[0], -1) / factor.unsqueeze(-1)
    scalers = scalers.flatten() + b["weight_nf4_mean"]
    packed = b["weight_nf4"]
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).flatten().to(torch.int64)
    values = codebook[codes].view(scalers.shape[0], -1) * scalers.to(codebook.dtype).unsqueeze(-1)
    return values.view(shape)


def _dequantize_int8(b: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    scale = b["weight_int8_scale"]
    return b["weight_int8"].to(scale.dtype) * scale.unsqueeze(-1)


FORMATS: dict[str, Format] = {
    "nf4": Format("nf4", ("weight_nf4", "weight_nf4_scalers", "weight_nf4_factor", "weight_nf4_mean",
                          "weight_nf4_codebook"), _dequantize_nf4),
    "int8": Format("int8", ("weight_int8", "weight_int8_scale"), _dequantize_int8),
}


def format_of_buffer(name: str) -> tuple[Format, str] | None:
    """``(format, module prefix)`` when ``name`` is the codes buffer of a quantized weight."""
    for fmt in FORMATS.values():
        prefix, _, leaf = name.rpartition(".")
        if leaf == fmt.buffers[0]:
            return fmt, prefix
    return None


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored quantized and dequantized (to ``compute_dtype``) in forward.

    The input is cast to the compute dtype for the product and the output back to the input's dtype.
    """

    def __init__(self, method: str, in_features: int, out_features: int, buffers: dict[str, torch.Tensor],
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.method, self.in_features, self.out_features = method, in_features, out_features
        for name in FORMATS[method].buffers:
            self.register_buffer(name, buffers[name])
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def stored(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in FORMATS[self.method].buffers}

    def dequantized_weight(self) -> torch.Tensor:
        return FORMATS[self.method].dequantize(self.stored(), (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight()
        bias = self.bias.to(weight.dtype) if self.bias is not None else None
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.method}, in_features={self.in_features}, out_features={self.out_features}"


# --- quantizing ------------------------------------------------------------------------------

def _torchao() -> Any:
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns about each CUDA kernel library a CPU build cannot load
    try:
        from torchao import quantization as nf4tensor  # to_nf4 (torchao.dtypes.nf4tensor before 0.15)
        from torchao.quantization import quant_primitives
    except ImportError:
        raise SpecError("model.quantize needs torchao, which is not installed",
                        hint="pip install pefc[quant]  (or: pip install torchao)") from None
    finally:
        logger.setLevel(level)
    return nf4tensor, quant_primitives


def check_shape(config: QuantizeSpec, path: str, out_features: int, in_features: int) -> None:
    """Raise :class:`SpecError` naming the site when its weight cannot be split into the format's blocks."""
    if config.method != "nf4":
        return
    numel = out_features * in_features
    blocks = numel // config.block_size
    if numel % config.block_size or blocks % config.scaler_block_size:
        raise SpecError(f"model.quantize: site {path!r} has a [{out_features}, {in_features}] weight "
                        f"({numel} values, {blocks} blocks of {config.block_size}); nf4 needs a multiple of "
                        f"block_size ({config.block_size}) values in a multiple of scaler_block_size "
                        f"({config.scaler_block_size}) blocks",
                        hint=f"add {path!r} to model.quantize.skip, or choose smaller block sizes")


def quantize_weight(weight: torch.Tensor, config: QuantizeSpec, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The buffers that store ``weight [out, in]`` in ``config.method`` (shapes only on the meta device)."""
    if weight.is_meta:
        return _meta_buffers(tuple(weight.shape), config, compute_dtype)
    nf4tensor, primitives = _torchao()
    with torch.no_grad():
        if config.method == "nf4":
            nf = nf4tensor.to_nf4(weight.detach().to(compute_dtype), config.block_size, config.scaler_block_size)
            return {"weight_nf4": nf.quantized_data.clone(), "weight_nf4_scalers": nf.quantized_scalers.clone(),
                    "weight_nf4_factor": nf.quantization_factor.clone(),
                    "weight_nf4_mean": torch.as_tensor(nf.scaler_mean).clone(),
                    "weight_nf4_codebook": nf.nf4.to(device=weight.device, dtype=compute_dtype).clone()}
        w = weight.detach().to(compute_dtype)
        block = (1, w.shape[1])
        scale, zero = primitives.choose_qparams_affine(
            w, primitives.MappingType.SYMMETRIC, block, torch.int8, eps=torch.finfo(torch.float32).eps,
            scale_dtype=compute_dtype, zero_point_dtype=torch.int64)
        codes = primitives.quantize_affine(w, block, scale, zero, torch.int8)
        return {"weight_int8": codes, "weight_int8_scale": scale.reshape(-1).to(compute_dtype)}


def _meta_buffers(shape: tuple[int, int], config: QuantizeSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    numel = shape[0] * shape[1]

    def empty(size: Any, kind: torch.dtype) -> torch.Tensor:
        return torch.empty(size, dtype=kind, device="meta")

    if config.method == "nf4":
        blocks = numel // config.block_size
        return {"weight_nf4": empty(numel // 2, torch.uint8), "weight_nf4_scalers": empty(blocks, torch.int8),
                "weight_nf4_factor": empty(blocks // config.scaler_block_size, dtype),
                "weight_nf4_mean": empty((), dtype), "weight_nf4_codebook": empty(16, dtype)}
    return {"weight_int8": empty(shape, torch.int8), "weight_int8_scale": empty(shape[0], dtype)}


def compute_dtype_of(spec: SpecBase) -> torch.dtype:
    assert spec.model is not None and spec.model.quantize is not None
    return getattr(torch, spec.model.quantize.compute_dtype or spec.model.dtype)


def quantize_spec_model(spec: SpecBase, model: nn.Module) -> nn.Module:
    """Apply ``spec.model.quantize`` to ``model`` in place (no-op without it); returns ``model``."""
    config = spec.model.quantize if spec.model is not None else None
    if config is None:
        return model
    skip = set(output_heads(model)) if config.skip is None else _skipped(spec, model, config.skip)
    dtype = compute_dtype_of(spec)
    chosen = [(path, m) for path, m in model.named_modules() if type(m) is nn.Linear and path not in skip]
    for path, linear in chosen:
        check_shape(config, path, linear.out_features, linear.in_features)
    for path, linear in chosen:
        buffers = quantize_weight(linear.weight, config, dtype)
        bias = linear.bias.detach() if linear.bias is not None else None
        replacement = QuantizedLinear(config.method, linear.in_features, linear.out_features, buffers, bias)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
    return model


def output_heads(model: nn.Module) -> list[str]:
    """Module paths of the output head: ``get_output_embeddings()``, and linears tied to an embedding."""
    heads: list[nn.Module] = []
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Linear):
        heads.append(head)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads += [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in tables]
    return [path for path, m in model.named_modules() if any(m is h for h in heads)]


def _skipped(spec: SpecBase, model: nn.Module, selectors: list[str]) -> set[str]:
    """Paths of the linears ``selectors`` (globs, or roles found by a float capture) leave unquantized."""
    paths = [path for path, m in model.named_modules() if type(m) is nn.Linear]
    skip = {p for p in paths for s in selectors if not s.startswith("@") and _glob(s, p)}
    roles = [s for s in selectors if s.startswith("@")]
    if roles:
        from pefc.compiler import capture_with_spec_inputs
        from pefc.sites import find_sites
        from pefc.targets import selector_matches

        sites = find_sites(capture_with_spec_inputs(spec, model, dynamic=False)).sites
        skip |= {s.path for s in sites if s.kind == "linear" and any(selector_matches(r, s) for r in roles)}
    return skip


def _glob(selector: str, path: str) -> bool:
    return fnmatch.fnmatchcase(path, selector) or fnmatch.fnmatchcase(path, "*." + selector)


# --- reading a captured graph's quantized weights --------------------------------------------

def stored_buffers(graph_module: nn.Module, site: LinearSite) -> dict[str, torch.Tensor]:
    """The buffers that store a quantized site's weight."""
    from pefc.graphutil import attr_value

    fmt, prefix = _format(site)
    return {name: attr_value(graph_module, f"{prefix}.{name}") for name in fmt.buffers}


def dequantize_site(graph_module: nn.Module, site: LinearSite) -> torch.Tensor:
    """A quantized site's weight ``[out, in]`` in its compute dtype."""
    fmt, _ = _format(site)
    return fmt.dequantize(stored_buffers(graph_module, site), (site.out_features, site.in_features))


def _format(site: LinearSite) -> tuple[Format, str]:
    found = format_of_buffer(site.weight_name)
    if found is None:
        raise ValueError(f"site {site.path!r} has no quantized weight")
    return found


def quantized_params(sites: list[Site]) -> int:
    """Weights (values, not bytes) stored quantized at ``sites``: they are no parameters of the graph."""
    return sum(s.out_features * s.in_features for s in sites  # type: ignore[attr-defined]
               if getattr(s, "quantized", None))


def stored_bytes(module: nn.Module, *, exclude: set[str] = frozenset()) -> int:  # type: ignore[assignment]
    """Bytes of the parameters and buffers of ``module`` as stored (top-level names in ``exclude`` left out)."""
    seen: set[int] = set()
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.split(".", 1)[0] in exclude or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def base_format(module: nn.Module) -> str | None:
    """The storage format of ``module``'s quantized weights (from their buffers), None when none is."""
    for name, _ in module.named_buffers():
        found = format_of_buffer(name)
        if found is not None:
            return found[0].name
    return None
