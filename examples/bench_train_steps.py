"""Train steps of pefc against HF PEFT for several cases in one process, timed round-robin.

Issue 18's table (README, "Planning at scale and benchmarks") is this command's output:

    python examples/bench_train_steps.py specs/bench/lora.yaml:r=16,alpha=32,dropout=0 \
        specs/bench/lora.yaml:r=16,alpha=32 specs/bench/dora.yaml:r=16,alpha=32 --threads 1 --repeats 15

A case is ``SPEC[:KEY=VALUE,...]``: the keys override every adapter of the spec. Each round times
one train step (forward, the bench's loss, backward, AdamW) of every model in turn, so drift in
clock speed or load falls on all alike; the medians are of CPU time (the process's, which with one
thread is the step's own and is not inflated by other jobs), with wall time beside them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

import pefc
from pefc.bench import BenchReport, _peft_reference, _train_step
from pefc.source import build_model, example_inputs
from pefc.spec import parse_spec, read_spec_data


def load_case(case: str) -> pefc.SpecBase:
    """``SPEC[:KEY=VALUE,...]``: the spec with the keys set on every adapter (values read as YAML)."""
    path, _, overrides = case.partition(":")
    data, _ = read_spec_data(path)
    keys = dict(item.split("=", 1) for item in overrides.split(",") if item)
    for adapter in data["adapters"]:
        adapter.update({key: yaml.safe_load(value) for key, value in keys.items()})
    return parse_spec(data, source=path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+", metavar="SPEC[:KEY=VALUE,...]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dims", nargs="*", default=["batch=4", "seq=128"], metavar="NAME=SIZE")
    parser.add_argument("--json", type=Path, help="also write the medians and ratios here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {name: int(size) for name, size in (item.split("=") for item in args.dims)}
    device = torch.device("cpu")
    steps = {}
    for case in args.cases:
        spec = load_case(case)
        base = build_model(spec.model, device="cpu").eval()
        compiled = pefc.compile(spec, model=copy.deepcopy(base)).train()
        inputs = example_inputs(spec, device=device, seed=1, sizes=sizes)
        reference = _peft_reference(BenchReport("cpu", sizes, args.repeats, 0.0, 0.0), spec, base, compiled, device)
        if reference is None:
            raise SystemExit(f"{case}: HF PEFT has no equivalent of this spec (or peft is not installed)")
        steps[(case, "pefc")] = _train_step(compiled, inputs)
        steps[(case, "peft")] = _train_step(reference, inputs)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    wall: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            step()
            cpu[key].append((time.process_time() - started_cpu) * 1e3)
            wall[key].append((time.perf_counter() - started_wall) * 1e3)
    cpu_ms = {key: statistics.median(v) for key, v in cpu.items()}
    wall_ms = {key: statistics.median(v) for key, v in wall.items()}
    print(f"threads {args.threads}, dims {sizes}, medians of {args.repeats}, load {os.getloadavg()[0]:.2f}")
    print(f"{'case':<60} {'pefc ms':>9} {'peft ms':>9} {'pefc/peft':>10} {'(wall)':>7}")
    rows = []
    for case in args.cases:
        ratio = cpu_ms[(case, "pefc")] / cpu_ms[(case, "peft")]
        wall_ratio = wall_ms[(case, "pefc")] / wall_ms[(case, "peft")]
        print(f"{case:<60} {cpu_ms[(case, 'pefc')]:9.1f} {cpu_ms[(case, 'peft')]:9.1f} {ratio:10.3f} {wall_ratio:7.3f}")
        rows.append({"case": case, "pefc_ms": cpu_ms[(case, "pefc")], "peft_ms": cpu_ms[(case, "peft")],
                     "pefc/peft": ratio, "wall pefc/peft": wall_ratio})
    if args.json:
        from pefc.atomic import write_text

        write_text(args.json, json.dumps({"threads": args.threads, "dims": sizes, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
