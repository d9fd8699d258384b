"""A re-quantized ONNX export: the merged float model, its quantized sites quantized by onnxruntime's tooling.

``export_onnx(cm, path, quantize=True)`` over a quantized base exports the exact merged float
model first, then quantizes offline the MatMul nodes that compute the spec's quantized sites,
and only those (what ``model.quantize.skip`` kept in float, by default the output head, stays a
plain MatMul):

- ``nf4``: ``onnxruntime.quantization.MatMulBnb4Quantizer`` (NF4, the spec's ``block_size``;
  the absmax per block is stored in float, where the PyTorch base quantizes it again);
- ``int8``: ``MatMulNBitsQuantizer`` with ``bits=8``, symmetric, blocks of 128 along the input
  (weight-only, as the spec's int8; ``quantize_dynamic`` would quantize the activations too).

A site's MatMul is the one whose constant B is exactly the site's merged weight transposed; it
is renamed after the site (``model.layers.0.self_attn.q_proj``; onnxruntime's node then is
``..._Bnb4`` / ``..._Q8``). :func:`weight_errors` dequantizes what the file stores (numpy, not
onnxruntime's kernel) to measure each site's weight error; :func:`output_error` runs the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.utils import _pytree as pytree

from pefc.compiled import CompiledModel
from pefc.errors import ExportError
from pefc.export import (
    ExportResult,
    _atomic_save,
    graph_inputs,
    onnxruntime_failures,
    op_counts,
    verification_sizes,
)
from pefc.source import example_inputs, torch_dtype

#: block sizes onnxruntime's MatMulBnb4 kernel takes
BNB4_BLOCKS = (16, 32, 64, 128, 256)
#: MatMulNBits' block (along the input features) for int8: onnxruntime's default
INT8_BLOCK = 128
#: bitsandbytes' NF4 code values (QLoRA), as MatMulBnb4 decodes them
NF4_CODES = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                      -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                      0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                      0.44070982933044434, 0.5626170039176941, 0.7229568362236328, 1.0], dtype=np.float32)


@dataclass(frozen=True)
class Scheme:
    """How one spec method is quantized in ONNX: the tool, its op, and how to read back its weights."""

    method: str
    tool: str
    op_type: str
    block_size: Callable[[Any], int]
    #: (model, names of MatMul nodes to leave alone, block size) -> quantized model
    quantize: Callable[[onnx.ModelProto, list[str], int], onnx.ModelProto]
    #: (the op's initializers B..., K, N, block size) -> the dequantized B [K, N]
    dequantize: Callable[[list[np.ndarray], int, int, int], np.ndarray]

    def describe(self, config: Any) -> str:
        return f"onnxruntime {self.tool}, block {self.block_size(config)}"


def _tool(module: str, name: str) -> Any:
    """``name`` from onnxruntime's ``module``, the root logger kept as it was (``matmul_nbits_quantizer``
    calls ``logging.basicConfig(level=INFO)`` when imported)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return getattr(importlib.import_module(f"onnxruntime.quantization.{module}"), name)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _bnb4(model: onnx.ModelProto, exclude: list[str], block: int) -> onnx.ModelProto:
    MatMulBnb4Quantizer = _tool("matmul_bnb4_quantizer", "MatMulBnb4Quantizer")  # noqa: N806

    quantizer = MatMulBnb4Quantizer(model, MatMulBnb4Quantizer.NF4, block, nodes_to_exclude=exclude)
    quantizer.process()
    return quantizer.model.model


def _nbits8(model: onnx.ModelProto, exclude: list[str], block: int) -> onnx.ModelProto:
    MatMulNBitsQuantizer = _tool("matmul_nbits_quantizer", "MatMulNBitsQuantizer")  # noqa: N806

    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block, is_symmetric=True, nodes_to_exclude=exclude)
    quantizer.process()
    return quantizer.model.model


