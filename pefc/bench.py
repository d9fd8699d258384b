"""`pefc bench`: base vs adapted vs merged, and pefc vs HF PEFT, measured in one run.

Every timing is a median over repeats after warm-up, on the same inputs. The models compared
with each other (base, adapted and merged forward; pefc and HF PEFT train step) are timed
round-robin, one call of each per round, so drift in clock speed or machine load falls on
all of them alike. Peak memory, of one more call of each, is what that call allocates at its peak:
``torch.cuda.max_memory_allocated`` on CUDA, tensor storage counted op by op
(:class:`pefc.memory.PeakTensorMemory`) on CPU; weights and optimizer state that exist
before the call are not counted.

The clock is wall time by default; ``clock="cpu"`` times the process's CPU time instead, which
on one thread (``pefc bench --threads 1 --clock cpu``) is the run's own work and is not inflated
by other jobs on a shared machine (CPU only: a CUDA kernel's time is not the process's).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from pefc import cpu_gemm
from pefc.compiled import CompiledModel
from pefc.compiler import compile as compile_spec
from pefc.errors import SpecError
from pefc.memory import PeakTensorMemory
from pefc.schema import SpecBase
from pefc.source import build_model, example_inputs


@dataclass
class Measurement:
    median_ms: float
    peak_mb: float | None


@dataclass
class BenchReport:
    device: str
    dims: dict[str, int]
    repeats: int
    compile_s: float
    capture_s: float
    forward: dict[str, Measurement] = field(default_factory=dict)
    train_step: dict[str, Measurement] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)
    #: what :mod:`pefc.fusion` fused in the adapted model (``groups``: sites sharing one A product)
    fusion: dict[str, Any] = field(default_factory=dict)
    #: the clock of the timings (:data:`CLOCKS`) and the threads PyTorch ran on
    clock: str = "wall"
    threads: int = field(default_factory=torch.get_num_threads)
    #: how the lowered products chose their CPU library (:mod:`pefc.cpu_gemm`): ``mode`` and, per
    #: library, the shapes it got
    cpu_gemm: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"device {self.device}, dims {self.dims}, median of {self.repeats} after warm-up, "
                 f"{self.clock} time, {self.threads} thread(s)",
                 f"compile: {self.compile_s:.2f}s (capture {self.capture_s:.2f}s)", "",
                 f"{'measurement':<28} {'median ms':>10} {'peak MB':>9}"]
        for group, rows in (("forward", self.forward), ("train step", self.train_step)):
            for name, m in rows.items():
                peak = f"{m.peak_mb:9.1f}" if m.peak_mb is not None else f"{'-':>9}"
                lines.append(f"{group + ' ' + name:<28} {m.median_ms:>10.3f} {peak}")
        lines += [""] + [f"{name:<28} {value:>10.3f}" for name, value in self.ratios.items()]
        if self.peft.get("skipped"):
            lines.append(f"HF PEFT: skipped ({self.peft['skipped']})")
        if self.cpu_gemm.get("shapes"):
            shapes = ", ".join(f"{library} {n}" for library, n in self.cpu_gemm["shapes"].items())
            lines.append(f"cpu gemm {self.cpu_gemm['mode']}: shapes per library: {shapes}")
        return "\n".join(lines)


class _PeakMemory:
    """Peak memory of the tensors one measured region allocates, in MB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.counter = PeakTensorMemory().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        else:
            self.counter.__exit__(*exc)
            self.peak_mb = self.counter.peak_bytes / 2**20


#: the clocks a benchmark can time with (seconds)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def check_clock(clock: str, device: str | torch.device) -> None:
    """Refuse a clock that cannot time runs on ``device``."""
    if clock not in CLOCKS:
        raise SpecError(f"unknown clock {clock!r}: use one of {', '.join(CLOCKS)}")
    if clock == "cpu" and torch.device(device).type != "cpu":
        raise SpecError(f"--clock cpu times the process's CPU work, not a kernel on {device}: use --clock wall")


def _measure(runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
             warmup: int, *, peaks: bool = True, clock: str = "wall") -> dict[str, Measurement]:
    """Warm each run up, time them round-robin ``repeats`` times, then (``peaks``) take each one's peak memory."""
    times = _round_robin(runs, device, repeats, warmup, (clock,))[clock]
    peak_mb: dict[str, float | None] = dict.fromkeys(runs)
    for name, run in runs.items() if peaks else ():
        with _PeakMemory(device) as memory:
            run()
        peak_mb[name] = memory.peak_mb
    return {name: Measurement(statistics.median(times[name]), peak_mb[name]) for name in runs}


