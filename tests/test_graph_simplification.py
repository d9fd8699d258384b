"""Captured graphs drop full slices and, on CPU, hand key/value heads to grouped-query attention;
KV-cached graphs write prefix slots and the cache in one copy.

Outputs and gradients stay those of the graph as torch.export recorded it; moving a model
off the CPU repeats the heads again.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from conftest import batch, build_hf, make_spec, randomize_adapters, shared_hf

import pefc
from pefc.graphutil import get_arg, static_dim
from pefc.simplify import SDPA, _is_full_slice, expand_grouped_kv, flatten_nested_cats
from pefc.spec import parse_spec

TARGETS = {"llama": ["@attn.q", "@attn.v"], "gpt2": ["@attn.qkv"]}
aten = torch.ops.aten


def _attention_nodes(model):
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target is SDPA]


def _compile(family: str, *, simplified: bool = True, monkeypatch=None):
    """A LoRA over the shared base (one cached capture per family); ``simplified=False``: a fresh
    capture of a new, equal base with the simplification turned off (a cache hit would be simplified)."""
    base = shared_hf(family)
    if not simplified:
        monkeypatch.setattr("pefc.capture.simplify", lambda graph_module, device: None)
        base = build_hf(family).eval()
    lora = {"name": "lo", "method": "lora", "target": TARGETS[family], "r": 4, "alpha": 8}
    model = pefc.compile(parse_spec(make_spec([lora], family=None)), model=base, example_inputs=batch(2, 8))
    randomize_adapters(model)
    return model


def test_captured_llama_feeds_key_value_heads_to_grouped_query_attention():
    model = _compile("llama")  # 4 query heads, 2 key/value heads
    attention = _attention_nodes(model)
    assert len(attention) == 2
    for node in attention:
        assert get_arg(node, "enable_gqa") is True
        assert static_dim(get_arg(node, "key"), 1) == 2 and static_dim(get_arg(node, "value"), 1) == 2
    assert not any(n.target is aten.expand.default and len(n.args[1]) == 5 for n in model.graph.nodes)
    assert not any(n.target is aten.slice.Tensor and _is_full_slice(n) for n in model.graph.nodes)


def test_models_without_grouped_heads_keep_their_attention():
    model = _compile("gpt2")
    assert all(not get_arg(n, "enable_gqa") for n in _attention_nodes(model))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_simplified_graph_has_the_recorded_graphs_outputs_and_gradients(family, monkeypatch):
    simplified = _compile(family)
    recorded = _compile(family, simplified=False, monkeypatch=monkeypatch)
    assert len(simplified.graph.nodes) < len(recorded.graph.nodes)
    inputs = batch(3, 7, pad=True)
    results = []
    for model in (simplified, recorded):
        model.train()
        torch.manual_seed(0)  # GPT-2 drops out while training: the same masks in both
        logits = model(**inputs).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want, want_grads), (got, got_grads) = results[1], results[0]
    assert (want - got).abs().max().item() < 1e-5
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-5), name


def test_repeating_heads_again_keeps_outputs():
    model = _compile("llama").eval()
    inputs = batch(2, 6, pad=True)
    with torch.no_grad():
        want = model(**inputs).logits
    repeated = model.clone()
    assert expand_grouped_kv(repeated.graph) == 2
    repeated.recompile()
    assert all(not get_arg(n, "enable_gqa") for n in _attention_nodes(repeated))
    with torch.no_grad():
        assert (repeated(**inputs).logits - want).abs().max().item() < 1e-6


def test_moving_off_the_cpu_repeats_the_heads_before_attention():
    model = _compile("llama").clone().to("meta")  # a copy: the shared base stays on the CPU; any device but the CPU: CUDA's SDPA with a mask has no grouped kernel
    attention = _attention_nodes(model)
    assert attention and all(not get_arg(n, "enable_gqa") for n in attention)
    for node in attention:
        key = get_arg(node, "key")
        assert key.target is aten.repeat_interleave.self_int and key.args[1:] == (2, 1)


def test_prefix_slots_and_a_kv_cache_are_written_in_one_copy():
    """``cat([slots, cat([past, new])])`` (a cached attention with prefix slots, the inner cat the
    cache's next state) becomes one cat; the cache is a view of it, with the same values."""
    graph = fx.Graph()
    slots, past, new = (graph.placeholder(name) for name in ("slots", "past", "new"))
    cache = graph.call_function(aten.cat.default, ([past, new], -2))
    graph.output((graph.call_function(aten.cat.default, ([slots, cache], -2)), cache))
    before = fx.GraphModule(torch.nn.Module(), copy.deepcopy(graph))
    assert flatten_nested_cats(graph) == 1
    after = fx.GraphModule(torch.nn.Module(), graph)
    inputs = [torch.randn(2, 3, n, 4) for n in (5, 7, 1)]
    (want_keys, want_cache), (keys, cache_out) = before(*inputs), after(*inputs)
    assert torch.equal(keys, want_keys) and torch.equal(cache_out, want_cache)
    assert sum(n.target is aten.cat.default for n in graph.nodes) == 1 and cache_out._base is keys
