"""ONNX decoders with a KV cache, and a greedy loop that runs them in onnxruntime.

``export_onnx(cm, "decoder.onnx", kv_cache=True)`` exports the cached step graph that
:mod:`pefc.kvcache` builds for ``cm.generate`` (the base causal LM captured with its cache,
rewritten by the same plugins, sharing the model's tensors). Its names are Optimum's and ONNX
Runtime GenAI's:

- inputs ``input_ids`` ``[batch_size, sequence_length]``, ``attention_mask``
  ``[batch_size, total_sequence_length]`` (past and new tokens), ``position_ids``
  ``[batch_size, sequence_length]`` (when the model reads positions) and
  ``past_key_values.{i}.key`` / ``.value`` ``[batch_size, kv_heads, past_sequence_length, head_dim]``;
- outputs ``logits`` and ``present.{i}.key`` / ``.value`` (past and new tokens).

Every size is dynamic; an empty past (length 0) is the prefill. Prefix-tuning slots are
initializers joined in front of each attention's keys and values, as in ``generate`` (the
cache holds real tokens only). Prompt tuning is refused: its virtual tokens go through a
prefill graph that the decode graph does not have, and one ONNX file holds one graph.

:class:`OnnxDecoder` runs such a file: it checks a call's shapes (a wrong past is an
:class:`~pefc.errors.ExportError` naming the input) and :meth:`OnnxDecoder.generate` decodes
greedily with ``generate``'s layout, which ``verify`` compares token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pefc.compiled import CompiledModel
from pefc.errors import ExportError, VerificationError
from pefc.registry import default_registry
from pefc.source import torch_dtype

DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")
_VERIFY = ((3, 6, 8), (1, 4, 5))  # (batch, prompt, new tokens): other sizes than the example's


def past_names(layers: int) -> list[str]:
    """``past_key_values.{i}.key`` / ``.value`` for every layer, in cache order."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """``present.{i}.key`` / ``.value`` for every layer, in cache order."""
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def export_kv_onnx(model: CompiledModel, path: str | Path, *, merge: bool = True, verify: bool = False,
                   lora_inputs: bool = False, dtype: str | None = None, atol: float | None = None,
                   external_data: bool | None = None) -> Any:
    """Write ``model``'s cached decoder to ``path`` (atomically); an :class:`~pefc.export.ExportResult`.

    ``verify`` runs :meth:`OnnxDecoder.generate` on the written file and compares its tokens
    with ``model.generate`` (greedy) before the file replaces ``path``.
    """
    from pefc.export import (
        DEFAULT_ATOL,
        LARGE_MODEL_BYTES,
        ExportResult,
        _atomic_save,
        _lora_parameter_names,
        _refuse_meta,
        _refuse_unverifiable,
        op_counts,
        prepare_for_export,
    )

    started = time.perf_counter()
    _refuse_meta(model)
    if Path(path).is_dir():
        raise ExportError(f"{path} is a directory", hint=f"give a file name, e.g. {Path(path) / 'decoder.onnx'}")
    _refuse_unverifiable(model, dtype, verify)
    _refuse_prompt_tuning(model)
    prepared = prepare_for_export(model, merge=merge, keep_lora=lora_inputs)
    if dtype is not None:
        prepared = prepared.to(torch_dtype(dtype))
    default_registry().hook.pefc_before_export(
        model=prepared, options={"merge": merge, "lora_inputs": lora_inputs, "kv_cache": True})
    program, layers = _export_step(prepared, optimize=not lora_inputs)
    lora_names = _lora_parameter_names(prepared) if lora_inputs else []
    _name_io(program.model, layers)
    if lora_names:
        from pefc.export import _make_lora_inputs, _quiet

        _make_lora_inputs(program.model, lora_names)
        with _quiet():
            program.optimize()
    nbytes = sum(p.numel() * p.element_size() for p in prepared.parameters())
    graph = program.model.graph
    ops = op_counts(graph)
    result = ExportResult(path=Path(path), nodes=sum(ops.values()), op_types=ops,
                          inputs=[v.name for v in graph.inputs], outputs=[v.name for v in graph.outputs],
                          seconds=0.0, external_data=external_data if external_data is not None
                          else nbytes > LARGE_MODEL_BYTES, lora_inputs=lora_names)

    def check(written: Path) -> None:  # on the saved file before it replaces ``path``
        feeds = {n: t.detach().cpu().numpy() for n, t in prepared.state_dict().items() if n in lora_names}
        tolerance = atol if atol is not None else DEFAULT_ATOL.get(torch_dtype(dtype or "float32"), 1e-4)
        result.verify_max_abs_diff = verify_kv_onnx(model, written, dtype=dtype, extra_feeds=feeds,
                                                    atol=tolerance, label=f"{path} (not written)")

    _atomic_save(program, Path(path), result.external_data, check=check if verify else None)
    result.seconds = time.perf_counter() - started
    return result


def _refuse_prompt_tuning(model: CompiledModel) -> None:
    prepends = sorted({i.module.split(".", 1)[0] for i in model.pefc.insertions
                       if i.site_kind == "embedding" and i.placement == "custom"})
    if prepends:
        raise ExportError(f"cannot export a KV-cache decoder for adapter {prepends[0]!r}: prompt tuning's virtual "
                          "tokens go through a prefill graph that the decode step does not have, and one ONNX "
                          "file holds one graph", hint="export without --kv-cache (the full-sequence model), "
                          "or use prefix tuning, whose slots the decoder holds as parameters")


def _export_step(prepared: CompiledModel, *, optimize: bool) -> tuple[Any, int]:
    """``torch.onnx.export`` of the cached step graph with every size dynamic; ``(program, layers)``."""
    from pefc.export import _quiet
    from pefc.kvcache import _EXAMPLE, decoder

    dec = decoder(prepared)
    like = next(p for p in prepared.parameters() if p.is_floating_point())
    b, s, p = _EXAMPLE["batch"], _EXAMPLE["seq"], _EXAMPLE["past"]
    past = tuple(like.new_zeros(b, dec.kv_heads, p, dec.head_dim).normal_() for _ in range(2 * dec.layers))
    inputs = {"input_ids": torch.randint(0, 2, (b, s), device=like.device),
              "attention_mask": torch.ones(b, p + s, dtype=torch.long, device=like.device),
              "position_ids": torch.arange(p, p + s, device=like.device).expand(b, s).contiguous(),
              "past_key_values": past}
    batch, seq, past_len, total = (torch.export.Dim(n) for n in DIMS)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past_key_values": tuple({0: batch, 2: past_len} for _ in past)}
    names = ["logits", *present_names(dec.layers)]
    with _quiet():
        try:
            program = torch.onnx.export(dec.step, (), kwargs=inputs, dynamic_shapes=dynamic, dynamo=True,
                                        output_names=names, optimize=optimize, verbose=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export of the KV-cache decoder failed: {type(exc).__name__}: "
                              f"{first[:500]}") from exc
    return program, dec.layers


def _name_io(onnx_model: Any, layers: int) -> None:
    """Optimum's input names (``past_key_values.{i}.key``), the dims' names; drop an unread ``position_ids``."""
    import onnx_ir as ir

    graph = onnx_model.graph
    wanted = past_names(layers)
    flat = [v for v in graph.inputs if v.name.startswith("past_key_values_")]
    if len(flat) != len(wanted):
        raise ExportError(f"the KV-cache decoder has {len(flat)} past inputs, expected {len(wanted)}")
    for value, name in zip(flat, wanted, strict=True):
        value.name = name
    rename = {"batch": DIMS[0], "seq": DIMS[1], "past": DIMS[2], "total": DIMS[3],
              "past + seq": DIMS[3], "seq + past": DIMS[3]}
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([rename.get(str(d), str(d)) if isinstance(d, ir.SymbolicDim) else d
                                    for d in value.shape])
    for value in list(graph.inputs):
        if value.name == "position_ids" and not value.uses():
            graph.inputs.remove(value)


# --- running a decoder -------------------------------------------------------------------------

@dataclass
class _Layout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    positions: bool
    others: list[str]


class OnnxDecoder:
    """An onnxruntime session over a KV-cache decoder (``export_onnx(..., kv_cache=True)``).

    ``feeds`` are fed on every call by name (e.g. LoRA inputs); ``run_options`` carries
    activated ``onnxruntime.LoraAdapter`` s.
    """

    def __init__(self, path: str | Path, *, feeds: dict[str, np.ndarray] | None = None, run_options: Any = None,
                 session_options: Any = None) -> None:
        import onnxruntime as ort

        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # LoRA initializers that are inputs are expected
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, session_options, providers=["CPUExecutionProvider"])
        self.feeds = dict(feeds or {})
        self.run_options = run_options
        self.layout = _read_layout(self.session, self.path)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A cache of past length 0 for ``batch`` rows (the prefill's past)."""
        lay = self.layout
        return [np.zeros((batch, lay.kv_heads, 0, lay.head_dim), dtype=lay.dtype) for _ in range(2 * lay.layers)]

    def run(self, input_ids: Any, attention_mask: Any, position_ids: Any,
            past: list[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(logits, present)`` of one call (numpy arrays or CPU tensors in); shapes are checked first."""
        input_ids, attention_mask, position_ids = (_array(t) for t in (input_ids, attention_mask, position_ids))
        past = [_array(t) for t in past]
        self.check(input_ids, attention_mask, position_ids, past)
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 **dict(zip(past_names(self.layout.layers), past, strict=True)), **self.feeds}
        if self.layout.positions:
            feeds["position_ids"] = position_ids.astype(np.int64)
        out = self.session.run(None, feeds, run_options=self.run_options)
        return out[0], list(out[1:])

    def check(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
              past: list[np.ndarray]) -> None:
        """Refuse a call whose past, mask or positions do not fit the decoder, naming the input."""
        lay = self.layout
        if input_ids.ndim != 2:
            raise ExportError(f"{self.path}: input_ids must be [batch, seq], got {list(input_ids.shape)}")
        batch, seq = input_ids.shape
        if len(past) != 2 * lay.layers:
            raise ExportError(f"{self.path}: the decoder takes {2 * lay.layers} past tensors "
                              f"({lay.layers} layers x key, value), got {len(past)}")
        past_len = past[0].shape[2] if past[0].ndim == 4 else -1
        for name, tensor in zip(past_names(lay.layers), past, strict=True):
            want = (batch, lay.kv_heads, past_len, lay.head_dim)
            if tuple(tensor.shape) != want:
                raise ExportError(f"{self.path}: {name} is {list(tensor.shape)} but the decoder takes "
                                  f"[batch={batch}, kv_heads={lay.kv_heads}, past={past_len}, "
                                  f"head_dim={lay.head_dim}]", hint="feed the previous call's present.* as past")
            if tensor.dtype != lay.dtype:
                raise ExportError(f"{self.path}: {name} is {tensor.dtype}, the decoder takes {lay.dtype}")
        if attention_mask.shape != (batch, past_len + seq):
            raise ExportError(f"{self.path}: attention_mask is {list(attention_mask.shape)} but covers past and "
                              f"new tokens: [batch={batch}, past + seq={past_len + seq}]")
        if lay.positions and position_ids.shape != (batch, seq):
            raise ExportError(f"{self.path}: position_ids is {list(position_ids.shape)}, expected [{batch}, {seq}]")

    def generate(self, input_ids: torch.Tensor | np.ndarray, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """Greedy ``[batch, seq + max_new_tokens]`` (no early stop), laid out as ``cm.generate`` lays rows out.

        Each row's real tokens move to the front (positions ``0 .. n-1``, padding after them
        masked): a prefill with an empty past, then one call per token feeding ``present`` back.
        """
        from pefc.generate import _left_align

        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        tokens, lengths = _left_align(ids, mask, max_new_tokens)
        width = int(lengths.max())
        batch = len(ids)
        step_mask = (torch.arange(width) < lengths[:, None]).long().numpy()
        positions = np.broadcast_to(np.arange(width), (batch, width))
        logits, past = self.run(tokens[:, :width].numpy(), step_mask, positions, self.empty_past(batch))
        step_mask = np.concatenate([np.ones((batch, past[0].shape[2] - width), np.int64), step_mask], axis=1)
        rows = np.arange(batch)
        last = logits[rows, lengths.numpy() - 1]
        position = lengths.numpy().copy()
        new = []
        for k in range(max_new_tokens):
            chosen = last.argmax(-1)
            new.append(chosen)
            if k + 1 == max_new_tokens:
                break
            step_mask = np.concatenate([step_mask, np.ones((batch, 1), np.int64)], axis=1)
            logits, past = self.run(chosen[:, None], step_mask, position[:, None], past)
            last = logits[:, -1]
            position = position + 1
        return np.concatenate([ids.numpy(), np.stack(new, axis=1)], axis=1) if new else ids.numpy()


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _read_layout(session: Any, path: str) -> _Layout:
    inputs = {i.name: i for i in session.get_inputs()}
    keys = sorted((n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")),
                  key=lambda n: int(n.split(".")[1]))
    if "input_ids" not in inputs or "attention_mask" not in inputs or not keys:
        raise ExportError(f"{path} is not a KV-cache decoder: it takes {', '.join(inputs)}",
                          hint="export it with export_onnx(..., kv_cache=True) / pefc export --kv-cache")
    shape = inputs[keys[0]].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise ExportError(f"{path}: {keys[0]} has shape {shape}, expected [batch, kv_heads, past, head_dim]")
    kind = inputs[keys[0]].type
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(kind)
    if dtype is None:
        raise ExportError(f"{path}: the cache is {kind}; onnxruntime's CPU decoding here takes float32 or float16")
    known = {"input_ids", "attention_mask", "position_ids", *past_names(len(keys))}
    return _Layout(len(keys), shape[1], shape[3], np.dtype(dtype), "position_ids" in inputs,
                   [n for n in inputs if n not in known])


# --- verification ------------------------------------------------------------------------------

def verify_kv_onnx(model: CompiledModel, path: str | Path, *, dtype: str | None = None,
                   extra_feeds: dict[str, np.ndarray] | None = None, adapters: Any = None,
                   atol: float | None = None, label: str | None = None) -> dict[str, float]:
    """Greedy decode in onnxruntime vs ``model.generate``, on left-padded prompts of fresh sizes.

    Returns, per ``"{batch}x{prompt}+{new}"``, the max |diff| of the prefill's last logits; raises
    :class:`VerificationError` when a token differs (or the logits beyond ``atol``, when given).
    ``adapters`` (``onnxruntime.LoraAdapter``) are activated.
    """
    import onnxruntime as ort

    shown = label or path
    run_options = ort.RunOptions()
    for adapter in adapters or []:
        run_options.add_active_adapter(adapter)
    onnx_decoder = OnnxDecoder(path, feeds=extra_feeds, run_options=run_options)
    reference = model.clone().eval()
    if dtype is not None:
        reference = reference.to(torch_dtype(dtype))
    vocab = int(model.pefc.base_info.get("vocab_size") or 2)
    diffs: dict[str, float] = {}
    for seed, (batch, prompt, new) in enumerate(_VERIFY, start=100):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3 if vocab > 3 else 0, vocab, (batch, prompt), generator=g)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[0, :2] = 0  # a left-padded row
        want = reference.generate(ids, new, attention_mask=mask, eos_token_id=[]).cpu().numpy()
        got = onnx_decoder.generate(ids, new, attention_mask=mask)
        where = f"{batch}x{prompt}+{new}"
        diffs[where] = _prefill_diff(reference, onnx_decoder, ids, mask)
        if not np.array_equal(want, got):
            row, col = (int(v[0]) for v in np.nonzero(want != got))
            raise VerificationError(f"{shown}: onnxruntime's greedy token {col - prompt} of row {row} is "
                                    f"{int(got[row, col])}, cm.generate's is {int(want[row, col])} "
                                    f"(batch {batch}, prompt {prompt}; prefill logits differ by "
                                    f"{diffs[where]:.3g})")
        if atol is not None and not diffs[where] <= atol:
            raise VerificationError(f"{shown}: onnxruntime's prefill logits differ from the PyTorch model by "
                                    f"{diffs[where]:.3g} (tolerance {atol:g}) at batch {batch}, prompt {prompt}")
    return diffs


def _prefill_diff(reference: CompiledModel, onnx_decoder: OnnxDecoder, ids: torch.Tensor,
                  mask: torch.Tensor) -> float:
    """Max |diff| of the logits after each row's last prompt token: onnxruntime's prefill vs torch."""
    from pefc.generate import _CachedSteps, _left_align

    tokens, lengths = _left_align(ids, mask, 0)
    width = int(lengths.max())
    step_mask = (torch.arange(width) < lengths[:, None]).long()
    logits, _ = onnx_decoder.run(tokens[:, :width].numpy(), step_mask.numpy(),
                                 np.broadcast_to(np.arange(width), (len(ids), width)),
                                 onnx_decoder.empty_past(len(ids)))
    got = logits[np.arange(len(ids)), lengths.numpy() - 1].astype(np.float32)
    with torch.no_grad():
        want = _CachedSteps(reference, tokens, lengths, 1).first.cpu().numpy()
    return float(np.abs(want - got).max())
