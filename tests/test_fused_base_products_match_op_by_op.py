"""Low-rank sites' base products run with their updates as one node (``pefc.fusion.lower_base_products``,
``pefc.fused_linear``): the same outputs and gradients as the op-by-op code; the graph is unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import FixedMask, assert_same_outputs_and_grads, batch, make_spec, randomize_adapters
from torch import nn

import pefc
from pefc import fused_linear
from pefc.spec import parse_spec

EVERY_LINEAR = ["@attn.q", "@attn.k", "@attn.v", "@attn.o", "@mlp.gate", "@mlp.up", "@mlp.down"]
LOWERED = 8  # per layer: q/k/v, o, gate/up, down; 2 layers


NO_BASE_DROPOUT = {"bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
                   "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}
TARGETS = {"llama": EVERY_LINEAR, "qwen2": EVERY_LINEAR,
           "bert": ["@attn.q", "@attn.k", "@attn.v", "@attn.o", "@mlp.up", "@mlp.down"],
           "gpt2": ["@attn.qkv", "@attn.o", "@mlp.up", "@mlp.down"]}


def _pair(family: str, method: str, **keys: object) -> tuple[pefc.CompiledModel, pefc.CompiledModel]:
    """(op by op, lowered): one model, its clone without the lowering; adapters randomised, every
    dropout a fixed mask (both models drop the same elements)."""
    adapter = {"name": "a", "method": method, "target": TARGETS[family], "r": 4, **keys}
    spec = make_spec([adapter], family)
    spec["model"]["hf"]["config"].update(NO_BASE_DROPOUT.get(family, {}))  # training draws only the fixed masks
    lowered = pefc.compile(parse_spec(spec))
    randomize_adapters(lowered, scale=0.3)
    for module in list(lowered.modules()):
        if isinstance(getattr(module, "dropout", None), nn.Dropout):
            module.dropout = FixedMask(module.dropout.p)
    plain = lowered.clone()
    plain.pefc.lowerings.clear()
    plain.recompile()
    return plain, lowered


class _Calls:
    """Counts the fused autograd node's calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        apply = fused_linear.FusedLinearLowRank.apply

        def counted(*args: object) -> object:
            self.count += 1
            return apply(*args)
        monkeypatch.setattr(fused_linear.FusedLinearLowRank, "apply", counted)


@pytest.mark.parametrize(("family", "method", "groups"), [
    ("llama", "lora", LOWERED), ("llama", "dora", LOWERED),  # no biases, grouped-query k/v
    ("qwen2", "lora", LOWERED), ("qwen2", "dora", LOWERED),  # biased q/k/v
    ("bert", "lora", LOWERED),  # an encoder, every linear biased: q/k/v, o, up, down
    ("gpt2", "lora", 0),  # Conv1D sites (addmm on [in, out] weights) are not lowered
])
def test_lowered_sites_match_op_by_op_in_training_and_eval(family, method, groups, monkeypatch):
    """Dropout 0.2 with one fixed mask."""
    plain, lowered = _pair(family, method, dropout=0.2)
    assert lowered.pefc.extras["fusion"]["base_products"] == groups
    assert ("fused_linear_sites" in lowered.code) == (groups > 0) and "fused_linear_sites" not in plain.code
    calls = _Calls(monkeypatch)
    for mode in (True, False):
        plain.train(mode), lowered.train(mode)
        assert_same_outputs_and_grads(plain, lowered)
    assert calls.count == 2 * groups
    with torch.no_grad():
        assert (plain(**batch(2, 6))[0] - lowered(**batch(2, 6))[0]).abs().max().item() < 1e-5


def test_lowering_leaves_the_graph_as_it_was():
    plain, lowered = _pair("llama", "lora")
    assert [n.name for n in lowered.graph.nodes] == [n.name for n in plain.graph.nodes]
    assert not any(n.target is fused_linear.fused_linear_sites for n in lowered.graph.nodes)
    assert "fused_linear_sites" in lowered.clone().code  # a copy keeps its lowering
    merged = lowered.merge()
    assert "fused_linear_sites" not in merged.code  # no adapter left to lower
    with torch.no_grad():
        assert (merged(**batch(2, 6)).logits - lowered.eval()(**batch(2, 6)).logits).abs().max().item() < 1e-5


def test_per_site_masks_lower_each_site_alone():
    plain, lowered = _pair("llama", "lora", dropout=0.1, dropout_masks="per_site")
    assert lowered.pefc.extras["fusion"] == {"groups": 0, "base_products": 14}
    plain.train(), lowered.train()
    assert_same_outputs_and_grads(plain, lowered)


def test_dora_update_scope_runs_op_by_op_while_training(monkeypatch):
    """HF PEFT's formulation feeds W0 drop(x): not the fused form, so the node computes it op by op."""
    plain, lowered = _pair("llama", "dora", dropout=0.2, dropout_scope="update")
    calls = _Calls(monkeypatch)
    plain.train(), lowered.train()
    assert_same_outputs_and_grads(plain, lowered)
    assert calls.count == 0
    plain.eval(), lowered.eval()
    assert_same_outputs_and_grads(plain, lowered)
    assert calls.count == LOWERED


def test_a_trainable_base_weight_gets_its_gradient_op_by_op(monkeypatch):
    plain, lowered = _pair("llama", "lora")
    for model in (plain, lowered):
        model.get_parameter("model.layers.0.self_attn.q_proj.weight").requires_grad_(True)
    calls = _Calls(monkeypatch)
    assert_same_outputs_and_grads(plain, lowered)  # compares the base weight's gradient too
    assert calls.count == LOWERED - 1  # q/k/v of layer 0 run op by op


def test_lowered_sites_train_under_gradient_checkpointing(monkeypatch):
    plain, lowered = _pair("llama", "lora")
    lowered.gradient_checkpointing_enable()
    calls = _Calls(monkeypatch)
    plain.train(), lowered.train()
    assert_same_outputs_and_grads(plain, lowered)
    assert calls.count == 2 * LOWERED  # each layer's region runs again in backward


def test_autocast_runs_op_by_op(monkeypatch):
    """Autocast picks each op's dtype; the fused node's in-place sums would mix them."""
    plain, lowered = _pair("llama", "lora")
    calls = _Calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, out_lowered = plain(**batch(2, 6)).logits, lowered(**batch(2, 6)).logits
    assert out_lowered.dtype == torch.bfloat16 and calls.count == 0
    assert torch.equal(out_plain, out_lowered)