def _dequantize_bnb4(stored: list[np.ndarray], k: int, n: int, block: int) -> np.ndarray:
    """Packed codes (high nibble first) of B^T flattened, times each block's absmax."""
    packed, absmax = stored[0].reshape(-1), stored[1].astype(np.float32)
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[: k * n]
    values = NF4_CODES[codes].reshape(-1)
    scale = np.repeat(absmax, block)[: k * n]
    return (values * scale).reshape(n, k).T


def _dequantize_nbits8(stored: list[np.ndarray], k: int, n: int, block: int) -> np.ndarray:
    """Codes ``[N, blocks, block]`` (zero point 128: symmetric), times each block's scale, padding dropped."""
    codes, scales = stored[0], stored[1].astype(np.float32).reshape(n, -1)
    values = (codes.astype(np.float32) - 128.0) * scales[:, :, None]
    return values.reshape(n, -1)[:, :k].T


SCHEMES: dict[str, Scheme] = {
    "nf4": Scheme("nf4", "MatMulBnb4Quantizer (NF4)", "MatMulBnb4", lambda c: c.block_size, _bnb4, _dequantize_bnb4),
    "int8": Scheme("int8", "MatMulNBitsQuantizer (bits=8, symmetric)", "MatMulNBits", lambda c: INT8_BLOCK,
                   _nbits8, _dequantize_nbits8),
}


def scheme_for(config: Any, sites: dict[str, tuple[int, int]]) -> Scheme:
    """The scheme of ``config.method``; errors name the first site it cannot take (``sites``: path -> [out, in])."""
    first = next(iter(sites), "<none>")
    scheme = SCHEMES.get(config.method)
    if scheme is None:
        raise ExportError(f"site {first!r}: no onnxruntime quantization tool for model.quantize.method "
                          f"{config.method!r} (known: {', '.join(SCHEMES)})",
                          hint="export without --quantize: the merged float model is exact")
    block = scheme.block_size(config)
    for path, (out_features, in_features) in sites.items():
        check_fits(scheme, block, path, out_features, in_features)
    return scheme


def check_fits(scheme: Scheme, block: int, path: str, out_features: int, in_features: int) -> None:
    """Raise naming the site when ``scheme``'s tool cannot take its ``[out, in]`` weight in blocks of ``block``."""
    if scheme.method != "nf4":
        return  # MatMulNBits pads the input dimension to whole blocks
    if block not in BNB4_BLOCKS:
        raise ExportError(f"site {path!r}: onnxruntime's MatMulBnb4 takes block sizes "
                          f"{', '.join(map(str, BNB4_BLOCKS))}, model.quantize.block_size is {block}",
                          hint="export without --quantize (the merged float model is exact), or choose one of those")
    if (out_features * in_features) % block:
        raise ExportError(f"site {path!r}: its [{out_features}, {in_features}] weight does not split into "
                          f"blocks of {block} (model.quantize.block_size)",
                          hint=f"add {path!r} to model.quantize.skip, or choose a smaller block_size")


# --- mapping sites to MatMul nodes ---------------------------------------------------------------

def _key(array: np.ndarray) -> tuple[tuple[int, ...], str, str]:
    contiguous = np.ascontiguousarray(array)
    return contiguous.shape, contiguous.dtype.str, hashlib.blake2b(contiguous.data, digest_size=16).hexdigest()


