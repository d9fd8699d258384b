"""``pefc bench --generate``: generation throughput, side by side in one run.

Tokens per second (new tokens x batch / wall time, greedy, no early stop) of pefc unmerged and
merged (both with the KV cache), HF PEFT's ``generate`` on the same adapter (when PEFT has the
method), the base model's HF ``generate``, and onnxruntime's greedy loop over the merged KV-cache
decoder (``export_onnx(..., kv_cache=True)``; export time not counted), for each batch size, on a
random prompt (onnxruntime on as many threads as PyTorch). With ``repeats`` each runner is timed that many times, in turn (round robin, so a
load that comes and goes falls on every runner alike), and the median is kept; each row records
the 1-minute load average it was measured under. ``clock="cpu"`` times the process's CPU time
instead of wall time (see :mod:`pefc.bench`).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from pefc.errors import SpecError
from pefc.schema import SpecBase
from pefc.source import build_model


def run_generate_bench(spec: SpecBase, *, device: str | None = None, prompt: int = 128, new_tokens: int = 256,
                       batches: tuple[int, ...] = (1, 8), compare_peft: bool = True,
                       onnx: bool = True, repeats: int = 1, clock: str = "wall") -> dict[str, Any]:
    """``{"device", "prompt", "new_tokens", "repeats", "rows": [{"batch", "tokens_per_s": {name: value}, "load"}],
    "ratios"}``.

    ``"skipped"`` names a runner left out and why (e.g. onnxruntime for prompt tuning)."""
    from pefc.bench import CLOCKS, check_clock, peft_reference
    from pefc.compiler import compile as compile_spec

    if spec.model is None:
        raise SpecError("bench --generate needs a spec with a `model`")
    device = device or spec.model.device
    check_clock(clock, device)
    base = build_model(spec.model, device=device).eval()
    compiled = compile_spec(spec, model=copy.deepcopy(base)).eval()
    merged = compiled.merge().eval()
    runners: dict[str, Callable[[torch.Tensor], Any]] = {
        "pefc": lambda ids: compiled.generate(ids, new_tokens, eos_token_id=[]),
        "pefc merged": lambda ids: merged.generate(ids, new_tokens, eos_token_id=[]),
        "base HF": _hf_generate(base, new_tokens)}
    reference = peft_reference(spec, base, compiled, torch.device(device))[0] if compare_peft else None
    if reference is not None:
        runners["HF PEFT"] = _hf_generate(reference.eval(), new_tokens)
    skipped: dict[str, str] = {}
    vocab = int(compiled.pefc.base_info.get("vocab_size") or 100)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pefc-genbench-") as tmp:
        if onnx:
            found = _onnx_generate(compiled, tmp, new_tokens, str(device))
            if isinstance(found, str):
                skipped["onnxruntime merged"] = found
            else:
                runners["onnxruntime merged"] = found
        for batch in batches:
            ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
            for run in runners.values():
                run(ids[:, :8])  # warm up (builds pefc's decoder once)
            load = os.getloadavg()[0]
            seconds: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(repeats):
                for name, run in runners.items():
                    seconds[name].append(_seconds(run, ids, CLOCKS[clock]))
            rates = {name: batch * new_tokens / statistics.median(t) for name, t in seconds.items()}
            rows.append({"batch": batch, "tokens_per_s": rates, "load": round((load + os.getloadavg()[0]) / 2, 2)})
    return {"device": str(device), "prompt": prompt, "new_tokens": new_tokens, "repeats": repeats, "clock": clock,
            "threads": torch.get_num_threads(), "rows": rows,
            "ratios": [_ratios(row["tokens_per_s"]) for row in rows], "skipped": skipped}


def _onnx_generate(compiled: Any, directory: str, new_tokens: int,
                   device: str) -> Callable[[torch.Tensor], Any] | str:
    """onnxruntime's greedy loop over the merged KV-cache decoder, or why there is none."""
    from pefc.errors import PefcError

    if not device.startswith("cpu"):
        return "onnxruntime runs on the CPU here"
    try:
        import onnxruntime

        from pefc.export import export_onnx
        from pefc.onnx_kv import OnnxDecoder

        path = f"{directory}/decoder.onnx"
        export_onnx(compiled, path, kv_cache=True)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()  # the threads PyTorch runs on
        decoder = OnnxDecoder(path, session_options=options)
    except (ImportError, PefcError) as exc:
        return str(exc).splitlines()[0]
    return lambda ids: decoder.generate(ids.cpu().numpy(), new_tokens)


def _hf_generate(model: torch.nn.Module, new_tokens: int) -> Callable[[torch.Tensor], Any]:
    def run(ids: torch.Tensor) -> Any:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return run


def _seconds(run: Callable[[torch.Tensor], Any], ids: torch.Tensor, clock: Callable[[], float]) -> float:
    started = clock()
    run(ids)
    return clock() - started


def _ratios(rates: dict[str, float]) -> dict[str, float]:
    out = {"pefc merged/base HF": rates["pefc merged"] / rates["base HF"]}
    if "HF PEFT" in rates:
        out["pefc/HF PEFT"] = rates["pefc"] / rates["HF PEFT"]
    if "onnxruntime merged" in rates:
        out["onnxruntime/pefc merged"] = rates["onnxruntime merged"] / rates["pefc merged"]
    return out


def table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_generate_bench`'s result."""
    names = list(result["rows"][0]["tokens_per_s"])
    lines = [f"generate on {result['device']}: prompt {result['prompt']}, {result['new_tokens']} new tokens "
             f"(tokens/s, median of {result.get('repeats', 1)}, {result.get('clock', 'wall')} time, "
             f"{result.get('threads', '?')} thread(s))", "batch  " + "  ".join(f"{n:>12}" for n in names)
             + "   load"]
    for row, ratios in zip(result["rows"], result["ratios"], strict=True):
        lines.append(f"{row['batch']:>5}  " + "  ".join(f"{row['tokens_per_s'][n]:>12.1f}" for n in names)
                     + f"  {row.get('load', float('nan')):>5.2f}   " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    lines += [f"skipped {name}: {why}" for name, why in result.get("skipped", {}).items()]
    return "\n".join(lines)
