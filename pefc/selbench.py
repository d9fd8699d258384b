"""``pefc bench`` of a spec with ``select``: many adapters in one batch, side by side in one run.

The batch (``batch`` rows, default 8) spreads evenly over the selected adapters. Forward
latency (no grad, eval; a median over round-robin repeats, as :mod:`pefc.bench`) of:

- ``selecting``: the compiled model, one call with per-row ``adapter_ids``;
- ``peft mixed``: HF PEFT's mixed batch (``adapter_names=`` per row; LoRA adapters only), the same
  weights (seeded random ones; its outputs are checked against pefc's: ``peft["max_abs_diff"]``);
- ``separate``: one single-adapter pefc model per adapter, each on its own rows (the sum);
- ``selecting one``: the selecting model with every row on the first adapter, vs ``single``: that
  adapter's single-adapter model on the whole batch.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pefc.bench import Measurement, _measure, check_clock
from pefc.errors import SpecError
from pefc.schema import SpecBase
from pefc.source import build_model, example_inputs

DEFAULT_DIMS = {"batch": 8, "seq": 128}


@dataclass
class SelectionBenchReport:
    device: str
    dims: dict[str, int]
    repeats: int
    adapters: list[str]
    forward: dict[str, Measurement] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"device {self.device}, dims {self.dims}, {len(self.adapters)} selected adapters, "
                 f"median of {self.repeats} after warm-up", "", f"{'forward':<28} {'median ms':>10}"]
        lines += [f"{name:<28} {m.median_ms:>10.3f}" for name, m in self.forward.items()]
        lines += [""] + [f"{name:<34} {value:>8.3f}" for name, value in self.ratios.items()]
        if self.peft.get("skipped"):
            lines.append(f"HF PEFT: skipped ({self.peft['skipped']})")
        elif "max_abs_diff" in self.peft:
            lines.append(f"HF PEFT mixed batch vs pefc: max |diff| {self.peft['max_abs_diff']:.2e}")
        return "\n".join(lines)


def run_selection_bench(spec: SpecBase, *, device: str | None = None, repeats: int = 20, warmup: int = 3,
                        dims: dict[str, int] | None = None, compare_peft: bool = True,
                        trust_code: bool = False, clock: str = "wall") -> SelectionBenchReport:
    """Measure ``spec`` (with ``select``) as the module docstring says."""
    from pefc.compiler import compile as compile_spec

    if spec.model is None or spec.select is None:
        raise SpecError("the selection bench needs a spec with a `model` and `select`")
    device = device or spec.model.device
    check_clock(clock, device)
    target = torch.device(device)
    base = build_model(spec.model, device=device, trust_code=trust_code).eval()
    selecting = compile_spec(spec, device=device, trust_code=trust_code).eval()  # the spec's base, as ``base``
    _perturb(selecting)
    names = list(spec.select.adapters)
    sizes = spec.dims()
    sizes.update({k: v for k, v in DEFAULT_DIMS.items() if k in sizes}, **(dims or {}))
    inputs = example_inputs(spec, device=target, seed=1, sizes=sizes)
    rows = next(iter(inputs.values())).shape[0]
    ids = (torch.arange(rows) * len(names) // rows).to(target)  # rows spread evenly, in blocks
    report = SelectionBenchReport(str(target), sizes, repeats, names)
    singles = {name: _single(spec, name, device, selecting, trust_code) for name in names}
    runs = {"selecting": _call(selecting, {**inputs, spec.select.input: ids}),
            "separate": _separate(singles, inputs, ids, names)}
    peft_model = _peft_mixed(report, spec, base, selecting, names) if compare_peft else None
    if peft_model is not None:
        adapter_names = [names[i] for i in ids.tolist()]
        runs["peft mixed"] = _call(peft_model, {**inputs, "adapter_names": adapter_names})
        with torch.no_grad():
            want = runs["selecting"]().logits
            report.peft["max_abs_diff"] = float((runs["peft mixed"]().logits - want).abs().max())
    runs["selecting one"] = _call(selecting, {**inputs, spec.select.input: torch.zeros_like(ids)})
    runs["single"] = _call(singles[names[0]], inputs)
    report.forward = _measure(runs, target, repeats, warmup, clock=clock)
    ms = {name: m.median_ms for name, m in report.forward.items()}
    report.ratios["selecting/separate"] = ms["selecting"] / ms["separate"]
    if "peft mixed" in ms:
        report.ratios["selecting/peft mixed"] = ms["selecting"] / ms["peft mixed"]
    report.ratios["selecting one/single"] = ms["selecting one"] / ms["single"]
    return report


def _perturb(model: nn.Module, scale: float = 0.02) -> None:
    """Seeded noise on every adapter tensor: fresh LoRA adapters are all the identity (B = 0), which
    would make the HF PEFT comparison vacuous."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * scale)


def _call(model: nn.Module, inputs: dict[str, Any]) -> Any:
    def run() -> Any:
        with torch.no_grad():
            return model(**inputs)
    return run


def _separate(singles: dict[str, nn.Module], inputs: dict[str, torch.Tensor], ids: torch.Tensor,
              names: list[str]) -> Any:
    """One forward per adapter, each of its single-adapter model on that adapter's rows."""
    parts = [(singles[name], {k: v[ids == i] for k, v in inputs.items()}) for i, name in enumerate(names)]

    def run() -> None:
        with torch.no_grad():
            for model, rows in parts:
                if next(iter(rows.values())).shape[0]:
                    model(**rows)
    return run


def _single(spec: SpecBase, name: str, device: str, selecting: Any, trust_code: bool) -> nn.Module:
    """``name`` alone (with the spec's always-on adapters), compiled from the spec's base, same weights
    (a capture of the spec's model is reused when :mod:`pefc.capture_cache` is on)."""
    from pefc.compiler import compile as compile_spec

    selected = set(spec.select.adapters) - {name}
    adapters = [a for a in spec.adapters if a.name not in selected]
    variant = spec.model_copy(update={"adapters": adapters, "select": None})
    model = compile_spec(variant, device=device, trust_code=trust_code)
    state = selecting.adapter_state_dict()
    with torch.no_grad():
        for key, value in model.adapter_state_dict().items():
            value.copy_(state[key])
    return model.eval()


def _peft_mixed(report: SelectionBenchReport, spec: SpecBase, base: nn.Module, selecting: Any,
                names: list[str]) -> nn.Module | None:
    """HF PEFT's model with every selected adapter loaded (same weights), or None (why in the report)."""
    from pefc.interop.peft import peft_config, save

    methods = {a.method for a in spec.adapters}
    if methods != {"lora"} or len(spec.adapters) != len(names):
        report.peft["skipped"] = "HF PEFT's mixed batch takes LoRA adapters only, all of them selected"
        return None
    try:
        import peft
    except ImportError:
        report.peft["skipped"] = "peft is not installed"
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:  # each adapter as PEFT saves it, read back as safetensors only
            save(selecting, Path(tmp) / name, adapter=name)
            config = peft_config(selecting, name)
            if model is None:
                model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            set_peft_model_state_dict(model, load_file(str(Path(tmp) / name / "adapter_model.safetensors")),
                                      adapter_name=name)
    report.peft["version"] = peft.__version__
    return model.eval() if model is not None else None
