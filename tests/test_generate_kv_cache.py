"""generate with the KV cache: token for token equal to recomputing the full sequence each step.

The oracle is ``generate(..., use_cache=False)``, which runs the training graph on the whole
sequence every step. Equality with HF PEFT's own ``generate`` (lora, dora, ia3) and with a PEFT
forward loop (prefix, prompt) is in tests/test_generate.py, which runs the cached path.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.fx as fx
from conftest import batch, make_spec, randomize_adapters

import pefc
from pefc import kvcache
from pefc.spec import parse_spec

ADAPTERS = {
    "lora": [{"name": "a", "method": "lora", "target": ["@attn.o", "@mlp.down"], "r": 4}],
    "dora": [{"name": "a", "method": "dora", "target": ["@attn.o"], "r": 4}],
    "ia3": [{"name": "a", "method": "ia3", "target": ["@attn.o", "@mlp.down"]}],
    "adapter": [{"name": "a", "method": "adapter", "size": 8}],
    "prefix": [{"name": "a", "method": "prefix", "num_virtual_tokens": 3}],
    "prompt": [{"name": "a", "method": "prompt", "num_virtual_tokens": 4}],
    "mam": [{"name": "p", "method": "prefix", "num_virtual_tokens": 3},
            {"name": "f", "method": "adapter", "placement": "parallel", "size": 8}],
}
CASES = [(f, m) for f in ("llama", "gpt2") for m in ADAPTERS] + [("qwen2", m) for m in ("lora", "prefix", "prompt")]


def compiled(family: str, method: str) -> pefc.CompiledModel:
    model = pefc.compile(parse_spec(make_spec(ADAPTERS[method], family))).eval()
    randomize_adapters(model, scale=0.3)
    return model


@pytest.mark.parametrize(("family", "method"), CASES)
def test_cached_greedy_equals_recompute_on_a_left_padded_batch(family, method):
    model = compiled(family, method)
    inputs = batch(3, 6, pad=True)
    want = model.generate(inputs["input_ids"], 7, attention_mask=inputs["attention_mask"], use_cache=False,
                          eos_token_id=[])
    got = model.generate(inputs["input_ids"], 7, attention_mask=inputs["attention_mask"], eos_token_id=[])
    assert torch.equal(want, got), f"{family} {method}:\n{want[:, 6:]}\n{got[:, 6:]}"


@pytest.fixture(scope="module")
def llama_lora() -> pefc.CompiledModel:
    return compiled("llama", "lora")


def test_adapters_are_shared_with_the_decode_graph(llama_lora):
    dec = kvcache.decoder(llama_lora)
    own = {id(p) for p in llama_lora.parameters()}
    assert {id(p) for p in dec.step.parameters()} <= own  # base and adapter tensors: the model's own
    assert dec.step.get_submodule("a") is llama_lora.get_submodule("a")
    before = llama_lora.generate(batch(1, 4)["input_ids"], 4, eos_token_id=[])
    with torch.no_grad():
        llama_lora.get_parameter("a.model.layers.0.self_attn.o_proj.lora_B").mul_(-3)
    after = llama_lora.generate(batch(1, 4)["input_ids"], 4, eos_token_id=[])
    assert kvcache.decoder(llama_lora) is dec  # a weight update needs no rebuild
    assert torch.equal(after, llama_lora.generate(batch(1, 4)["input_ids"], 4, eos_token_id=[], use_cache=False))
    assert not torch.equal(before, after)


def test_the_decode_graph_is_reused_across_50_tokens(llama_lora):
    ids = batch(2, 5)["input_ids"]
    llama_lora.generate(ids, 2)  # builds the decoder
    dec = kvcache.decoder(llama_lora)
    calls = []
    run = dec.run
    with mock.patch.object(torch.export, "export", side_effect=AssertionError("captured again")), \
            mock.patch.object(fx.GraphModule, "recompile", side_effect=AssertionError("recompiled")), \
            mock.patch.object(dec, "run", side_effect=lambda graph, *a: calls.append(graph) or run(graph, *a)):
        out = llama_lora.generate(ids, 50, eos_token_id=[])
    assert out.shape == (2, 55)
    assert calls[0] is dec.prefill and len(calls) == 50 and all(g is dec.step for g in calls[1:])


def test_sampling_with_a_seed_equals_recompute(llama_lora):
    inputs = batch(2, 5, pad=True)
    options = {"attention_mask": inputs["attention_mask"], "do_sample": True, "top_k": 20, "temperature": 0.8,
               "seed": 7, "eos_token_id": []}
    want = llama_lora.generate(inputs["input_ids"], 6, use_cache=False, **options)
    assert torch.equal(want, llama_lora.generate(inputs["input_ids"], 6, **options))


def test_eos_stops_every_row_as_in_recompute(llama_lora):
    inputs = batch(3, 5, pad=True)
    free = llama_lora.generate(inputs["input_ids"], 6, attention_mask=inputs["attention_mask"], eos_token_id=[])
    eos = int(free[0, 6])
    options = {"attention_mask": inputs["attention_mask"], "eos_token_id": eos}
    want = llama_lora.generate(inputs["input_ids"], 6, use_cache=False, **options)
    assert torch.equal(want, llama_lora.generate(inputs["input_ids"], 6, **options))


def test_merged_model_generates_like_the_unmerged(llama_lora):
    merged = llama_lora.merge()
    ids = batch(2, 5)["input_ids"]
    dec = kvcache.decoder(merged)
    assert not any(n.op == "call_module" and str(n.target).startswith("a.") for n in dec.step.graph.nodes)
    assert torch.equal(merged.generate(ids, 6, use_cache=False), merged.generate(ids, 6))
    assert torch.equal(llama_lora.generate(ids, 6), merged.generate(ids, 6))


def test_positions_beyond_the_model_are_refused(llama_lora):
    with pytest.raises(pefc.PefcError, match="prompt has 130 tokens"):
        llama_lora.generate(torch.ones(1, 130, dtype=torch.long), 1)
    with pytest.raises(pefc.PefcError, match="KV cache would exceed the model's 128 positions"):
        llama_lora.generate(torch.ones(1, 100, dtype=torch.long), 40)


def test_a_model_that_is_not_a_causal_lm_is_refused():
    model = pefc.compile(parse_spec(make_spec([{"name": "a", "method": "lora", "target": ["@attn.q"]}], "bert")))
    with pytest.raises(pefc.PefcError, match="BertModel is not a transformers causal LM"):
        model.generate(batch(1, 4)["input_ids"], 2)