def _round_robin(runs: dict[Any, Callable[[], Any]], device: torch.device, repeats: int, warmup: int,
                 clocks: tuple[str, ...]) -> dict[str, dict[Any, list[float]]]:
    """Warm each run up, then time one call of each in turn, ``repeats`` rounds: ms per clock and run."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, dict[Any, list[float]]] = {clock: {name: [] for name in runs} for clock in clocks}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = [CLOCKS[clock]() for clock in clocks]
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for clock, start in zip(clocks, started, strict=True):
                times[clock][name].append((CLOCKS[clock]() - start) * 1000)
    return times


#: the train-step row of pefc's model with every lowered product in torch's BLAS (:mod:`pefc.cpu_gemm`)
TORCH_GEMM_ROW = "pefc (torch gemm)"


def _in_gemm_mode(mode: str, run: Callable[[], Any]) -> Callable[[], Any]:
    def in_mode() -> Any:
        with cpu_gemm.using(mode):
            return run()
    return in_mode


def cpu_gemm_report() -> dict[str, Any]:
    """``{"mode", "shapes": {library: count}}``: what :mod:`pefc.cpu_gemm` has chosen in this process."""
    chosen = list(cpu_gemm.choices().values())
    return {"mode": cpu_gemm.mode(), "shapes": {library: chosen.count(library) for library in ("onednn", "torch")}}


def _loss(output: Any) -> torch.Tensor:
    """A generic scalar loss: mean square of the first floating output (same for every model)."""
    leaf = next(t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point())
    return leaf.float().pow(2).mean()


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(**inputs)
    return run


def _train_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> None:
        loss = _loss(model(**inputs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def run_bench(spec: SpecBase, *, device: str | None = None, repeats: int = 20, warmup: int = 3,
              dims: dict[str, int] | None = None, compare_peft: bool = True, trust_code: bool = False,
              compiled_step: bool = False, clock: str = "wall") -> BenchReport:
    """Measure ``spec`` on ``device`` (default: the spec's); see the module docstring.

    ``trust_code=True`` consents to import and call the spec's ``model.python`` (:mod:`pefc.trust`).
    ``compiled_step=True`` also times both train steps under ``torch.compile`` (rows ``pefc compiled``
    and ``peft compiled``, time only; the first warm-up call compiles). ``clock``: ``"wall"`` or ``"cpu"``.
    """
    if spec.model is None:
        raise SpecError("bench needs a spec with a `model` (it builds the base model to compare against)")
    device = device or spec.model.device
    check_clock(clock, device)
    base = build_model(spec.model, device=device, trust_code=trust_code).eval()
    started = time.perf_counter()
    compiled = compile_spec(spec, model=copy.deepcopy(base))
    compile_s = time.perf_counter() - started
    capture_s = compiled.pefc.extras.get("timings", {}).get("capture_s", float("nan"))
    merged = compiled.merge().eval()
    compiled.eval()
    target = torch.device(device)
    sizes = {**spec.dims(), **(dims or {})}
    inputs = example_inputs(spec, device=target, seed=1, sizes=sizes)
    report = BenchReport(str(target), sizes, repeats, compile_s, capture_s,
                         fusion=dict(compiled.pefc.extras.get("fusion", {})), clock=clock)
    forward = {name: _forward(model, inputs) for name, model in
               (("base", base), ("adapted", compiled), ("merged", merged))}
    report.forward = _measure(forward, target, repeats, warmup, clock=clock)
    report.ratios["forward adapted/base"] = report.forward["adapted"].median_ms / report.forward["base"].median_ms
    report.ratios["forward merged/base"] = report.forward["merged"].median_ms / report.forward["base"].median_ms
    compiled.train()
    steps = {"pefc": _train_step(compiled, inputs)}
    if target.type == "cpu" and cpu_gemm.mode() != "torch" and cpu_gemm.onednn_available():
        steps[TORCH_GEMM_ROW] = _in_gemm_mode("torch", _train_step(compiled.clone().train(), inputs))
    reference = _peft_reference(report, spec, base, compiled, target) if compare_peft else None
    if reference is not None:
        steps["peft"] = _train_step(reference, inputs)
    report.train_step = _measure(steps, target, repeats, warmup, clock=clock)
    report.cpu_gemm = cpu_gemm_report()
    if reference is not None:
        for row in ("pefc", TORCH_GEMM_ROW):
            if row in report.train_step:
                report.ratios[f"train {row}/peft"] = report.train_step[row].median_ms / report.train_step["peft"].median_ms
        pefc_peak, peft_peak = report.train_step["pefc"].peak_mb, report.train_step["peft"].peak_mb
        if pefc_peak is not None and peft_peak:
            report.ratios["train peak pefc/peft"] = pefc_peak / peft_peak
    if compiled_step:
        _measure_compiled(report, compiled, reference, inputs, target, repeats, max(warmup, 2), clock)
    return report


def _measure_compiled(report: BenchReport, compiled: nn.Module, reference: nn.Module | None,
                      inputs: dict[str, torch.Tensor], device: torch.device, repeats: int, warmup: int,
                      clock: str) -> None:
    """Train steps of ``torch.compile(model)`` for pefc (and HF PEFT), into ``report``."""
    steps = {"pefc compiled": _train_step(torch.compile(compiled), inputs)}
    if reference is not None:
        steps["peft compiled"] = _train_step(torch.compile(reference), inputs)
    report.train_step.update(_measure(steps, device, repeats, warmup, peaks=False, clock=clock))
    if reference is not None:
        report.ratios["train compiled pefc/peft"] = (report.train_step["pefc compiled"].median_ms
                                                     / report.train_step["peft compiled"].median_ms)


def _peft_reference(report: BenchReport, spec: SpecBase, base: nn.Module, compiled: CompiledModel,
                    device: torch.device) -> nn.Module | None:
    """The same adapter built by HF PEFT on a copy of ``base`` (train mode), or None (reason in the report)."""
    reference, report.peft = peft_reference(spec, base, compiled, device)
    return reference


def peft_reference(spec: SpecBase, base: nn.Module, compiled: CompiledModel,
                   device: torch.device) -> tuple[nn.Module | None, dict[str, Any]]:
    """HF PEFT's model of ``spec``'s adapter on a copy of ``base`` (train mode) and what it is
    (``version``, ``method``, ``trainable_params``), or None and ``{"skipped": why}``."""
    from pefc.interop.peft import PEFT_METHODS, peft_config

    if len(spec.adapters) != 1 or spec.adapters[0].method not in PEFT_METHODS:
        return None, {"skipped": "HF PEFT has no single equivalent of this spec"}
    try:
        import peft
    except ImportError:
        return None, {"skipped": "peft is not installed"}
    adapter = spec.adapters[0]
    config = peft_config(compiled, adapter.name, base_class=type(base).__name__)
    reference = peft.get_peft_model(copy.deepcopy(base), config).to(device)
    reference.train()
    return reference, {"version": peft.__version__, "method": adapter.method,
                       "trainable_params": sum(p.numel() for p in reference.parameters() if p.requires_grad)}


def run_train_steps_bench(cases: dict[str, SpecBase], *, repeats: int = 15, warmup: int = 3,
                          dims: dict[str, int] | None = None, gemm_modes: tuple[str, ...] = ()
                          ) -> list[dict[str, Any]]:
    """One train step of pefc and of HF PEFT for every case, every model timed in turn in one loop
    (so drift in clock speed or load falls on all alike), on CPU: per case ``{"case", "pefc_ms",
    "peft_ms", "pefc/peft", "wall pefc/peft"}``, medians of CPU time (and the ratio of wall time).

    ``gemm_modes`` (:mod:`pefc.cpu_gemm`) also times pefc's model, a copy of it, in each of these
    modes: ``"pefc_ms (MODE gemm)"`` and ``"pefc/peft (MODE gemm)"``."""
    device = torch.device("cpu")
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    for name, spec in cases.items():
        if spec.model is None:
            raise SpecError(f"{name}: the train-step bench needs a spec with a `model`")
        base = build_model(spec.model, device="cpu").eval()
        compiled = compile_spec(spec, model=copy.deepcopy(base)).train()
        inputs = example_inputs(spec, device=device, seed=1, sizes={**spec.dims(), **(dims or {})})
        reference, info = peft_reference(spec, base, compiled, device)
        if reference is None:
            raise SpecError(f"{name}: {info['skipped']}")
        steps[(name, "pefc")], steps[(name, "peft")] = _train_step(compiled, inputs), _train_step(reference, inputs)
        for mode in gemm_modes:
            steps[(name, f"pefc ({mode} gemm)")] = _in_gemm_mode(mode, _train_step(compiled.clone().train(), inputs))
    times = _round_robin(steps, device, repeats, warmup, ("cpu", "wall"))
    rows = []
    for name in cases:
        ms, wall_ms = ({side: statistics.median(times[clock][key]) for key in steps if key[0] == name
                        for side in [key[1]]} for clock in ("cpu", "wall"))
        row = {"case": name, "pefc_ms": ms["pefc"], "peft_ms": ms["peft"], "pefc/peft": ms["pefc"] / ms["peft"],
               "wall pefc/peft": wall_ms["pefc"] / wall_ms["peft"]}
        for mode in gemm_modes:
            row[f"pefc_ms ({mode} gemm)"] = ms[f"pefc ({mode} gemm)"]
            row[f"pefc/peft ({mode} gemm)"] = ms[f"pefc ({mode} gemm)"] / ms["peft"]
        rows.append(row)
    return rows


# --- a float base against a quantized one (``pefc bench SPEC --quantized nf4``) ---------------

@dataclass
class QuantBenchReport:
    """Train step time and memory of the spec's float base against the same base quantized."""

    device: str
    dims: dict[str, int]
    repeats: int
    method: str
    #: bytes of the base's weights as stored, per base ("float", "<method>")
    weight_mb: dict[str, float] = field(default_factory=dict)
    train_step: dict[str, Measurement] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"device {self.device}, dims {self.dims}, median of {self.repeats} after warm-up",
                 "peak MB: what one train step allocates beyond the weights and optimizer state", "",
                 f"{'base':<10} {'weights MB':>11} {'step ms':>10} {'peak MB':>9}"]
        for name, m in self.train_step.items():
            peak = f"{m.peak_mb:9.1f}" if m.peak_mb is not None else f"{'-':>9}"
            lines.append(f"{name:<10} {self.weight_mb[name]:>11.1f} {m.median_ms:>10.1f} {peak}")
        lines += [""] + [f"{name:<34} {value:>8.3f}" for name, value in self.ratios.items()]
        return "\n".join(lines)


