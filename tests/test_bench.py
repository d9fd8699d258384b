"""`pefc bench --json` returns every field (structure, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("spec", ["specs/llama-lora.yaml"])
def test_bench_json_has_every_field(spec):
    result = subprocess.run([sys.executable, "-m", "pefc.cli", "bench", spec, "--json", "--repeats", "2",
                             "--warmup", "1", "--dims", "batch=2", "seq=16"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["dims"] == {"batch": 2, "seq": 16}
    assert set(data["forward"]) == {"base", "adapted", "merged"}
    assert {"pefc", "peft"} <= set(data["train_step"])
    for row in [*data["forward"].values(), *data["train_step"].values()]:
        assert row["median_ms"] > 0
        assert "peak_mb" in row
    assert {"forward adapted/base", "forward merged/base", "train pefc/peft"} <= set(data["ratios"])
    assert data["compile_s"] > 0 and data["capture_s"] > 0
    assert data["peft"]["method"] == "lora"


def test_bench_rejects_bad_dims():
    result = subprocess.run([sys.executable, "-m", "pefc.cli", "bench", "specs/llama-lora.yaml", "--dims", "seq=x"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "NAME=SIZE" in result.stderr
