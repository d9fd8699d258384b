"""LoRA agrees with HF PEFT on the same weights (float32, atol 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, make_spec, shared_hf

import pefc
from pefc.spec import parse_spec

peft = pytest.importorskip("peft")

CASES = {
    # family: (pefc targets, peft target_modules)
    "llama": (["@attn.q", "@attn.v"], ["q_proj", "v_proj"]),
    "gpt2": (["@attn.qkv", "@mlp.down"], ["c_attn", "mlp.c_proj"]),
    "bert": (["@attn.q", "@attn.v", "@mlp.up"], ["query", "value", "intermediate.dense"]),
}


def _peft_key(name: str) -> str:
    """Map pefc's `<adapter>.<site>.lora_A` to peft's `...<site>.lora_A.default.weight`."""
    _, rest = name.split(".", 1)
    return f"base_model.model.{rest}.default.weight"


def copy_adapters_from_peft(compiled, peft_model) -> int:
    peft_state = peft_model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, param in compiled.named_parameters():
            if param.requires_grad:
                param.copy_(peft_state[_peft_key(name)])
                copied += 1
    return copied


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_logits_match_peft(family, rslora):
    ours_targets, peft_targets = CASES[family]
    base = shared_hf(family)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=peft_targets, use_rslora=rslora, lora_dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)  # non-zero B: a zero-init comparison proves nothing
    spec = parse_spec(make_spec([{"name": "lo", "method": "lora", "target": ours_targets, "r": 4, "alpha": 8,
                                  "rslora": rslora}], family=None))
    compiled = pefc.compile(spec, model=base, example_inputs=batch(2, 8))
    n_sites = len(compiled.parameter_report().adapters[0].sites)
    assert copy_adapters_from_peft(compiled, reference) == 2 * n_sites
    reference.eval()
    compiled.eval()
    for shape in [(3, 5), (1, 11)]:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            want = reference(**inputs)
            got = compiled(**inputs)
        key = "logits" if hasattr(want, "logits") else "last_hidden_state"
        diff = (getattr(want, key) - getattr(got, key)).abs().max().item()
        assert diff < 1e-5, f"{family}: max |diff| {diff}"
        assert type(got) is type(want)
