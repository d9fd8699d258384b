"""ONNX export: fold mergeable adapters, bake training-time parameterisations, emit ONNX.

``export_onnx(cm, "model.onnx", merge=True, verify=True)`` goes through
``torch.onnx.export(dynamo=True)`` with the spec's named dims dynamic, writes atomically
(external data for large models), and can check the file in onnxruntime on fresh shapes.
With ``lora_inputs=True`` every LoRA A/B becomes a graph input with an empty (rank 0)
default, the convention ONNX Runtime's multi-LoRA (``.onnx_adapter``) uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from pefc.call import placeholders
from pefc.compiled import CompiledModel
from pefc.errors import ExportError, VerificationError
from pefc.registry import default_registry
from pefc.source import example_inputs, torch_dtype

LARGE_MODEL_BYTES = 1536 << 20  # external data above this, as torch.onnx does
RANK_DIM = "lora_rank"
DEFAULT_ATOL = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    nodes: int
    op_types: dict[str, int]
    inputs: list[str]
    outputs: list[str]
    seconds: float
    external_data: bool
    lora_inputs: list[str] = field(default_factory=list)
    verify_max_abs_diff: dict[str, float] = field(default_factory=dict)
    #: a re-quantized export (``quantize=True``): onnxruntime's output error against the unmerged model on
    #: the capture's inputs and each site's weight error (:class:`pefc.quant_merge.QuantizationError`), else None
    quantization_error: dict[str, Any] | None = None
    #: a re-quantized export with ``verify``: per dims, max and mean |Δ| against the unmerged PyTorch model
    #: (``max_vs_unmerged``, ``mean_vs_unmerged``) and the merged float one (``max_vs_float``, ``mean_vs_float``)
    verify_requantized: dict[str, dict[str, float]] = field(default_factory=dict)


def export_onnx(model: CompiledModel, path: str | Path, *, merge: bool = True, verify: bool = False,
                lora_inputs: bool = False, dtype: str | None = None, atol: float | None = None,
                external_data: bool | None = None, quantize: bool = False, kv_cache: bool = False) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (atomically); see the module docstring.

    ``kv_cache=True`` writes a decoder with ``past_key_values.{i}.key`` / ``.value`` inputs and
    ``present.*`` outputs instead; ``verify`` then runs a greedy loop (see :mod:`pefc.onnx_kv`).

    ``quantize=True`` (a quantized base) exports the exact merged float model, then quantizes the
    MatMul nodes of the spec's quantized sites with onnxruntime's tooling (:mod:`pefc.onnx_quant`);
    the result carries onnxruntime's measured error, and ``verify`` reports the differences from
    the unmerged and the merged float model instead of failing on them.
    """
    if kv_cache:
        return _export_kv(model, path, merge=merge, verify=verify, lora_inputs=lora_inputs, dtype=dtype,
                          atol=atol, external_data=external_data, quantize=quantize)
    started = time.perf_counter()
    _refuse_meta(model)
    if Path(path).is_dir():
        raise ExportError(f"{path} is a directory", hint=f"give a file name, e.g. {Path(path) / 'model.onnx'}")
    _refuse_unverifiable(model, dtype, verify)
    if quantize:
        from pefc.onnx_quant import refuse_unrequantizable

        refuse_unrequantizable(model, merge=merge, lora_inputs=lora_inputs, dtype=dtype)
    prepared = prepare_for_export(model, merge=merge, keep_lora=lora_inputs)
    if dtype is not None:
        prepared = prepared.to(torch_dtype(dtype))
    default_registry().hook.pefc_before_export(model=prepared, options={"merge": merge, "lora_inputs": lora_inputs})
    inputs = graph_inputs(model, example_inputs(model.pefc.spec, device=_device(model)))
    output_names = _output_names(prepared, inputs)
    program = _torch_export(prepared, inputs, _dynamic_shapes(model), output_names, optimize=not lora_inputs)
    lora_names = _lora_parameter_names(prepared) if lora_inputs else []
    if lora_names:
        _make_lora_inputs(program.model, lora_names)
        with _quiet():
            program.optimize()
    nbytes = sum(p.numel() * p.element_size() for p in prepared.parameters())
    use_external = external_data if external_data is not None else nbytes > LARGE_MODEL_BYTES
    path = Path(path)
    graph = program.model.graph
    ops = op_counts(graph)
    result = ExportResult(path=path, nodes=sum(ops.values()), op_types=ops,
                          inputs=[v.name for v in graph.inputs], outputs=output_names,
                          seconds=0.0, external_data=use_external, lora_inputs=lora_names)
    if quantize:
        from pefc.onnx_quant import export_requantized

        export_requantized(model, prepared, program, path, result, verify=verify)
        result.seconds = time.perf_counter() - started
        return result

    def check(written: Path) -> None:  # runs on the file before it replaces ``path``: a failure leaves no file
        tolerance = atol if atol is not None else DEFAULT_ATOL.get(torch_dtype(dtype or "float32"), 1e-4)
        feeds = {n: t.detach().cpu().numpy() for n, t in prepared.state_dict().items() if n in lora_names}
        with onnxruntime_failures(path):
            result.verify_max_abs_diff = verify_onnx(model, written, atol=tolerance, dtype=dtype, extra_feeds=feeds,
                                                     label=f"{path} (not written)")

    _atomic_save(program, path, use_external, check=check if verify else None)
    result.seconds = time.perf_counter() - started
    return result


