"""The opt-in capture cache gives the same compiled model as a fresh capture."""

from __future__ import annotations

import torch
from conftest import batch, make_spec

import pefc
from pefc import capture_cache
from pefc.spec import parse_spec

SPEC = make_spec([{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}])


def compiled(cache: int):
    capture_cache.enable(cache)
    capture_cache.clear()
    try:
        first = pefc.compile(parse_spec(SPEC))
        second = pefc.compile(parse_spec(SPEC))  # a cache hit when enabled
        return first, second
    finally:
        capture_cache.enable(16)


def test_cached_and_fresh_captures_compile_to_the_same_model():
    fresh, _ = compiled(0)
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
    _, hit = compiled(4)
    with torch.no_grad():
        next(hit.parameters()).add_(1.0)
    capture_cache.enable(4)
    again = pefc.compile(parse_spec(SPEC))
    assert not torch.equal(next(again.parameters()), next(hit.parameters()))
    capture_cache.enable(16)
