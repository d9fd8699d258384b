"""Prompt tuning agrees with HF PEFT on the same weights (float32, atol 1e-5), trains, and counts right.

PEFT returns the virtual tokens' rows too; pefc returns the real tokens only, so sequence
outputs compare against PEFT's ``[:, P:]``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyLM, TwoLayerMLP, batch, make_spec, shared_hf
from torch import nn

import pefc
from pefc.spec import parse_spec

peft = pytest.importorskip("peft")

P = 4
SHAPES = [(3, 5), (1, 11)]  # the capture uses (2, 8)


def prompt_spec(inputs: dict | None = None, **extra) -> pefc.Spec:
    spec = make_spec([{"name": "pr", "method": "prompt", "num_virtual_tokens": P, **extra}], family=None)
    if inputs is not None:
        spec["inputs"] = inputs
    return parse_spec(spec)


def compile_prompt(base: nn.Module, **extra) -> pefc.CompiledModel:
    return pefc.compile(prompt_spec(**extra), model=base, example_inputs=batch(2, 8))


def peft_prompt(base: nn.Module, family: str):
    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    return peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type=task, num_virtual_tokens=P)).eval()  # N(0, 1) prompt: non-trivial


def copy_from_peft(compiled: pefc.CompiledModel, reference) -> None:
    (param,) = compiled.trainable_parameters()
    with torch.no_grad():
        param.copy_(reference.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prompt_outputs_match_peft(family):
    base = shared_hf(family)
    reference = peft_prompt(base, family)
    compiled = compile_prompt(base).eval()
    copy_from_peft(compiled, reference)
    for shape in SHAPES:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            want, got, plain = reference(**inputs), compiled(**inputs), base(**inputs)
        assert type(got) is type(want)
        keys = ["logits"] if family != "bert" else ["last_hidden_state", "pooler_output"]
        for key in keys:
            w, g = getattr(want, key), getattr(got, key)
            w = w[:, P:] if w.dim() == 3 else w  # real tokens only; BERT's pooler reads the 1st virtual token
            assert g.shape == getattr(plain, key).shape
            diff = (w - g).abs().max().item()
            assert diff < 1e-5, f"{family} {shape} {key}: max |diff| {diff}"
        assert (getattr(plain, keys[0]) - getattr(got, keys[0])).abs().max() > 1e-2


def test_bert_classifier_with_token_type_ids_matches_peft():
    """SEQ_CLS: PEFT keeps token_type_ids with zeros for the prompt; the pooler reads the 1st virtual token."""
    from conftest import BERT
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**BERT["config"], num_labels=3)).eval()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=P)).eval()
    inputs = dict(make_spec([])["inputs"], token_type_ids={"shape": ["batch", "seq"], "dtype": "int64", "high": 2})
    example = {**batch(2, 8), "token_type_ids": torch.randint(0, 2, (2, 8))}
    compiled = pefc.compile(prompt_spec(inputs), model=base, example_inputs=example).eval()
    copy_from_peft(compiled, reference)
    for b, s in SHAPES:
        test = {**batch(b, s, pad=True), "token_type_ids": torch.randint(0, 2, (b, s))}
        with torch.no_grad():
            want, got = reference(**test).logits, compiled(**test).logits
        assert got.shape == (b, 3) and (want - got).abs().max().item() < 1e-5


def test_loss_from_labels_matches_peft():
    """PEFT prepends -100 labels for the prompt; pefc pads a loss's targets with its ignore_index."""
    base = shared_hf("llama")
    reference = peft_prompt(base, "llama")
    inputs = dict(make_spec([])["inputs"], labels={"shape": ["batch", "seq"], "dtype": "int64", "high": 100})
    example = {**batch(2, 8), "labels": torch.randint(0, 100, (2, 8))}
    compiled = pefc.compile(prompt_spec(inputs), model=base, example_inputs=example).eval()
    copy_from_peft(compiled, reference)
    test = batch(3, 6, pad=True)
    test["labels"] = test["input_ids"].masked_fill(test["attention_mask"] == 0, -100)
    with torch.no_grad():
        want, got = reference(**test), compiled(**test)
    assert abs(want.loss.item() - got.loss.item()) < 1e-5
    assert (want.logits[:, P:] - got.logits).abs().max() < 1e-5


def test_vocab_init_copies_embedding_rows_reproducibly():
    base = shared_hf("llama")
    first = compile_prompt(base, init="vocab", seed=7)
    second = compile_prompt(base, init="vocab", seed=7)
    prompt = first.pr.model.embed_tokens.prompt_embeddings
    table = base.model.embed_tokens.weight
    assert prompt.shape == (P, table.shape[1])
    assert all((row == table).all(1).any() for row in prompt)
    assert torch.equal(prompt, second.pr.model.embed_tokens.prompt_embeddings)


def test_parameter_count_matches_formula(registry):
    spec = parse_spec({"version": 1, "model": {"hf": {"class": "LlamaForCausalLM", "config": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 2,
        "num_attention_heads": 32, "num_key_value_heads": 32}}},
        "inputs": make_spec([])["inputs"], "adapters": [{"name": "pr", "method": "prompt"}]})
    report = pefc.compile(spec, device="meta").parameter_report().adapters[0]
    assert report.params == 20 * 4096 and [s.params for s in report.sites] == [20 * 4096]
    assert [s.role for s in report.sites] == ["embed"]
    site = pefc.EmbeddingSite(path="e", node=None, num_embeddings=32000, embedding_dim=4096)
    assert registry.method("prompt").param_count(spec.adapters[0], site) == 20 * 4096


def test_prompt_without_embedding_names_the_adapter():
    spec = parse_spec({"version": 1, "inputs": {"x": {"shape": ["batch", 16], "dtype": "float32"}},
                       "adapters": [{"name": "my_prompt", "method": "prompt"}]})
    with pytest.raises(pefc.TargetError, match="adapter 'my_prompt'.*no embedding sites"):
        pefc.compile(spec, model=TwoLayerMLP(), example_inputs={"x": torch.randn(2, 16)})


# --- a plain torch model (conftest.TinyLM) ----------------------------------------------------------

@pytest.mark.parametrize("float_mask", [False, True], ids=["causal-no-mask", "float-mask"])
def test_prompt_on_plain_model_matches_eager_reference(float_mask):
    model = TinyLM(float_mask).eval()
    inputs = batch(2, 8, vocab=50)
    if not float_mask:
        inputs.pop("attention_mask")
    spec = parse_spec({"version": 1, "inputs": {k: {"shape": ["batch", "seq"], "dtype": "int64"} for k in inputs},
                       "adapters": [{"name": "pr", "method": "prompt", "num_virtual_tokens": P}]})
    compiled = pefc.compile(spec, model=model, example_inputs=inputs).eval()
    (prompt,) = compiled.trainable_parameters()
    for b, s in SHAPES:
        test = batch(b, s, vocab=50, pad=True)
        embeds = torch.cat([prompt.detach().expand(b, P, 16), model.embed(test["input_ids"])], 1)
        wide = torch.cat([torch.ones(b, P, dtype=torch.long), test["attention_mask"]], 1)
        if not float_mask:
            test.pop("attention_mask")
        with torch.no_grad():
            want = model(inputs_embeds=embeds, attention_mask=wide)[:, P:]
            got = compiled(**test)
        assert got.shape == (b, s, 50)
        assert (want - got).abs().max().item() < 1e-5
