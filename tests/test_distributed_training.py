"""DDP and FSDP2 with gloo, 2 CPU processes (torchrun), against a single-process run of the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_spec
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"
ADAPTERS = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4, "alpha": 8, "dropout": 0.1},
            {"name": "down", "method": "dora", "target": ["@mlp.down"], "r": 2}]
TRAIN = ["--steps", "8", "--batch", "4", "--batches", "2", "--lr", "0.03", "--no-dropout"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _script():
    spec = importlib.util.spec_from_file_location("train_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(make_spec(ADAPTERS)))
    return path


@pytest.fixture(scope="module")
def reference(spec_file, tmp_path_factory) -> dict:
    """The single-process run (in this process) with the same global batch."""
    out = tmp_path_factory.mktemp("single")
    report = _script().main([str(spec_file), *TRAIN, "--out", str(out / "adapters")])
    return {**report, "tensors": load_file(str(out / "adapters" / "adapters.safetensors"))}


def _torchrun(spec_file: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               str(spec_file), *TRAIN, "--out", str(out / "adapters"), "--report", str(out / "report.json"), *extra]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    report = json.loads((out / "report.json").read_text())
    return {**report, "tensors": load_file(str(out / "adapters" / "adapters.safetensors"))}


def _check_against_reference(run: dict, reference: dict) -> None:
    assert run["world_size"] == 2
    assert sum(run["losses"][-2:]) < sum(run["losses"][:2])  # the loss falls
    assert run["base_unchanged"] and run["reload_exact"]
    assert run["tensors"].keys() == reference["tensors"].keys()
    for key, value in reference["tensors"].items():
        torch.testing.assert_close(run["tensors"][key], value, atol=1e-5, rtol=0, msg=key)
    assert run["losses"] == pytest.approx(reference["losses"], abs=1e-5)


def test_single_process_reference_trains(reference):
    assert reference["world_size"] == 1 and reference["base_unchanged"] and reference["reload_exact"]
    assert sum(reference["losses"][-2:]) < sum(reference["losses"][:2])
    assert all(k.startswith(("qv.", "down.")) for k in reference["tensors"])


def test_ddp_two_processes_match_single_process(spec_file, reference, tmp_path):
    run = _torchrun(spec_file, tmp_path)
    assert run["mode"] == "ddp"
    _check_against_reference(run, reference)
    # DDP synchronises adapter parameters only: every base parameter and buffer is ignored
    assert run["communicated"] and sorted(run["communicated"]) == sorted(reference["tensors"])


def test_fsdp2_per_layer_two_processes_match_single_process(spec_file, reference, tmp_path):
    run = _torchrun(spec_file, tmp_path, "--fsdp", "--gradient-checkpointing")
    assert run["mode"] == "fsdp"
    # every parameter (frozen base and adapters) is sharded; one FSDP unit per decoder layer, plus the root
    assert run["sharded"]["params"] == run["sharded"]["of"] > 0
    assert run["sharded"]["units"] == ["(root)", "model.layers.0", "model.layers.1"]
    _check_against_reference(run, reference)


def test_fsdp2_shards_each_layer_and_keeps_names(tmp_path, monkeypatch):
    """fully_shard_layers on a 1-process gloo group: layers are FSDP units, names and outputs unchanged."""
    import pefc
    from pefc.distributed import fully_shard_layers
    from pefc.layers import LayerBlock

    spec = pefc.parse_spec(make_spec(ADAPTERS[:1]))
    model = pefc.compile(spec)
    names = list(model.state_dict())
    ids = torch.randint(3, 100, (2, 6))
    expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        fully_shard_layers(model)
        blocks = [model.get_submodule(f"model.layers.{i}") for i in range(2)]
        assert all(isinstance(b, LayerBlock) and type(b).__name__.startswith("FSDP") for b in blocks)
        assert list(model.state_dict()) == names
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        model.save_adapters(tmp_path)
        model.load_adapters(tmp_path)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
