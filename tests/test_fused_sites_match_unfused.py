"""Horizontal fusion (pefc.fusion): same outputs and adapter gradients as the unfused sites."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import FixedMask, assert_same_outputs_and_grads, batch, make_spec, randomize_adapters
from torch import nn

import pefc
from pefc.fusion import fuse_shared_inputs
from pefc.registry import DISABLE_ENV, build_registry
from pefc.spec import parse_spec

EVERY_LINEAR = ["@attn.q", "@attn.k", "@attn.v", "@attn.o", "@mlp.gate", "@mlp.up", "@mlp.down"]
GROUPS = 4  # per layer q/k/v and gate/up; 2 layers


def _adapter(method: str, **keys: object) -> dict[str, object]:
    return {"name": "a", "method": method, "target": EVERY_LINEAR, "r": 4, **keys}


def _unfused(adapter: dict[str, object]) -> pefc.CompiledModel:
    """Compiled without the fusion pass (its plugin switched off), adapters randomised."""
    old = os.environ.get(DISABLE_ENV)
    os.environ[DISABLE_ENV] = "fusion"
    try:
        registry = build_registry()
    finally:
        os.environ.pop(DISABLE_ENV) if old is None else os.environ.__setitem__(DISABLE_ENV, old)
    model = pefc.compile(parse_spec(make_spec([adapter])), registry=registry)
    randomize_adapters(model, scale=0.3)
    return model


@pytest.fixture(scope="module", params=["lora", "dora"])
def pair(request) -> tuple[pefc.CompiledModel, pefc.CompiledModel]:
    """(unfused, fused) with the same weights; dropout 0.2 (DoRA: HF PEFT's ``update`` scope,
    whose ``W0 drop(x)`` reads the shared dropped input too)."""
    keys = {"dropout": 0.2} | ({"dropout_scope": "update"} if request.param == "dora" else {})
    unfused = _unfused(_adapter(request.param, **keys))
    fused = unfused.clone()
    assert fuse_shared_inputs(fused) == GROUPS
    return unfused, fused


def test_fused_sites_match_unfused_without_dropout_in_eval_and_training(pair):
    unfused, fused = pair
    for model in pair:
        model.eval()
    with torch.no_grad():
        assert (unfused(**batch(2, 6)).logits - fused(**batch(2, 6)).logits).abs().max().item() < 1e-5
    assert_same_outputs_and_grads(unfused, fused)  # eval: no dropout, gradients still flow
    for model in pair:
        model.train()


def test_shared_mask_gives_the_unfused_result_with_that_mask(pair):
    """Every site of the unfused model dropping with the one mask == the fused model's one dropout."""
    for model in pair:
        for name, module in list(model.named_modules()):
            if name.startswith("a.") and isinstance(getattr(module, "dropout", None), nn.Dropout):
                module.dropout = FixedMask(module.dropout.p)
        model.train()
    assert_same_outputs_and_grads(*pair)
    fused_graph = [n for n in pair[1].graph.nodes if n.op == "call_module" and n.target.endswith(".dropout")]
    assert len(fused_graph) == GROUPS  # one dropout per group; o and down drop inside their module


def test_per_site_masks_keep_sites_apart_unless_there_is_no_dropout():
    per_site = pefc.compile(parse_spec(make_spec([_adapter("lora", dropout=0.1, dropout_masks="per_site")])))
    assert fuse_shared_inputs(per_site) == 0
    assert not any(n.target is pefc.fusion.stacked_down for n in per_site.graph.nodes)
    no_dropout = pefc.compile(parse_spec(make_spec([_adapter("lora", dropout_masks="per_site")])))
    assert sum(n.target is pefc.fusion.stacked_down for n in no_dropout.graph.nodes) == GROUPS


def test_merging_a_fused_model_leaves_the_base_graph(pair):
    unfused, fused = pair
    for model in pair:
        model.eval()
    merged = fused.merge()
    assert not any(n.meta.get("pefc_inserted") and n.op != "get_attr" for n in merged.graph.nodes)
    assert len(merged.graph.nodes) == len(unfused.merge().graph.nodes)
    with torch.no_grad():
        assert (merged(**batch(2, 6)).logits - fused(**batch(2, 6)).logits).abs().max().item() < 1e-5
    for model in pair:
        model.train()
