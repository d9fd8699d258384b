"""CompiledModel.generate: token for token equal to HF PEFT under greedy decoding; sampling conventions.

For LoRA, DoRA and (IA)^3 the reference is ``PeftModel.generate``. For prefix and prompt
tuning it is a greedy loop over ``PeftModel.forward``: in peft 0.21.2 with transformers 5,
``PeftModel.generate`` drops the prefix (the model's new ``cache`` argument wins over peft's
``past_key_values``) and re-prepends the prompt at every cached step, so it is no reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_spec, shared_hf
from peft_roundtrip import effect, peft_checkpoint

import pefc
from pefc.generate import _sample
from pefc.interop import peft as interop
from pefc.spec import parse_spec

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

NEW = 6
LINEAR = {  # family -> peft target_modules
    "llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "qwen2": ["q_proj", "o_proj"]}


def peft_and_pefc(family: str, config, tmp_path):
    _, reference = peft_checkpoint(family, config, tmp_path)
    return reference, interop.load(tmp_path, shared_hf(family))  # one capture per family


def greedy_forward_loop(model, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the full sequence through ``model.forward`` (unpadded rows)."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("family", sorted(LINEAR))
def test_greedy_matches_peft_generate_on_a_left_padded_batch(family, method, tmp_path):
    config = (peft.IA3Config(target_modules=LINEAR[family], feedforward_modules=[]) if method == "ia3" else
              peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR[family], use_dora=method == "dora"))
    reference, model = peft_and_pefc(family, config, tmp_path)
    inputs = batch(3, 6, pad=True)
    with torch.no_grad():
        want = reference.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    got = model.generate(inputs["input_ids"], NEW, attention_mask=inputs["attention_mask"])
    assert torch.equal(want, got), f"{family} {method}:\n{want}\n{got}"


def test_eos_stops_rows_and_pads_them_like_peft_generate(tmp_path):
    reference, model = peft_and_pefc("llama", peft.LoraConfig(r=4, target_modules=LINEAR["llama"]), tmp_path)
    inputs = batch(3, 5, pad=True)
    free = model.generate(inputs["input_ids"], NEW, attention_mask=inputs["attention_mask"])
    eos = int(free[0, 5 + 1])  # row 0 stops after its second new token
    with torch.no_grad():
        want = reference.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = model.generate(inputs["input_ids"], NEW, attention_mask=inputs["attention_mask"], eos_token_id=eos)
    assert torch.equal(want, got)
    assert got[0, 5 + 1] == eos and (got[0, 5 + 2:] == 0).all()  # the model's pad_token_id after eos
    every = model.generate(inputs["input_ids"], NEW, attention_mask=inputs["attention_mask"],
                           eos_token_id=[int(t) for t in free[:, 5]])
    assert every.shape == (3, 5 + 1)  # all rows stopped at once


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_a_peft_forward_loop_with_prefix_and_prompt(family, method, tmp_path):
    config = (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3) if method == "prefix" else
              peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    reference, model = peft_and_pefc(family, config, tmp_path)
    ids = batch(2, 5)["input_ids"]
    want = greedy_forward_loop(reference, ids, NEW)
    assert torch.equal(want, model.generate(ids, NEW))
    assert effect(shared_hf(family), model) > 1e-3  # the adapter matters


def test_padded_rows_generate_as_if_unpadded(tmp_path):
    """Left padding does not move a row's tokens: each row decodes as it would alone (positions from the mask)."""
    reference, model = peft_and_pefc("gpt2", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                                     tmp_path)
    inputs = batch(3, 6, pad=True)
    got = model.generate(inputs["input_ids"], NEW, attention_mask=inputs["attention_mask"])
    for row in range(3):
        real = inputs["input_ids"][row:row + 1, inputs["attention_mask"][row].bool()]
        alone = greedy_forward_loop(reference, real, NEW)
        assert torch.equal(got[row, -NEW:], alone[0, -NEW:]), row
    assert torch.equal(got[:, :6], inputs["input_ids"])


def test_sampling_is_seeded_and_respects_top_k():
    model = pefc.compile(parse_spec(make_spec([{"name": "lo", "method": "lora", "target": ["@attn.q"]}]))).eval()
    ids = batch(2, 4)["input_ids"]
    first = model.generate(ids, NEW, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=5)
    assert torch.equal(first, model.generate(ids, NEW, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=5))
    others = [model.generate(ids, NEW, do_sample=True, temperature=1.5, seed=s) for s in range(1, 4)]
    assert any(not torch.equal(first, o) for o in others)
    greedy = model.generate(ids, NEW)
    assert torch.equal(greedy, model.generate(ids, NEW, do_sample=True, top_k=1, seed=1))
    assert torch.equal(greedy, model.generate(ids, NEW, do_sample=True, temperature=1e-4, seed=1))
    generator = torch.Generator().manual_seed(9)
    assert model.generate(ids, NEW, do_sample=True, generator=generator).shape == (2, 4 + NEW)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 5, None), (1.0, None, 0.8), (1.3, 10, 0.5)])
def test_sampling_filters_match_transformers_warpers(temperature, top_k, top_p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p:
        want = TopPLogitsWarper(top_p)(None, want)
    allowed = torch.isfinite(want)
    for seed in range(20):
        drawn = _sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        assert allowed[torch.arange(4), drawn].all()
    # the same distribution: identical draws from the same generator
    probs = torch.softmax(want, -1)
    expect = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    assert torch.equal(expect, _sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(3)))


def test_generate_refuses_models_without_logits_and_empty_rows():
    encoder = pefc.compile(parse_spec(make_spec([{"name": "lo", "method": "lora", "target": ["@attn.q"]}],
                                                family="bert"))).eval()
    with pytest.raises(pefc.PefcError, match="needs a causal LM returning logits"):
        encoder.generate(batch(1, 4)["input_ids"], 2)
    model = pefc.compile(parse_spec(make_spec([{"name": "lo", "method": "lora", "target": ["@attn.q"]}]))).eval()
    ids = batch(2, 4)["input_ids"]
    with pytest.raises(pefc.PefcError, match="all zeros"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    assert torch.equal(model.generate(ids, 3), model.generate(ids, 3, attention_mask=torch.ones_like(ids)))
    assert torch.equal(model.generate(ids, 0), ids)