def run_quant_bench(spec: SpecBase, method: str = "nf4", *, device: str | None = None, repeats: int = 5,
                    warmup: int = 1, dims: dict[str, int] | None = None, clock: str = "wall") -> QuantBenchReport:
    """Time a train step of ``spec`` (its base as the spec gives it) against the same spec with
    ``model.quantize: {method: ...}`` (compute dtype: the spec's ``model.dtype``)."""
    from pefc.quant import stored_bytes

    if spec.model is None:
        raise SpecError("bench needs a spec with a `model`")
    quantize = {"method": method, **({} if spec.model.quantize is None else
                                     spec.model.quantize.model_dump(exclude={"method"}))}
    float_spec = spec.model_copy(update={"model": spec.model.model_copy(update={"quantize": None})})
    quant_model = spec.model.model_validate({**spec.model.model_dump(by_alias=True), "quantize": quantize})
    quant_spec = spec.model_copy(update={"model": quant_model,
                                         "adapter_dtype": spec.adapter_dtype or spec.model.dtype})
    target = torch.device(device or spec.model.device)
    check_clock(clock, target)
    sizes = {**spec.dims(), **(dims or {})}
    inputs = example_inputs(spec, device=target, seed=1, sizes=sizes)
    report = QuantBenchReport(str(target), sizes, repeats, method)
    steps = {}
    for name, variant in (("float", float_spec), (method, quant_spec)):
        model = compile_spec(variant, device=str(target)).train()
        report.weight_mb[name] = stored_bytes(model, exclude=set(model.pefc.adapter_names)) / 2**20
        steps[name] = _train_step(model, inputs)
    report.train_step = _measure(steps, target, repeats, warmup, clock=clock)
    report.ratios[f"weights {method}/float"] = report.weight_mb[method] / report.weight_mb["float"]
    report.ratios[f"train step {method}/float"] = (report.train_step[method].median_ms
                                                   / report.train_step["float"].median_ms)
    if report.train_step["float"].peak_mb:
        report.ratios[f"step peak {method}/float"] = (report.train_step[method].peak_mb or 0.0) / \
            report.train_step["float"].peak_mb
    return report