def op_counts(nodes: Iterable[Any]) -> dict[str, int]:
    """How many nodes of each ``op_type`` (ONNX IR or protobuf nodes), sorted by op type."""
    return dict(sorted(Counter(node.op_type for node in nodes).items()))


@contextlib.contextmanager
def onnxruntime_failures(path: Path) -> Iterator[None]:
    """Turn onnxruntime failing to load or run the file at ``path`` into a :class:`VerificationError`."""
    try:
        yield
    except VerificationError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise VerificationError(f"{path} (not written): onnxruntime cannot run the exported file: "
                                f"{type(exc).__name__}: {first}") from exc


def _export_kv(model: CompiledModel, path: str | Path, *, quantize: bool, **options: Any) -> ExportResult:
    from pefc.onnx_kv import export_kv_onnx

    if quantize:
        raise ExportError("--kv-cache with --quantize is not supported: the KV-cache decoder is exported in float",
                          hint="drop --quantize (the merged float model is exact)")
    return export_kv_onnx(model, path, **options)


def prepare_for_export(model: CompiledModel, *, merge: bool = True, keep_lora: bool = False) -> CompiledModel:
    """A copy ready to export: mergeable adapters folded (all but LoRA if ``keep_lora``), baked, flat, eval mode.

    Merging dequantizes a quantized base's weights (exact, see :meth:`CompiledModel.merge`)."""
    from pefc.layers import unpartition_layers
    from pefc.merge import merge_model

    merged = merge_model(model, skip_methods={"lora"} if keep_lora else set()) if merge else model
    prepared = merged.bake()
    unpartition_layers(prepared)  # export the flat graph, as captured
    prepared.eval()
    return prepared


def _refuse_unverifiable(model: nn.Module, dtype: str | None, verify: bool) -> None:
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    refuse_unverifiable({torch_dtype(dtype)} if dtype is not None else floats, verify)


def refuse_unverifiable(exported: set[torch.dtype], verify: bool) -> None:
    """Refuse up front to verify a bfloat16 file: onnxruntime's CPU kernels lack bfloat16 (e.g. Mul)."""
    if verify and torch.bfloat16 in exported:
        raise ExportError("cannot verify a bfloat16 ONNX file: onnxruntime has no CPU kernels for bfloat16 "
                          "operators such as Mul; nothing was written",
                          hint="verify a float32 export: --dtype float32 (dtype='float32'), or drop --verify")


def _refuse_meta(model: nn.Module) -> None:
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ExportError(f"cannot export a model planned on the meta device ({len(meta)} tensors have no data, "
                          f"e.g. {meta[0]!r})", hint="compile without --meta / device='meta' to export")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dynamic_shapes(model: CompiledModel) -> dict[str, Any]:
    spec = model.pefc.spec
    shapes = {name: {i: d for i, d in enumerate(entry.shape) if isinstance(d, str)} or None
              for name, entry in spec.inputs.items() if name in placeholders(model.graph)}
    if getattr(spec, "select", None) is not None:
        from pefc.selection import ids_dynamic_shape

        shapes[spec.select.input] = ids_dynamic_shape(spec)
    return shapes


