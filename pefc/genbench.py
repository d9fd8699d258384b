"""``pefc bench --generate``: generation throughput, side by side in one run.

Tokens per second (new tokens x batch / wall time, greedy, no early stop) of pefc unmerged and
merged (both with the KV cache), HF PEFT's ``generate`` on the same adapter (when PEFT has the
method) and the base model's HF ``generate``, for each batch size, on a random prompt.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from pefc.errors import SpecError
from pefc.schema import SpecBase
from pefc.source import build_model


def run_generate_bench(spec: SpecBase, *, device: str | None = None, prompt: int = 128, new_tokens: int = 256,
                       batches: tuple[int, ...] = (1, 8), compare_peft: bool = True) -> dict[str, Any]:
    """``{"device", "prompt", "new_tokens", "rows": [{"batch", "tokens_per_s": {name: value}}], "ratios"}``."""
    from pefc.compiler import compile as compile_spec

    if spec.model is None:
        raise SpecError("bench --generate needs a spec with a `model`")
    device = device or spec.model.device
    base = build_model(spec.model, device=device).eval()
    compiled = compile_spec(spec, model=copy.deepcopy(base)).eval()
    merged = compiled.merge().eval()
    runners: dict[str, Callable[[torch.Tensor], Any]] = {
        "pefc": lambda ids: compiled.generate(ids, new_tokens, eos_token_id=[]),
        "pefc merged": lambda ids: merged.generate(ids, new_tokens, eos_token_id=[]),
        "base HF": _hf_generate(base, new_tokens)}
    reference = _peft_model(spec, base, compiled) if compare_peft else None
    if reference is not None:
        runners["HF PEFT"] = _hf_generate(reference, new_tokens)
    vocab = int(compiled.pefc.base_info.get("vocab_size") or 100)
    rows = []
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
        rates = {name: batch * new_tokens / _seconds(run, ids) for name, run in runners.items()}
        rows.append({"batch": batch, "tokens_per_s": rates})
    return {"device": str(device), "prompt": prompt, "new_tokens": new_tokens, "rows": rows,
            "ratios": [_ratios(row["tokens_per_s"]) for row in rows]}


def _hf_generate(model: torch.nn.Module, new_tokens: int) -> Callable[[torch.Tensor], Any]:
    def run(ids: torch.Tensor) -> Any:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return run


def _peft_model(spec: SpecBase, base: torch.nn.Module, compiled: Any) -> torch.nn.Module | None:
    from pefc.interop.peft import PEFT_METHODS, peft_config

    if len(spec.adapters) != 1 or spec.adapters[0].method not in PEFT_METHODS:
        return None
    try:
        import peft
    except ImportError:
        return None
    config = peft_config(compiled, spec.adapters[0].name, base_class=type(base).__name__)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def _seconds(run: Callable[[torch.Tensor], Any], ids: torch.Tensor) -> float:
    run(ids[:, :8])  # warm up (builds pefc's decoder once)
    started = time.perf_counter()
    run(ids)
    return time.perf_counter() - started


def _ratios(rates: dict[str, float]) -> dict[str, float]:
    out = {"pefc merged/base HF": rates["pefc merged"] / rates["base HF"]}
    if "HF PEFT" in rates:
        out["pefc/HF PEFT"] = rates["pefc"] / rates["HF PEFT"]
    return out


def table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_generate_bench`'s result."""
    names = list(result["rows"][0]["tokens_per_s"])
    lines = [f"generate on {result['device']}: prompt {result['prompt']}, {result['new_tokens']} new tokens "
             "(tokens/s)", "batch  " + "  ".join(f"{n:>12}" for n in names)]
    for row, ratios in zip(result["rows"], result["ratios"], strict=True):
        lines.append(f"{row['batch']:>5}  " + "  ".join(f"{row['tokens_per_s'][n]:>12.1f}" for n in names)
                     + "   " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)
