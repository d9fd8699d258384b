"""HF PEFT checkpoints in and out for prefix tuning (with and without projection) and prompt tuning.

PEFT returns the virtual tokens' rows for prompt tuning too; the comparison drops them.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft_roundtrip import assert_round_trip, from_pefc, from_peft

peft = pytest.importorskip("peft")

FAMILIES = ["llama", "gpt2", "qwen2", "bert"]


def task(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_round_trips(family, projection, tmp_path):
    config = peft.PrefixTuningConfig(task_type=task(family), num_virtual_tokens=3, prefix_projection=projection,
                                     encoder_hidden_size=16 if projection else None)
    result = from_peft(family, config, tmp_path)
    assert_round_trip(result, f"prefix {family}")
    adapter = result["model"].pefc.spec.adapters[0]
    assert (adapter.method, adapter.num_virtual_tokens, adapter.projection) == ("prefix", 3, None)
    saved = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    original = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: saved[k] for k in ("token_dim", "num_attention_heads", "num_layers")} == \
        {k: original[k] for k in ("token_dim", "num_attention_heads", "num_layers")}


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_round_trips(family, tmp_path):
    config = peft.PromptTuningConfig(task_type=task(family), num_virtual_tokens=4)
    result = from_peft(family, config, tmp_path)
    assert_round_trip(result, f"prompt {family}")
    assert result["model"].pefc.spec.adapters[0].num_virtual_tokens == 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pefc_prefix_with_projection_is_saved_projected(family, tmp_path):
    """pefc's prefix MLP -> PEFT's saved form (the projected table) -> a plain pefc prefix; same outputs."""
    entry = {"name": "pfx", "method": "prefix", "num_virtual_tokens": 3, "projection": {"hidden": 8}}
    result = from_pefc(family, entry, tmp_path, scale=0.5)
    assert_round_trip(result, f"prefix+projection {family}")
    table = result["model"].bake().pfx.prefix_encoder.prompt_embeddings
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and torch.allclose(saved["prompt_embeddings"], table, atol=1e-6)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["prefix_projection"] is False


def test_pefc_prompt_round_trips_through_peft(tmp_path):
    entry = {"name": "pr", "method": "prompt", "num_virtual_tokens": 5}
    assert_round_trip(from_pefc("llama", entry, tmp_path), "prompt from pefc")
