"""HF PEFT checkpoints in and out for LoRA, DoRA and (IA)^3: same outputs both ways (float32, atol 1e-5)."""

from __future__ import annotations

import json

import pytest
from peft_roundtrip import assert_round_trip, from_peft

peft = pytest.importorskip("peft")

TARGETS = {  # peft target_modules per family
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["query", "value", "intermediate.dense"],
    "qwen2": ["q_proj", "k_proj", "o_proj"],
    "mistral": ["q_proj", "v_proj", "gate_proj"],
}
IA3 = {  # (target_modules, feedforward_modules); None: peft's defaults for the architecture
    "llama": None,
    "gpt2": None,
    "bert": (r".*\.(key|value|\d+\.output\.dense)$", r".*\.\d+\.output\.dense$"),  # regexes
    "qwen2": (["k_proj", "v_proj", "up_proj", "down_proj"], ["down_proj"]),
}


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_lora_round_trips(family, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family])
    result = from_peft(family, config, tmp_path)
    assert_round_trip(result, f"lora {family}")
    adapter = result["model"].pefc.spec.adapters[0]
    assert (adapter.method, adapter.r, adapter.alpha, sorted(adapter.target)) == ("lora", 4, 8, sorted(TARGETS[family]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "qwen2"])
def test_dora_round_trips(family, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=True)
    result = from_peft(family, config, tmp_path)
    assert_round_trip(result, f"dora {family}")
    assert result["model"].pefc.spec.adapters[0].method == "dora"
    saved = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["peft_type"] == "LORA"


@pytest.mark.parametrize("family", sorted(IA3))
def test_ia3_round_trips(family, tmp_path):
    targets = IA3[family]
    config = peft.IA3Config(**({"target_modules": targets[0], "feedforward_modules": targets[1]} if targets else {}))
    result = from_peft(family, config, tmp_path)
    assert_round_trip(result, f"ia3 {family}")
    inputs = [i.site_path for i in result["model"].pefc.insertions if i.placement == "input"]
    assert inputs and all(p.endswith(("down_proj", "mlp.c_proj", "output.dense")) for p in inputs)


def test_lora_rank_and_alpha_patterns_rslora_and_layers(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=True,
                             rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}, layers_to_transform=[1])
    result = from_peft("llama", config, tmp_path)
    assert_round_trip(result, "lora patterns")
    adapter = result["model"].pefc.spec.adapters[0]
    assert adapter.layers == [1] and adapter.rslora
    assert adapter.rank_pattern == {"v_proj": 2} and adapter.alpha_pattern == {"o_proj": 3}
    sites = {s.path: s.params for s in result["model"].parameter_report().adapters[0].sites}
    assert sites == {"model.layers.1.self_attn.q_proj": 4 * 64, "model.layers.1.self_attn.v_proj": 2 * 48,
                     "model.layers.1.self_attn.o_proj": 4 * 64}


def test_lora_regex_targets_and_regex_patterns_import_as_exact_paths(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.0\.(self_attn\.k_proj|mlp\.up_proj)",
                             rank_pattern={r"layers\.0\.mlp\.up_\w+": 6})
    result = from_peft("llama", config, tmp_path)
    assert_round_trip(result, "lora regex")
    adapter = result["model"].pefc.spec.adapters[0]
    assert adapter.target == ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"]
    assert adapter.rank_pattern == {"model.layers.0.mlp.up_proj": 6}
