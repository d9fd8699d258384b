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
import json
import os
from pathlib import Path

import torch
import yaml

import pefc
from pefc import cpu_gemm
from pefc.atomic import write_text
from pefc.bench import cpu_gemm_report, run_train_steps_bench
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
    parser.add_argument("--gemm", nargs="*", default=[], choices=cpu_gemm.MODES, metavar="MODE",
                        help="also time pefc's model with its lowered products in these pefc.cpu_gemm modes "
                             "(auto, torch, onednn)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {name: int(size) for name, size in (item.split("=") for item in args.dims)}
    rows = run_train_steps_bench({case: load_case(case) for case in args.cases}, repeats=args.repeats,
                                 warmup=args.warmup, dims=sizes, gemm_modes=tuple(args.gemm))
    gemm = cpu_gemm_report()
    print(f"threads {args.threads}, dims {sizes}, medians of {args.repeats}, load {os.getloadavg()[0]:.2f}, "
          f"cpu gemm {gemm['mode']} ({', '.join(f'{k} {n}' for k, n in gemm['shapes'].items())} shapes)")
    extra = "".join(f" {f'{mode} gemm':>11}" for mode in args.gemm)
    print(f"{'case':<48} {'pefc ms':>8} {'peft ms':>8} {'pefc/peft':>9} {'(wall)':>7}{extra}")
    for row in rows:
        extra = "".join(f" {row[f'pefc/peft ({mode} gemm)']:11.3f}" for mode in args.gemm)
        print(f"{row['case']:<48} {row['pefc_ms']:8.1f} {row['peft_ms']:8.1f} {row['pefc/peft']:9.3f} "
              f"{row['wall pefc/peft']:7.3f}{extra}")
    if args.json:
        write_text(args.json, json.dumps({"threads": args.threads, "dims": sizes, "cpu_gemm": gemm, "cases": rows},
                                         indent=2))


if __name__ == "__main__":
    main()