def site_matmuls(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, onnx.NodeProto]:
    """Each site's MatMul node: the one whose constant B equals the site's weight ``[out, in]`` transposed."""
    initializers = {t.name: t for t in model.graph.initializer}
    by_value: dict[Any, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2:
            by_value.setdefault(_key(numpy_helper.to_array(initializers[node.input[1]])), []).append(node)
    found: dict[str, onnx.NodeProto] = {}
    for path, weight in weights.items():
        nodes = by_value.get(_key(weight.T), [])
        if not nodes:
            raise ExportError(f"site {path!r}: no MatMul of the exported graph multiplies by its weight "
                              "(a constant B equal to the merged weight transposed)",
                              hint="export without --quantize: the merged float model is exact")
        if len(nodes) > 1:
            raise ExportError(f"site {path!r}: {len(nodes)} MatMul nodes multiply by a weight equal to its own "
                              f"({', '.join(n.name for n in nodes)}); cannot tell which to quantize")
        found[path] = nodes[0]
    return found


# --- quantizing and measuring -------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_tooling() -> Iterator[None]:
    """onnxruntime's quantizers log every node they skip at INFO (their loggers inherit this level)."""
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Requantized:
    """A quantized ONNX model, which of its nodes compute which site, and how it was quantized."""

    model: onnx.ModelProto
    scheme: Scheme
    block: int
    #: site path -> the onnxruntime node that computes it
    nodes: dict[str, str]

    def save(self, path: str, external_data: bool = False) -> None:
        """Write the model (``_atomic_save`` calls this on a temporary path)."""
        onnx.save_model(self.model, path, save_as_external_data=external_data, all_tensors_to_one_file=True,
                        location=Path(path).name + ".data")


def requantize(model: onnx.ModelProto, weights: dict[str, np.ndarray], config: Any) -> Requantized:
    """Quantize the MatMul nodes of ``weights``' sites (site path -> merged float weight ``[out, in]``), only them."""
    shapes = {path: (w.shape[0], w.shape[1]) for path, w in weights.items()}
    scheme = scheme_for(config, shapes)
    block = scheme.block_size(config)
    nodes = site_matmuls(model, weights)
    outputs = {}
    for path, node in nodes.items():
        node.name = path
        outputs[path] = node.output[0]
    chosen = {n.name for n in nodes.values()}
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    with _quiet_tooling():
        try:
            quantized = scheme.quantize(model, exclude, block)
        except Exception as exc:  # e.g. an onnxruntime without the tool or the bit width
            import onnxruntime

            raise ExportError(f"onnxruntime {onnxruntime.__version__}'s {scheme.tool} failed on sites "
                              f"{', '.join(list(nodes)[:3])}: {type(exc).__name__}: {str(exc)[:300]}",
                              hint="pefc is tested with onnxruntime 1.32; or export without --quantize") from exc
    producer = {n.output[0]: n for n in quantized.graph.node if n.output}
    made = {path: producer[out] for path, out in outputs.items()}
    wrong = [path for path, n in made.items() if n.op_type != scheme.op_type]
    if wrong:
        raise ExportError(f"site {wrong[0]!r}: onnxruntime's {scheme.tool} left its MatMul unquantized",
                          hint="export without --quantize: the merged float model is exact")
    return Requantized(quantized, scheme, block, {path: n.name for path, n in made.items()})


def stored_weight(initializers: dict[str, onnx.TensorProto], node: onnx.NodeProto, scheme: Scheme) -> np.ndarray:
    """The B ``[K, N]`` that ``node`` (an onnxruntime quantized op) multiplies by, dequantized from the
    model's ``initializers`` (by name)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    stored = [numpy_helper.to_array(initializers[name]) for name in node.input[1:] if name in initializers]
    return scheme.dequantize(stored, int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"]))


def weight_errors(requantized: Requantized, weights: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per site: max and mean |W_merged - the weight the file stores|."""
    nodes = {n.name: n for n in requantized.model.graph.node}
    initializers = {t.name: t for t in requantized.model.graph.initializer}
    errors = {}
    for path, weight in weights.items():
        restored = stored_weight(initializers, nodes[requantized.nodes[path]], requantized.scheme)
        diff = np.abs(restored - weight.T.astype(np.float32))
        errors[path] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    return errors


@torch.no_grad()
def output_error(session: Any, reference: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Max and mean |Δ| between ``session``'s outputs and ``reference``'s (eval mode) on ``inputs``."""
    names = {i.name for i in session.get_inputs()}
    mode = reference.training
    reference.eval()
    try:
        want = pytree.tree_leaves(reference(**inputs))
    finally:
        reference.train(mode)
    got = session.run(None, {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names})
    diffs = [np.abs(w.detach().float().cpu().numpy() - g.astype(np.float32)).reshape(-1)
             for w, g in zip(want, got, strict=True) if isinstance(w, torch.Tensor) and w.is_floating_point()]
    joined = np.concatenate(diffs)
    return float(joined.max()), float(joined.mean())


# --- the export -----------------------------------------------------------------------------------

def quantized_site_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The unmerged model's quantized sites: path -> ``[out, in]``."""
    from pefc.quant_merge import quantized_sites

    return {s.path: (s.out_features, s.in_features) for s in quantized_sites(model).values()}


def refuse_unrequantizable(model: CompiledModel, *, merge: bool, lora_inputs: bool, dtype: str | None) -> None:
    """Refuse, before exporting anything, what a re-quantized export cannot do."""
    from pefc.quant import compute_dtype_of

    shapes = quantized_site_shapes(model)
    if not shapes:
        raise ExportError("--quantize (quantize=True) needs a quantized base: the spec has no model.quantize",
                          hint="add model.quantize: {method: nf4} to the spec, or drop --quantize")
    if not merge or lora_inputs:
        raise ExportError("--quantize quantizes the merged float model: it does not go with --no-merge or "
                          "--lora-inputs", hint="drop --no-merge / --lora-inputs, or drop --quantize")
    exported = torch_dtype(dtype) if dtype is not None else compute_dtype_of(model.pefc.spec)
    if exported == torch.bfloat16:
        raise ExportError("--quantize: onnxruntime's quantization tools take float32 or float16 weights, "
                          "the merged weights are bfloat16; nothing was written", hint="add --dtype float32")
    scheme_for(model.pefc.spec.model.quantize, shapes)


def export_requantized(model: CompiledModel, prepared: CompiledModel, program: Any, path: Path,
                       result: ExportResult, *, verify: bool) -> None:
    """Quantize ``program`` (the merged float ``prepared``, exported) at ``model``'s quantized sites and write it
    atomically at ``path``; fill ``result`` with onnxruntime's measured errors (see the module docstring)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from pefc.quant_merge import QuantizationError, float_weight_name, quantized_sites

    spec = model.pefc.spec
    config = spec.model.quantize
    weights = {s.path: prepared.get_parameter(float_weight_name(s)).detach().cpu().numpy()
               for s in quantized_sites(model).values()}
    requantized = requantize(ir.serde.serialize_model(program.model), weights, config)
    ops = op_counts(requantized.model.graph.node)
    result.nodes, result.op_types = sum(ops.values()), ops
    sites = weight_errors(requantized, weights)
    device = next(model.parameters()).device

    def check(written: Path) -> None:  # runs before the file replaces ``path``
        with onnxruntime_failures(path):
            session = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
            inputs = graph_inputs(model, example_inputs(spec, device=device))
            largest, mean = output_error(session, model, inputs)
            result.quantization_error = QuantizationError(config.method, largest, mean, sites,
                                                          tool=requantized.scheme.describe(config)).to_dict()
            for seed, sizes in enumerate(verification_sizes(model) if verify else [], start=100):
                inputs = graph_inputs(model, example_inputs(spec, device=device, seed=seed, sizes=sizes))
                vs_unmerged, vs_float = output_error(session, model, inputs), output_error(session, prepared, inputs)
                label = "x".join(str(v) for v in sizes.values())
                result.verify_max_abs_diff[label] = vs_unmerged[0]
                result.verify_requantized[label] = {"max_vs_unmerged": vs_unmerged[0], "mean_vs_unmerged": vs_unmerged[1],
                                                    "max_vs_float": vs_float[0], "mean_vs_float": vs_float[1]}

    _atomic_save(requantized, path, result.external_data, check=check)
