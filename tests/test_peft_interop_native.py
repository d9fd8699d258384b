"""pefc-compiled LoRA, DoRA and (IA)^3 adapters -> HF PEFT checkpoints -> pefc; older pefc checkpoints."""

from __future__ import annotations

import json

import pytest
from peft_roundtrip import assert_round_trip, from_pefc

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pefc_adapters_round_trip_through_peft(family, tmp_path):
    """Adapters compiled by pefc (roles, per-role ranks, DoRA, IA3 on the FFN input) -> PEFT -> pefc."""
    lora = {"name": "lo", "method": "lora", "target": ["@attn.v", "@mlp.down"] if family == "llama" else ["@attn.qkv"],
            "r": 4, "alpha": 8, "rank_pattern": {"@mlp.down": 2}, "alpha_pattern": {"@attn": 5}}
    dora = {"name": "do", "method": "dora", "target": ["@attn.o", "@mlp.up"], "r": 3, "alpha": 6}
    ia3 = {"name": "sc", "method": "ia3", "target": ["@mlp.up", "@mlp.down"] + (["@attn.k"] if family == "llama" else [])}
    for entry in (lora, dora, ia3):
        result = from_pefc(family, entry, tmp_path / entry["method"])
        assert_round_trip(result, f"{entry['method']} {family}")
    saved = json.loads((tmp_path / "lora" / "peft" / "adapter_config.json").read_text())
    if family == "llama":
        assert saved["rank_pattern"] == {f"model.layers.{i}.mlp.down_proj": 2 for i in range(2)}
        assert saved["alpha_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 5 for i in range(2)}
    else:
        assert saved["fan_in_fan_out"] is True


def test_pefc_checkpoints_from_before_the_pattern_keys_still_load(tmp_path):
    """A checkpoint whose embedded spec lacks keys added later (rank_pattern, alpha_pattern) takes their defaults."""
    from conftest import make_spec, randomize_adapters
    from safetensors import safe_open
    from safetensors.torch import save_file

    import pefc
    from pefc.spec import parse_spec

    spec = parse_spec(make_spec([{"name": "lo", "method": "lora", "target": ["@attn.q"]}]))
    model = pefc.compile(spec)
    randomize_adapters(model)
    model.save_adapters(tmp_path)
    file = tmp_path / "adapters.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    old = json.loads(metadata["spec"])
    for key in ("rank_pattern", "alpha_pattern"):
        del old["adapters"][0][key]
    save_file(tensors, str(file), metadata={**metadata, "spec": json.dumps(old)})
    fresh = pefc.compile(spec)
    fresh.load_adapters(tmp_path)
    assert pefc.interop.peft.load is not None
    assert all((fresh.adapter_state_dict()[k] == v).all() for k, v in model.adapter_state_dict().items())
