"""pefc.shared_mask: every layer's attention reads one additive mask, with the same results."""

from __future__ import annotations

import os

import torch
from conftest import batch, make_spec, randomize_adapters

import pefc
from pefc.registry import DISABLE_ENV, build_registry
from pefc.shared_mask import additive_mask
from pefc.simplify import SDPA
from pefc.spec import parse_spec

SPEC = make_spec([{"name": "a", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}])


def _compiled(disable: str) -> pefc.CompiledModel:
    old = os.environ.get(DISABLE_ENV)
    os.environ[DISABLE_ENV] = disable
    try:
        registry = build_registry()
    finally:
        os.environ.pop(DISABLE_ENV) if old is None else os.environ.__setitem__(DISABLE_ENV, old)
    model = pefc.compile(parse_spec(SPEC), registry=registry)
    randomize_adapters(model)
    return model


def test_one_additive_mask_gives_the_same_outputs_and_gradients():
    shared, apart = _compiled(""), _compiled("masks")
    converted = [n for n in shared.graph.nodes if n.target is additive_mask]
    attentions = [n for n in shared.graph.nodes if n.target is SDPA]
    assert len(converted) == 1 and len(attentions) == 2
    assert all(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) is converted[0] for n in attentions)
    assert shared.pefc.extras["shared_masks"] == 1
    assert not any(n.target is additive_mask for n in apart.graph.nodes)
    inputs = batch(3, 6, pad=True)  # left padding: rows with masked keys
    results = []
    for model in (shared, apart):
        model.train()
        logits = model(**inputs).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-6), name
    assert shared.pefc.base_node_count == apart.pefc.base_node_count + 1
    merged = shared.eval().merge()
    assert len(merged.graph.nodes) == shared.pefc.base_node_count
    with torch.no_grad():
        assert (merged(**inputs).logits - shared(**inputs).logits).abs().max().item() < 1e-5
