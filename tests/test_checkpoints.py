"""save_adapters / load_adapters: exact round trip, clear refusals, atomic writes, no pickle."""

from __future__ import annotations

import ast
import json
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import pefc
from pefc.checkpoint import ADAPTERS_FILE, SPEC_FILE, read_checkpoint, save_checkpoint
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


# --- checkpoint safety: wrong dtype, extra tensors, another model, corruption, no pickle -----------

def _resave(directory, tensors, spec):
    """A pefc checkpoint (with digests) of ``tensors`` and the embedded ``spec`` dict."""
    return save_checkpoint(directory, tensors, json.dumps(spec))


def test_wrong_dtype_is_refused_naming_file_and_tensor(trained, tmp_path):
    _, directory = trained
    tensors, spec = read_checkpoint(directory)
    _resave(tmp_path, {k: v.to(torch.bfloat16) for k, v in tensors.items()}, spec)
    key = next(iter(compiled().adapter_state_dict()))
    with pytest.raises(pefc.CheckpointError, match=rf"{tmp_path / ADAPTERS_FILE}: tensor '{key}' is "
                                                   r"torch.bfloat16 in the checkpoint but torch.float32"):
        compiled().load_adapters(tmp_path)


def test_extra_tensor_is_refused_naming_file_and_tensor(trained, tmp_path):
    _, directory = trained
    tensors, spec = read_checkpoint(directory)
    tensors["qv.model.layers.9.self_attn.q_proj.lora_A"] = torch.zeros(4, 32)
    _resave(tmp_path, tensors, spec)
    with pytest.raises(pefc.CheckpointError, match=rf"{tmp_path / ADAPTERS_FILE}: the checkpoint has tensor "
                                                   r"'qv.model.layers.9.self_attn.q_proj.lora_A' that this model "
                                                   r"does not have \(1 unexpected\)"):
        compiled().load_adapters(tmp_path)


def test_checkpoint_of_another_base_model_names_file_tensor_and_both_models(tmp_path):
    adapter = {"name": "out", "method": "lora", "target": ["@attn.o"], "r": 4}
    pefc.compile(parse_spec(make_spec([adapter], family="gpt2"))).save_adapters(tmp_path)
    llama = pefc.compile(parse_spec(make_spec([adapter], family="llama")))
    with pytest.raises(pefc.CheckpointError) as info:
        llama.load_adapters(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / ADAPTERS_FILE}: tensor 'out.model.layers.0.self_attn.o_proj.lora_A' "
                              "is missing from the checkpoint (4 missing)")
    assert "saved for GPT2LMHeadModel" in message and "this model is LlamaForCausalLM" in message


def test_loading_reads_only_the_safetensors_file_not_spec_json(trained, tmp_path):
    model, directory = trained
    shutil.copy(directory / ADAPTERS_FILE, tmp_path / ADAPTERS_FILE)
    other = make_spec([{**LORA, "target": ["@attn.qkv"], "r": 8}], family="gpt2")
    (tmp_path / SPEC_FILE).write_text(json.dumps(other))  # a spec.json from another model
    fresh = compiled()
    fresh.load_adapters(tmp_path)
    assert all(torch.equal(v, model.adapter_state_dict()[k]) for k, v in fresh.adapter_state_dict().items())


def test_every_flipped_byte_is_refused_or_changes_nothing(trained, tmp_path):
    """Flip bytes all over the file (header, metadata, tensor data): never a wrong load, never another error."""
    model, directory = trained
    data = (directory / ADAPTERS_FILE).read_bytes()
    want = model.adapter_state_dict()
    fresh = compiled()
    rng = random.Random(0)
    refused = 0
    positions = [rng.randrange(len(data)) for _ in range(150)] + list(range(8)) + [len(data) - 1]
    for position in positions:
        (tmp_path / ADAPTERS_FILE).write_bytes(data[:position] + bytes([data[position] ^ (1 << rng.randrange(8))])
                                               + data[position + 1:])
        try:
            fresh.load_adapters(tmp_path)
        except pefc.CheckpointError as exc:
            assert str(tmp_path / ADAPTERS_FILE) in str(exc)
            refused += 1
            continue
        assert all(torch.equal(v, want[k]) for k, v in fresh.adapter_state_dict().items()), position
    assert refused >= len(positions) * 0.9


def test_garbage_embedded_spec_is_a_checkpoint_error(trained, tmp_path):
    tensors, _ = read_checkpoint(trained[1])
    fresh = compiled()
    json_trees = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                              lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                                  st.sampled_from(["adapters", "name", "method", "r", "x"]), kids, max_size=3),
                              max_leaves=12)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(json_trees)
    def check(tree):
        save_file(tensors, str(tmp_path / ADAPTERS_FILE), metadata={"format": "pefc.adapters/1",
                                                                    "spec": json.dumps(tree)})
        with pytest.raises(pefc.CheckpointError):
            fresh.load_adapters(tmp_path)

    check()


def test_no_code_path_can_unpickle_or_run_a_loaded_file():
    """pefc and the built-in plugins read only safetensors, JSON and safe YAML."""
    root = Path(__file__).resolve().parents[1]
    forbidden = {
        "torch.load": r"\btorch\.(load|jit\.load)\(", "pickle": r"\b(c?pickle|dill|joblib|shelve|marshal)\b\.\w*load",
        "import pickle": r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b",
        "numpy allow_pickle": r"allow_pickle\s*=\s*True", "weights_only=False": r"weights_only\s*=\s*False",
        "unsafe yaml": r"\byaml\.(unsafe_load|full_load|load_all)\(|\byaml\.load\((?![^)]*Loader=[\w.]*Safe)",
    }
    offences = []
    for path in [*root.glob("pefc/**/*.py"), *root.glob("plugins/**/*.py")]:
        text = path.read_text()
        for name, pattern in forbidden.items():
            offences += [f"{path.relative_to(root)}: {name}" for _ in re.finditer(pattern, text, re.M)]
        offences += [f"{path.relative_to(root)}:{line}: from_pretrained without use_safetensors=True"
                     for line in _unsafe_from_pretrained_calls(text)]
    assert offences == []


def _unsafe_from_pretrained_calls(source: str) -> list[int]:
    """Lines of ``*.from_pretrained(...)`` calls that do not pass ``use_safetensors=True`` (a pickle fallback)."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained"
            and not any(k.arg == "use_safetensors" and getattr(k.value, "value", None) is True
                        for k in node.keywords)]
