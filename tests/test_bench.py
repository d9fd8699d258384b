"""`pefc bench --json` returns every field (structure, not timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pefc.cli import main

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
    for row in [*data["forward"].values(), *data["train_step"].values()]:
        assert row["median_ms"] > 0
        assert "peak_mb" in row
    assert {"forward adapted/base", "forward merged/base", "train pefc/peft", "train peak pefc/peft"} <= set(data["ratios"])
    assert data["fusion"] == {"groups": 2}  # q and v read one input, in each of 2 layers
    assert data["compile_s"] > 0 and data["capture_s"] > 0
    assert data["peft"]["method"] == "lora"


def test_bench_rejects_bad_dims(capsys):
    assert main(["bench", str(ROOT / "specs/llama-lora.yaml"), "--dims", "seq=x"]) == 2
    assert "NAME=SIZE" in capsys.readouterr().err


def test_bench_generate_json_times_every_runner_side_by_side(capsys):
    code = main(["bench", str(ROOT / "specs/llama-lora.yaml"), "--generate", "--json", "--prompt", "4",
                 "--new-tokens", "2", "--batches", "1", "2", "--repeats", "2", "--no-onnx"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert (data["prompt"], data["new_tokens"], data["repeats"]) == (4, 2, 2)
    assert [row["batch"] for row in data["rows"]] == [1, 2]
    for row, ratios in zip(data["rows"], data["ratios"], strict=True):
        assert set(row["tokens_per_s"]) == {"pefc", "pefc merged", "base HF", "HF PEFT"}
        assert all(rate > 0 for rate in row["tokens_per_s"].values()) and row["load"] >= 0
        assert set(ratios) == {"pefc merged/base HF", "pefc/HF PEFT"}
