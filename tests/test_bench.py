"""`pefc bench --json` returns every field (structure, not timings); the issue-18 train-step script runs."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from test_docs_snippets import blocks_run_by

from pefc import cpu_gemm
from pefc.bench import check_clock
from pefc.cli import main
from pefc.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec", ["specs/llama-lora.yaml"])
def test_bench_json_has_every_field(spec, capsys):
    code = main(["bench", str(ROOT / spec), "--json", "--repeats", "2", "--warmup", "1", "--dims", "batch=2", "seq=16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["dims"] == {"batch": 2, "seq": 16}
    assert set(data["forward"]) == {"base", "adapted", "merged"}
    assert {"pefc", "peft"} <= set(data["train_step"])
    # the same model with its lowered products in torch's BLAS, beside pefc's default choice
    assert ("pefc (torch gemm)" in data["train_step"]) == cpu_gemm.onednn_available()
    assert data["cpu_gemm"]["mode"] == "auto" and set(data["cpu_gemm"]["shapes"]) == {"onednn", "torch"}
    for row in [*data["forward"].values(), *data["train_step"].values()]:
        assert row["median_ms"] > 0
        assert "peak_mb" in row
    assert {"forward adapted/base", "forward merged/base", "train pefc/peft", "train peak pefc/peft"} <= set(data["ratios"])
    assert data["fusion"] == {"groups": 2, "base_products": 2}  # q and v read one input, in each of 2 layers
    assert data["compile_s"] > 0 and data["capture_s"] > 0
    assert data["peft"]["method"] == "lora"
    assert data["clock"] == "wall" and data["threads"] == torch.get_num_threads()


def test_bench_rejects_bad_dims(capsys):
    assert main(["bench", str(ROOT / "specs/llama-lora.yaml"), "--dims", "seq=x"]) == 2
    assert "NAME=SIZE" in capsys.readouterr().err


def test_bench_generate_json_times_every_runner_side_by_side(capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", str(ROOT / "specs/llama-lora.yaml"), "--generate", "--json", "--prompt", "4",
                     "--new-tokens", "2", "--batches", "1", "2", "--repeats", "2", "--no-onnx",
                     "--threads", "1", "--clock", "cpu"])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert (data["prompt"], data["new_tokens"], data["repeats"]) == (4, 2, 2)
    assert (data["clock"], data["threads"]) == ("cpu", 1)
    assert [row["batch"] for row in data["rows"]] == [1, 2]
    for row, ratios in zip(data["rows"], data["ratios"], strict=True):
        assert set(row["tokens_per_s"]) == {"pefc", "pefc merged", "base HF", "HF PEFT"}
        assert all(rate > 0 for rate in row["tokens_per_s"].values()) and row["load"] >= 0
        assert set(ratios) == {"pefc merged/base HF", "pefc/HF PEFT"}


def test_cpu_clock_is_refused_for_a_cuda_run():
    with pytest.raises(SpecError, match="--clock wall"):
        check_clock("cpu", "cuda")
    check_clock("cpu", "cpu")


def test_readme_train_steps_command_times_each_case_against_peft(tmp_path, monkeypatch, capsys):
    """The README's issue-18 command (examples/bench_train_steps.py), its cases on the small specs
    (specs/bench/X.yaml -> specs/llama-X.yaml) and small dims."""
    (block,) = blocks_run_by("tests/test_bench.py")
    argv = shlex.split(block.text.replace("\\\n", " "))
    assert argv[:2] == ["python", "examples/bench_train_steps.py"]
    cases = [a.replace("specs/bench/", f"{ROOT}/specs/llama-") for a in argv[2:] if a.startswith("specs/")]
    assert len(cases) == 3 and all(":" in case for case in cases)
    options = argv[2 + len(cases):]
    spec = importlib.util.spec_from_file_location("bench_train_steps", ROOT / "examples/bench_train_steps.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "steps.json"
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["bench_train_steps.py", *cases, *options, "--repeats", "2", "--warmup", "1",
                                      "--dims", "batch=1", "seq=8", "--json", str(out)])
    try:
        script.main()
        assert torch.get_num_threads() == 1  # the README's --threads 1
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["cases"]
    assert [row["case"] for row in rows] == cases
    assert all(row["pefc_ms"] > 0 and row["peft_ms"] > 0 and row["pefc/peft"] > 0 for row in rows)
    assert all(row["pefc_ms (torch gemm)"] > 0 and row["pefc/peft (torch gemm)"] > 0 for row in rows)  # --gemm torch
    assert "pefc/peft" in capsys.readouterr().out
    overridden = script.load_case(cases[0])
    assert (overridden.adapters[0].r, overridden.adapters[0].alpha, overridden.adapters[0].dropout) == (16, 32, 0)
