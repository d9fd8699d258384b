"""Repeated compiles do not leak memory, models, shape environments or generated sources."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import weakref
from pathlib import Path

import pytest
import torch
from conftest import make_spec
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.graph_module import _loader

import pefc
from pefc.capture import _shape_envs
from pefc.spec import parse_spec

TESTS = Path(__file__).resolve().parent
LORA = {"name": "qv", "method": "lora", "target": ["@attn.q"], "r": 2}

# The smallest Llama; the spec builds it, so every compile captures it anew (capture cache off).
SMALLEST = {"hf": {"class": "LlamaForCausalLM", "config": {
    "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "max_position_embeddings": 64}}}

# Measured (torch 2.13, CPU, compiles of this spec after 5 warm-up ones). Without pefc's cleanup
# every capture kept its ShapeEnv (a cycle through C++ SymInts), fake-tensor caches and fx's generated
# sources alive: RSS +44 MB (about 1 MB per compile, linear), +301,000 objects, 50 live ShapeEnvs. With
# it: no live ShapeEnv, no source left, +1,100 objects (sympy caches) and RSS +6 to +12 MB in the first
# compiles, then a plateau (+0.05 MB from the 10th to the 30th, RSS read after malloc_trim). The RSS bound is
# therefore on the second window only (5 compiles after 3 warm-up and 4 more): a leak of that size would
# add about 5 MB there; allocator warm-up adds nothing. The other checks (no live ShapeEnv, model or
# generated source; objects) find a leak in any number of compiles.
RSS_SLOPE_BOUND_MB = 4.0
OBJECT_BOUND = 5_000


def _rss_mb() -> float:
    """Resident set size after handing glibc's free pages back, so it counts live memory, not fragmentation."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live(kind: type) -> int:
    return sum(isinstance(o, kind) for o in gc.get_objects())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_compiling_the_same_spec_again_and_again_does_not_grow_memory(monkeypatch):
    if importlib.util.find_spec("pefc.capture_cache") is not None:
        monkeypatch.setattr("pefc.capture_cache._maxsize", 0)  # capture every time, as a user's process would
    spec = parse_spec({**make_spec([LORA], family=None), "model": SMALLEST})
    for _ in range(3):  # warm-up: lazy imports, allocator pools, first-call caches
        pefc.compile(spec)
    gc.collect()
    objects, sources, envs = len(gc.get_objects()), len(_loader.eval_cache), _live(ShapeEnv)
    dead, rss = [], []
    for index in range(9):
        if index == 4:
            rss.append(_rss_mb())
        model = pefc.compile(spec)
        dead += [weakref.ref(model), *(weakref.ref(env) for env in _shape_envs(model))]
        del model
    rss.append(_rss_mb())
    assert [r for r in dead if r() is not None] == []  # no CompiledModel, GraphModule or ShapeEnv kept alive
    assert _live(ShapeEnv) <= envs
    assert len(_loader.eval_cache) <= sources  # fx's generated code of dead modules is forgotten
    assert len(gc.get_objects()) - objects < OBJECT_BOUND
    assert rss[1] - rss[0] < RSS_SLOPE_BOUND_MB


def test_forgotten_sources_leave_live_models_working():
    model = pefc.compile(parse_spec(make_spec([LORA])))
    key = type(model).forward.__code__.co_filename
    clone = model.clone()
    moved = model.to(torch.float64)  # recompiles: the previous code is forgotten, the new one kept
    assert key not in _loader.eval_cache and type(moved).forward.__code__.co_filename in _loader.eval_cache
    inputs = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert torch.isfinite(moved(**inputs).logits).all() and torch.isfinite(clone(**inputs).logits).all()
