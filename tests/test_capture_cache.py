"""The opt-in capture cache gives the same compiled model as a fresh capture."""

from __future__ import annotations

import torch
from conftest import batch, make_spec

import pefc
from pefc import capture_cache
from pefc.source import build_model
from pefc.spec import ModelSpec, parse_spec

SPEC = make_spec([{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}])
SPEC["model"]["hf"]["config"]["num_hidden_layers"] = 1  # one decoder layer: half a capture, the same caching


def one_layer_llama():
    """A new module equal to the one SPEC builds."""
    return build_model(ModelSpec.model_validate({"hf": SPEC["model"]["hf"]}))


def compiled(cache: int, *, clear: bool = True):
    """Two compiles of SPEC with the cache at ``cache`` (``clear``: emptied first, so the first one captures)."""
    capture_cache.enable(cache)
    if clear:
        capture_cache.clear()
    try:
        first = pefc.compile(parse_spec(SPEC))
        second = pefc.compile(parse_spec(SPEC))  # a cache hit when enabled
        return first, second
    finally:
        capture_cache.enable(16)


def test_cached_and_fresh_captures_compile_to_the_same_model():
    capture_cache.enable(0)
    try:
        fresh = pefc.compile(parse_spec(SPEC))  # no cache at all
    finally:
        capture_cache.enable(16)
    first, hit = compiled(4)
    inputs = batch(3, 5)
    states = [m.state_dict() for m in (fresh, first, hit)]
    assert all(states[0].keys() == s.keys() and all(torch.equal(states[0][k], s[k]) for k in s) for s in states)
    for model in (fresh, first, hit):
        model.eval()
    with torch.no_grad():
        want = fresh(**inputs).logits
        assert torch.equal(want, hit(**inputs).logits)
    assert len(hit.graph.nodes) == len(fresh.graph.nodes)


def test_cache_entries_are_private_copies():
    _, hit = compiled(4, clear=False)  # the second is a hit whether or not SPEC's capture was cached before
    with torch.no_grad():
        next(hit.parameters()).add_(1.0)
    capture_cache.enable(4)
    again = pefc.compile(parse_spec(SPEC))
    assert not torch.equal(next(again.parameters()), next(hit.parameters()))
    capture_cache.enable(16)


def test_a_given_module_is_captured_once_while_it_is_unchanged(monkeypatch):
    from pefc import capture

    base = one_layer_llama()
    spec = parse_spec(make_spec(SPEC["adapters"], family=None))
    captures = []
    real = capture.capture
    monkeypatch.setattr("pefc.compiler.capture", lambda *a, **k: captures.append(1) or real(*a, **k))
    capture_cache.enable(4)
    try:
        first = pefc.compile(spec, model=base)
        second = pefc.compile(spec, model=base)  # a hit: same module, same state
        assert len(captures) == 1
        weight = "model.layers.0.self_attn.q_proj.weight"
        shared = dict(base.named_parameters())[weight]
        assert all(dict(m.named_parameters())[weight] is shared for m in (first, second))  # no copy of the base
        inputs = batch(3, 5)
        with torch.no_grad():
            assert torch.equal(first.eval()(**inputs).logits, second.eval()(**inputs).logits)
        pefc.compile(spec, model=base, example_inputs=batch(2, 6))  # other example tensors: captured
        assert len(captures) == 2
        with torch.no_grad():
            shared.mul_(2.0)  # changed in place: captured again
        pefc.compile(spec, model=base)
        assert len(captures) == 3
        pefc.compile(spec, model=one_layer_llama())  # an equal but other module: captured
        assert len(captures) == 4
    finally:
        capture_cache.enable(16)