def graph_inputs(model: CompiledModel, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs the graph takes: loss inputs (labels) are not exported, the loss is not an output."""
    names = placeholders(model.graph)
    chosen = {name: value for name, value in inputs.items() if name in names}
    select = getattr(model.pefc.spec, "select", None)
    if select is not None and select.input in names and select.input not in chosen:
        from pefc.selection import with_example_ids

        chosen = with_example_ids(model.pefc.spec, chosen)
    return chosen


def _output_names(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[str]:
    with torch.no_grad():
        out = model(**inputs)
    leaves, _ = pytree.tree_flatten_with_path(out)
    names = []
    for key_path, _ in leaves:
        parts = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in key_path]
        names.append(".".join(parts) or "output")
    return names


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name)
               for name in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torch_export(model: nn.Module, inputs: dict[str, torch.Tensor], dynamic_shapes: dict[str, Any],
                  output_names: list[str], *, optimize: bool) -> Any:
    with _quiet():
        try:
            return torch.onnx.export(model, (), kwargs=inputs, dynamic_shapes=dynamic_shapes, dynamo=True,
                                     output_names=output_names, optimize=optimize, verbose=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first[:500]}") from exc


# --- LoRA as graph inputs -------------------------------------------------------------------

def _lora_parameter_names(model: CompiledModel) -> list[str]:
    return [f"{ins.module}.{p}" for ins in model.pefc.insertions if ins.method == "lora" and ins.slot is None
            for p in ("lora_A", "lora_B")]


def _make_lora_inputs(onnx_model: Any, names: list[str]) -> None:
    """Turn LoRA initializers into graph inputs with an empty (rank 0) default initializer."""
    import onnx_ir as ir

    graph = onnx_model.graph
    initializers = graph.initializers
    missing = [n for n in names if n not in initializers]
    if missing:
        raise ExportError(f"LoRA parameter {missing[0]!r} is not an initializer of the exported graph")
    for name in names:
        value = initializers[name]
        array = value.const_value.numpy()
        axis = 0 if name.endswith("lora_A") else 1
        empty_shape = list(array.shape)
        empty_shape[axis] = 0
        value.const_value = ir.tensor(np.zeros(empty_shape, dtype=array.dtype), name=name)
        dims: list[Any] = list(array.shape)
        dims[axis] = RANK_DIM
        value.shape = ir.Shape(dims)
        if value not in graph.inputs:
            graph.inputs.append(value)


def export_lora_adapter(model: CompiledModel, path: str | Path) -> list[str]:
    """Write the model's LoRA tensors as an ONNX Runtime ``.onnx_adapter`` file (atomically).

    The names match the graph inputs of ``export_onnx(..., lora_inputs=True)`` of the same spec;
    the scaling ``alpha / r`` is a constant of that graph, so adapters swapped into one exported
    model must share it.
    """
    import onnxruntime as ort

    from pefc.atomic import atomic_path

    names = _lora_parameter_names(model)
    if not names:
        raise ExportError("the spec has no lora adapter to write as an .onnx_adapter file")
    state = model.state_dict()
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(
        np.ascontiguousarray(state[n].detach().float().cpu().numpy())) for n in names})
    with atomic_path(path) as tmp:
        adapter.export_adapter(str(tmp))
    return names


# --- saving -------------------------------------------------------------------------------------

def _atomic_save(program: Any, path: Path, external_data: bool,
                 check: Callable[[Path], None] | None = None) -> None:
    """Save under the final basename in a temp dir beside ``path``, then move data file(s) and model.

    ``check`` (e.g. verification) runs on the saved file first; if it raises, nothing is moved.

    The temp dir is ``.{name}.{pid}@{host}.*``: a killed export leaves only such a dot entry,
    which the next export to ``path`` removes (see :mod:`pefc.atomic`). With external data the
    previous model file is removed before the data files are replaced, so a kill in between
    leaves no model rather than the previous model with new data.
    """
    from pefc.atomic import remove_stale_temporaries, temp_prefix

    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)  # left by an export that was killed
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        with _quiet():
            program.save(str(tmp / path.name), external_data=external_data)
        if check is not None:
            check(tmp / path.name)
        data_files = [item for item in tmp.iterdir() if item.name != path.name]
        if data_files and path.exists():
            path.unlink()  # never pair the previous model with new data: no model until the new one lands
        for item in data_files:
            os.replace(item, path.parent / item.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- verification ----------------------------------------------------------------------------

def verification_sizes(model: CompiledModel) -> list[dict[str, int]]:
    """Two sets of named-dim sizes, both other than the capture's."""
    dims = model.pefc.spec.dims()
    return [{name: size + 1 for name, size in dims.items()},
            {name: (1 if name == "batch" else size + 3) for name, size in dims.items()}]


def verify_onnx(model: CompiledModel, path: str | Path, *, atol: float = 1e-4, dtype: str | None = None,
                adapters: Any = None, extra_feeds: dict[str, np.ndarray] | None = None,
                label: str | None = None) -> dict[str, float]:
    """Run ``path`` in onnxruntime and ``model`` in torch on fresh shapes; max |diff| per shape.

    ``adapters`` (``onnxruntime.LoraAdapter``) are activated; ``extra_feeds`` are fed by name;
    errors name the file ``label`` (default: ``path``).
    """
    import onnxruntime as ort

    shown = label or path
    options = ort.SessionOptions()
    options.log_severity_level = 3  # LoRA initializers that are inputs are expected; no warnings
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds_names = [i.name for i in session.get_inputs()]
    reference = model.clone().eval()
    if dtype is not None:
        reference = reference.to(torch_dtype(dtype))
    run_options = ort.RunOptions()
    for adapter in adapters or []:
        run_options.add_active_adapter(adapter)
    diffs: dict[str, float] = {}
    for seed, sizes in enumerate(verification_sizes(model), start=100):
        inputs = graph_inputs(model, example_inputs(model.pefc.spec, device=_device(model), seed=seed, sizes=sizes))
        with torch.no_grad():
            want = [t.float().cpu().numpy() for t in pytree.tree_leaves(reference(**inputs))]
        feeds = {k: v.cpu().numpy() for k, v in inputs.items() if k in feeds_names} | dict(extra_feeds or {})
        got = session.run(None, feeds, run_options=run_options)
        diff = max(float(np.abs(w - g.astype(np.float32)).max()) for w, g in zip(want, got, strict=True))
        label = "x".join(str(v) for v in sizes.values())
        diffs[label] = diff
        if not diff <= atol:
            raise VerificationError(f"{shown}: onnxruntime output differs from the PyTorch model by {diff:.3g} "
                                    f"(tolerance {atol:g}) at dims {sizes}")
    return diffs
