"""Low-rank sites' base products run with their updates as one node (``pefc.fusion.lower_base_products``,
``pefc.fused_linear``): the same outputs and gradients as the op-by-op code; the graph is unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FixedMask,
    assert_same_outputs_and_grads,
    batch,
    make_spec,
    outputs_and_grads,
    randomize_adapters,
)
from torch import nn

import pefc
from pefc import cpu_gemm, fused_linear
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


class _Counted:
    """Counts the calls of ``owner.name`` (patched for the test)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.count = 0
        original = getattr(owner, name)

        def counted(*args: object) -> object:
            self.count += 1
            return original(*args)
        monkeypatch.setattr(owner, name, counted)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> _Counted:
    """The fused autograd node's calls."""
    return _Counted(monkeypatch, fused_linear.FusedLinearLowRank, "apply")


def _count_folds(monkeypatch: pytest.MonkeyPatch) -> _Counted:
    """The weights ``W + s B A`` the fused node folds, in forward and in backward."""
    return _Counted(monkeypatch, fused_linear, "folded_weight")


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
    calls = _count_calls(monkeypatch)
    for mode in (True, False):
        plain.train(mode), lowered.train(mode)
        assert_same_outputs_and_grads(plain, lowered)
    assert calls.count == 2 * groups
    with torch.no_grad():
        assert (plain(**batch(2, 6))[0] - lowered(**batch(2, 6))[0]).abs().max().item() < 1e-5


LONG = batch(4, 16)  # 64 rows: more than the 32 features into q/k/v/o and gate/up


@pytest.mark.parametrize(("family", "method"), [("llama", "lora"), ("llama", "dora"), ("qwen2", "lora")])
def test_long_inputs_fold_the_update_into_the_weight(family, method, monkeypatch):
    """Without dropout, ``x (W + s B A)ᵀ`` where the rows outnumber the features: forward at q/k/v,
    o, gate and up (not down: 64 features), backward (the input's gradient) at o and down (32
    out-features each; not q/k/v nor gate/up: 64 and 128). The same math as op by op (float64,
    1e-12) and, in float32, as close to the float64 result as the op-by-op code (1e-5)."""
    plain, lowered = _pair(family, method)
    plain64, lowered64 = plain.clone().to(torch.float64), lowered.clone().to(torch.float64)
    folds = _count_folds(monkeypatch)
    out, grads = outputs_and_grads(lowered64, LONG)
    assert folds.take() == 2 * (6 + 2)
    exact, exact_grads = outputs_and_grads(plain64, LONG)
    assert (out - exact).abs().max().item() < 1e-12
    for name, grad in grads.items():
        assert torch.allclose(grad, exact_grads[name], rtol=1e-10, atol=1e-12), name
    for model in (plain, lowered):
        assert (outputs_and_grads(model, LONG)[0].double() - exact).abs().max().item() < 1e-5
    with torch.no_grad():  # inference: the same folds, no down-projection kept for backward
        folds.take()
        assert (lowered64(**LONG)[0] - out).abs().max().item() < 1e-12
        assert folds.take() == 2 * 6
    outputs_and_grads(lowered)  # 12 rows: no fold
    assert folds.take() == 0


def test_half_precision_keeps_the_update_apart(monkeypatch):
    """A bfloat16 ``W + s B A`` would round the update to ``W``'s grid: no fold at any length."""
    plain, lowered = _pair("llama", "lora")
    plain, lowered = plain.to(torch.bfloat16), lowered.to(torch.bfloat16)
    folds, calls = _count_folds(monkeypatch), _count_calls(monkeypatch)
    out_plain, out_lowered = outputs_and_grads(plain, LONG)[0], outputs_and_grads(lowered, LONG)[0]
    assert calls.count == LOWERED and folds.count == 0
    assert out_lowered.dtype == torch.bfloat16
    assert (out_plain.float() - out_lowered.float()).abs().max().item() < 0.05


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
    calls = _count_calls(monkeypatch)
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
    calls = _count_calls(monkeypatch)
    assert_same_outputs_and_grads(plain, lowered)  # compares the base weight's gradient too
    assert calls.count == LOWERED - 1  # q/k/v of layer 0 run op by op


def test_lowered_sites_train_under_gradient_checkpointing(monkeypatch):
    plain, lowered = _pair("llama", "lora")
    lowered.gradient_checkpointing_enable()
    calls = _count_calls(monkeypatch)
    plain.train(), lowered.train()
    assert_same_outputs_and_grads(plain, lowered)
    assert calls.count == 2 * LOWERED  # each layer's region runs again in backward


def test_autocast_runs_op_by_op(monkeypatch):
    """Autocast picks each op's dtype; the fused node's in-place sums would mix them."""
    plain, lowered = _pair("llama", "lora")
    calls = _count_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, out_lowered = plain(**batch(2, 6)).logits, lowered(**batch(2, 6)).logits
    assert out_lowered.dtype == torch.bfloat16 and calls.count == 0
    assert torch.equal(out_plain, out_lowered)


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize(("method", "dropout"), [("lora", 0.0), ("lora", 0.2), ("dora", 0.2)])
def test_onednn_products_match_torch_products(method, dropout, monkeypatch):
    """The fused node's products in oneDNN (:mod:`pefc.cpu_gemm`) give torch's BLAS's outputs and
    gradients, with and without the fold, in training and in inference."""
    _, lowered = _pair("llama", method, dropout=dropout)
    calls = _Counted(monkeypatch, cpu_gemm, "_onednn_linear")
    for inputs in (batch(2, 6), LONG):
        with cpu_gemm.using("torch"):
            expected = outputs_and_grads(lowered, inputs)
        assert calls.take() == 0
        with cpu_gemm.using("onednn"):
            out, grads = outputs_and_grads(lowered, inputs)
            with torch.no_grad():
                inferred = lowered(**inputs)[0]
        assert calls.take() > 0
        assert (out - expected[0]).abs().max().item() < 1e-5 and (inferred - out).abs().max().item() < 1e-5
        assert grads.keys() == expected[1].keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, expected[1][name], atol=1e-5, rtol=1e-4), name
