"""ONNX decoders with a KV cache: onnxruntime's greedy loop equals ``cm.generate`` token for token.

Two exports of one tiny Llama with LoRA (q, v) and prefix tuning: merged (with ``verify``),
and with LoRA as graph inputs where one session swaps two ``.onnx_adapter`` files.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import batch, make_spec, randomize_adapters

import pefc
from pefc.cli import main
from pefc.export import export_lora_adapter
from pefc.onnx_kv import OnnxDecoder, past_names, present_names
from pefc.spec import parse_spec

ADAPTERS = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4},
            {"name": "p", "method": "prefix", "num_virtual_tokens": 3}]
KV_HEADS, HEAD_DIM, LAYERS = 2, 8, 2  # conftest's LLAMA


@pytest.fixture(scope="module")
def model() -> pefc.CompiledModel:
    cm = pefc.compile(parse_spec(make_spec(ADAPTERS))).eval()
    randomize_adapters(cm, scale=0.3)
    return cm


@pytest.fixture(scope="module")
def merged_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("kv") / "decoder.onnx"
    result = pefc.export_onnx(model, path, kv_cache=True, verify=True)  # verify: greedy tokens == generate
    return path, result


def test_the_decoder_has_optimum_names_and_dynamic_sizes(merged_file):
    path, result = merged_file
    assert result.inputs == ["input_ids", "attention_mask", "position_ids", *past_names(LAYERS)]
    assert result.outputs == ["logits", *present_names(LAYERS)]
    assert set(result.verify_max_abs_diff) == {"3x6+8", "1x4+5"}
    assert max(result.verify_max_abs_diff.values()) < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["past_key_values.1.value"] == ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert "lora" not in " ".join(shapes)  # merged: LoRA is in the weights


def test_an_empty_past_is_the_prefill_and_the_cache_holds_real_tokens_only(model, merged_file):
    decoder = OnnxDecoder(merged_file[0])
    ids = batch(2, 4)["input_ids"].numpy()
    logits, present = decoder.run(ids, np.ones((2, 4), np.int64), np.tile(np.arange(4), (2, 1)),
                                  decoder.empty_past(2))
    assert [p.shape for p in present] == [(2, KV_HEADS, 4, HEAD_DIM)] * 2 * LAYERS  # prefix slots not cached
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(2, 4, dtype=torch.long)).logits
    assert np.abs(logits - want.numpy()).max() < 1e-4


@pytest.mark.parametrize(("rows", "prompt"), [(1, 3), (5, 7)])
def test_greedy_loop_equals_generate_at_other_batch_and_past_sizes(model, merged_file, rows, prompt):
    inputs = batch(rows, prompt, pad=True, seed=rows)
    want = model.generate(inputs["input_ids"], 9, attention_mask=inputs["attention_mask"], eos_token_id=[])
    got = OnnxDecoder(merged_file[0]).generate(inputs["input_ids"], 9, attention_mask=inputs["attention_mask"])
    assert np.array_equal(got, want.numpy())


def test_a_past_of_the_wrong_shape_is_a_clear_error(merged_file):
    decoder = OnnxDecoder(merged_file[0])
    ids, positions = np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64)
    past = decoder.empty_past(2)
    past[3] = np.zeros((2, KV_HEADS + 1, 0, HEAD_DIM), np.float32)
    with pytest.raises(pefc.ExportError, match=r"past_key_values\.1\.value is \[2, 3, 0, 8\].*kv_heads=2"):
        decoder.run(ids, np.ones((2, 1), np.int64), positions, past)
    with pytest.raises(pefc.ExportError, match="attention_mask is \\[2, 1\\] but covers past and new tokens"):
        decoder.run(ids, np.ones((2, 1), np.int64), positions,
                    [np.zeros((2, KV_HEADS, 3, HEAD_DIM), np.float32)] * 2 * LAYERS)


def test_one_session_swaps_lora_adapters(model, tmp_path):
    path = tmp_path / "decoder.onnx"
    result = pefc.export_onnx(model, path, kv_cache=True, lora_inputs=True)
    assert "qv.model.layers.0.self_attn.q_proj.lora_A" in result.inputs
    other = model.clone()
    with torch.no_grad():
        other.get_parameter("qv.model.layers.1.self_attn.v_proj.lora_B").mul_(-4)
    export_lora_adapter(model, tmp_path / "a.onnx_adapter")
    export_lora_adapter(other, tmp_path / "b.onnx_adapter")
    inputs = batch(2, 5, pad=True)
    decoder = OnnxDecoder(path)
    for cm, name in ((model, "a"), (other, "b")):
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp_path / f"{name}.onnx_adapter"))
        decoder.run_options = ort.RunOptions()
        decoder.run_options.add_active_adapter(adapter)
        got = decoder.generate(inputs["input_ids"], 8, attention_mask=inputs["attention_mask"])
        want = cm.generate(inputs["input_ids"], 8, attention_mask=inputs["attention_mask"], eos_token_id=[])
        assert np.array_equal(got, want.numpy()), name
    assert not np.array_equal(model.generate(inputs["input_ids"], 8, eos_token_id=[]).numpy(),
                              other.generate(inputs["input_ids"], 8, eos_token_id=[]).numpy())


def test_prompt_tuning_is_refused_with_the_reason(tmp_path, capsys):
    import json

    spec = tmp_path / "prompt.json"
    spec.write_text(json.dumps(make_spec([{"name": "soft", "method": "prompt", "num_virtual_tokens": 2}])))
    assert main(["export", str(spec), "-o", str(tmp_path / "d.onnx"), "--kv-cache"]) == 2
    err = capsys.readouterr().err
    assert "'soft'" in err and "prefill graph" in err
    assert not (tmp_path / "d.onnx").exists()
