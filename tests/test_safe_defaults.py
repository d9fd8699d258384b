"""Defaults that do not bite: float32 adapters over half-precision bases, a build in the spec's dtype
that first checks the weights fit, and exports that never leave a file from a failed command."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import batch, make_spec

import pefc
from pefc import ramcheck
from pefc.cli import main
from pefc.memory import PeakTensorMemory
from pefc.source import build_model
from pefc.spec import ModelSpec

LORA = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}]


def _stack(data, layers=3):
    """``data`` with ``layers`` decoder layers: a stack that ``pefc.plan`` replicates from a cut
    (static) capture, not the full capture a 2-layer model takes."""
    data["model"]["hf"]["config"]["num_hidden_layers"] = layers
    return data


def _write(tmp_path, data, name="spec.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _loss(model, inputs):
    logits = model(**inputs).logits.float()
    ids = inputs["input_ids"]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_a_float16_spec_trains_float32_adapters():
    model = pefc.compile(pefc.parse_spec(make_spec(LORA, dtype="float16")))
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    report = model.parameter_report()
    assert (report.base_dtype, report.adapter_dtype) == ("float16", "float32")
    assert "dtypes:           base float16, adapters float32 (float32 adapters by default" in report.table()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    inputs = batch(b=4, s=6)
    model.train()
    losses = []
    for _ in range(5):
        loss = _loss(model, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]


def test_the_plan_reports_the_default_adapter_dtype():
    # adapter_dtype still overrides: tests/test_numerical_guards.py compiles bfloat16 adapters with it
    report = pefc.plan(pefc.parse_spec(_stack(make_spec(LORA, dtype="bfloat16")))).report.to_dict()
    assert (report["base_dtype"], report["adapter_dtype"]) == ("bfloat16", "float32")


def test_the_model_is_built_in_the_spec_dtype_without_a_float32_copy():
    model_spec = ModelSpec.model_validate({"hf": make_spec([])["model"]["hf"], "dtype": "bfloat16"})
    with PeakTensorMemory() as memory:
        model = build_model(model_spec)
    weights = ramcheck.tensor_bytes(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert memory.peak_bytes < 1.5 * weights  # a float32 build cast afterwards peaks at 3x


def test_a_model_that_will_not_fit_stops_before_building_and_suggests_meta(tmp_path, monkeypatch, capsys):
    assert ramcheck.available_bytes() > 0
    monkeypatch.setattr(ramcheck, "available_bytes", lambda: 50_000)  # 50 kB free: the 3-layer model needs 137 kB
    monkeypatch.setattr("pefc.capture_cache._maxsize", 0)  # a capture cached by another test would skip the build
    spec = _write(tmp_path, _stack(make_spec(LORA)))
    allocated = []
    monkeypatch.setattr(torch.nn.Embedding, "reset_parameters",
                        lambda self: allocated.append(self) if not self.weight.is_meta else None)
    assert main(["inspect", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM in float32 needs about" in err and "only 0.0 GB" in err and "--meta" in err
    assert not allocated  # the real model was never built
    assert main(["inspect", str(spec), "--meta"]) == 0  # planning allocates nothing, so it is not checked


def test_a_bfloat16_export_is_not_verified_and_writes_nothing(tmp_path, capsys):
    spec = _write(tmp_path, make_spec(LORA, dtype="bfloat16"))
    out = tmp_path / "out"
    assert main(["export", str(spec), "-o", str(out / "m.onnx"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "cannot verify a bfloat16 ONNX file" in err and "--dtype float32" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_failed_verification_leaves_no_file(tmp_path, capsys):
    spec = _write(tmp_path, _stack(make_spec(LORA), layers=1))  # one layer: half the export; it still differs
    target = tmp_path / "m.onnx"
    assert main(["export", str(spec), "-o", str(target), "--verify", "--no-merge", "--atol", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pefc export: error: ") and "Traceback" not in err
    assert "m.onnx (not written): onnxruntime output differs from the PyTorch model" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    from pefc.checkpoint import save_checkpoint
    from pefc.interop.peft_files import write_peft_dir

    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "pefc", {"a": torch.zeros(2)}, "{}")
        write_peft_dir(tmp_path / "peft", {"peft_type": "LORA"}, {"a": torch.zeros(2)})
    finally:
        os.umask(previous)
    for path in (tmp_path / "pefc" / "spec.json", tmp_path / "pefc" / "adapters.safetensors",
                 tmp_path / "peft" / "adapter_config.json", tmp_path / "peft" / "adapter_model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
