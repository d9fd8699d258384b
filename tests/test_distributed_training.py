"""DDP and FSDP2 with gloo, 2 CPU processes (torchrun), against a single-process run of the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_spec
from safetensors.torch import load_file
from test_docs_snippets import blocks_run_by

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"
ADAPTERS = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4, "alpha": 8, "dropout": 0.1},
            {"name": "down", "method": "dora", "target": ["@mlp.down"], "r": 2}]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def readme_commands() -> dict[str, list[str]]:
    """The README's `examples/train_ddp.py` commands, by mode (single, ddp, fsdp): run here, not by
    tests/test_docs_snippets.py, so the 2-process runs happen once and are checked closely."""
    commands = {}
    for block in blocks_run_by("tests/test_distributed_training.py"):
        for line in block.text.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                mode = "single" if argv[0] == "python" else "fsdp" if "--fsdp" in argv else "ddp"
                commands[mode] = argv
    assert sorted(commands) == ["ddp", "fsdp", "single"], commands
    return commands


def _script():
    spec = importlib.util.spec_from_file_location("train_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory with the repository's specs/ and examples/, as the README's commands expect."""
    work = tmp_path_factory.mktemp("work")
    for name in ("specs", "examples"):
        (work / name).symlink_to(ROOT / name)
    return work


def _adapters(work: Path, argv: list[str]) -> dict:
    return load_file(str(work / argv[argv.index("--out") + 1] / "adapters.safetensors"))


@pytest.fixture(scope="module")
def reference(workdir) -> dict:
    """The README's single-process run (in this process): the reference of the same global batch."""
    argv = readme_commands()["single"]
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        report = _script().main(argv[2:])
    finally:
        os.chdir(cwd)
    return {**report, "tensors": _adapters(workdir, argv)}


def _torchrun(workdir: Path, mode: str) -> dict:
    """The README's torchrun command (on a free port), with a JSON report."""
    argv = readme_commands()[mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("WORLD_SIZE", None)
    report = workdir / f"{mode}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:], "--report", str(report)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=workdir)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return {**json.loads(report.read_text()), "tensors": _adapters(workdir, argv)}


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
    assert all(k.startswith("qv.") for k in reference["tensors"])


def test_ddp_two_processes_match_single_process(workdir, reference):
    run = _torchrun(workdir, "ddp")
    assert run["mode"] == "ddp"
    _check_against_reference(run, reference)
    assert run["max_abs_diff"] < 1e-5  # what `--compare` prints
    # DDP synchronises adapter parameters only: every base parameter and buffer is ignored
    assert run["communicated"] and sorted(run["communicated"]) == sorted(reference["tensors"])


def test_fsdp2_per_layer_two_processes_match_single_process(workdir, reference):
    run = _torchrun(workdir, "fsdp")
    assert run["mode"] == "fsdp"
    # every parameter (frozen base and adapters) is sharded; one FSDP unit per decoder layer, plus the root
    assert run["sharded"]["params"] == run["sharded"]["of"] > 0
    assert run["sharded"]["units"] == ["(root)", "model.layers.0", "model.layers.1"]
    _check_against_reference(run, reference)


def test_fsdp2_shards_each_layer_and_keeps_names(tmp_path, monkeypatch):
    """fully_shard_layers on a 1-process gloo group: layers are FSDP units; names, outputs and the
    gradients of LoRA and DoRA adapters unchanged."""
    import pefc
    from pefc.distributed import fully_shard_layers, local_tensor
    from pefc.layers import LayerBlock

    spec = pefc.parse_spec(make_spec(ADAPTERS))
    model, plain = pefc.compile(spec).eval(), pefc.compile(spec).eval()  # eval: no dropout masks to match
    names = list(model.state_dict())
    ids = torch.randint(3, 100, (2, 6))
    expected = plain(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    expected.square().mean().backward()
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
        out.square().mean().backward()
        grads = {n: local_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad}
        want = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
        assert grads.keys() == want.keys() and any(n.endswith("lora_magnitude_vector") for n in grads)
        for name, grad in want.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0, msg=name)
        model.save_adapters(tmp_path)
        model.load_adapters(tmp_path)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
