"""save_adapters / load_adapters: exact round trip, clear refusals, atomic writes, no pickle."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters
from safetensors.torch import save_file

import pefc
from pefc.checkpoint import ADAPTERS_FILE, SPEC_FILE
from pefc.spec import parse_spec

LORA = {"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}


def compiled(**overrides):
    return pefc.compile(parse_spec(make_spec([{**LORA, **overrides}])))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = compiled()
    randomize_adapters(model)
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_adapters(directory)
    return model, directory


def test_round_trip_is_exact(trained):
    model, directory = trained
    assert sorted(p.name for p in directory.iterdir()) == [ADAPTERS_FILE, SPEC_FILE]
    fresh = compiled()
    fresh.load_adapters(directory)
    model.eval()
    fresh.eval()
    inputs = batch(2, 6)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)


def test_spec_json_is_the_spec(trained):
    _, directory = trained
    assert parse_spec((directory / SPEC_FILE).read_text() and __import__("json").loads(
        (directory / SPEC_FILE).read_text())).adapters[0].r == 4


def test_other_rank_is_refused_naming_the_key(trained):
    _, directory = trained
    with pytest.raises(pefc.CheckpointError, match=r"adapter 'qv' differs in 'r': checkpoint 4, model 8"):
        compiled(r=8).load_adapters(directory)


def test_other_adapter_names_are_refused(trained):
    _, directory = trained
    with pytest.raises(pefc.CheckpointError, match=r"holds adapters \['qv'\] but the model has \['other'\]"):
        compiled(name="other").load_adapters(directory)


def test_shape_mismatch_names_the_tensor(trained, tmp_path):
    _, directory = trained
    tensors, _ = __import__("pefc.checkpoint", fromlist=["x"]).read_checkpoint(directory)
    model = pefc.compile(parse_spec(make_spec([LORA], family="llama")))
    key = "qv.model.layers.0.self_attn.q_proj.lora_A"
    tensors[key] = torch.zeros(4, 99)
    model_spec = model.pefc.spec.to_json()
    save_file(tensors, str(tmp_path / ADAPTERS_FILE), metadata={"format": "pefc.adapters/1", "spec": model_spec})
    with pytest.raises(pefc.CheckpointError, match=rf"tensor '{key}' has shape \[4, 99\] in the checkpoint"):
        model.load_adapters(tmp_path)


def test_missing_and_nan_tensors_are_refused(trained, tmp_path):
    from pefc.checkpoint import read_checkpoint

    _, directory = trained
    tensors, spec = read_checkpoint(directory)
    meta = {"format": "pefc.adapters/1", "spec": __import__("json").dumps(spec)}
    key = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / ADAPTERS_FILE), metadata=meta)
    with pytest.raises(pefc.CheckpointError, match=rf"tensor '{key}' is missing"):
        compiled().load_adapters(tmp_path)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(tmp_path / ADAPTERS_FILE), metadata=meta)
    with pytest.raises(pefc.CheckpointError, match=rf"tensor '{key}' holds NaN"):
        compiled().load_adapters(tmp_path)


def test_truncated_file_is_refused(trained, tmp_path):
    _, directory = trained
    data = (directory / ADAPTERS_FILE).read_bytes()
    (tmp_path / ADAPTERS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(pefc.CheckpointError, match="not a readable safetensors file"):
        compiled().load_adapters(tmp_path)


def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / ADAPTERS_FILE).write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(pefc.CheckpointError, match="never loads pickle"):
        compiled().load_adapters(tmp_path)


def test_failed_save_leaves_previous_files(trained, tmp_path, monkeypatch):
    model, directory = trained
    model.save_adapters(tmp_path)
    before = (tmp_path / ADAPTERS_FILE).read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pefc.checkpoint.save_file", explode)
    with pytest.raises(OSError):
        model.save_adapters(tmp_path)
    assert (tmp_path / ADAPTERS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTERS_FILE, SPEC_FILE]
