"""Called as the original: ``cm(**batch, labels=...).loss`` equals HF PEFT's loss, and omitted inputs
(attention_mask, position_ids) give the original model's outputs for the same omission."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import INPUTS, build_hf, randomize_adapters

from pefc.interop import peft as interop

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _inputs(family: str) -> dict:
    inputs = copy.deepcopy(INPUTS)
    inputs["attention_mask"]["optional"] = True
    inputs["labels"] = {"shape": ["batch", "seq"], "dtype": "int64", "high": 100, "optional": True}
    if family == "gpt2":
        inputs["position_ids"] = {"shape": ["batch", "seq"], "dtype": "int64", "high": 8, "optional": True}
    return inputs


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    """(HF PEFT model, the pefc import of its checkpoint), LoRA values non-trivial."""
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    reference = peft.get_peft_model(build_hf(family), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                       target_modules=TARGETS[family]))
    randomize_adapters(reference, scale=0.2)
    reference.save_pretrained(directory)
    return family, reference.eval(), interop.load(directory, build_hf(family), inputs=_inputs(family))


def _batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_training_loop_on_labels_matches_the_original(pair):
    """``loss = cm(**batch, labels=batch["input_ids"]).loss``, trained in lockstep with the PEFT model."""
    _, reference, cm = pair
    ours, theirs = cm.clone().eval(), copy.deepcopy(reference).eval()  # no dropout: the same losses
    opt_ours = torch.optim.SGD(ours.trainable_parameters(), lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    losses = []
    batch = _batch(0)
    for _ in range(3):
        loss = ours(**batch, labels=batch["input_ids"]).loss
        want = theirs(**batch, labels=batch["input_ids"]).loss
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)
        losses.append(float(loss.detach()))
        for value, opt in ((loss, opt_ours), (want, opt_theirs)):
            opt.zero_grad()
            value.backward()
            opt.step()
    assert losses[-1] < losses[0]


def test_without_labels_there_is_no_loss_and_the_logits_are_the_same(pair):
    _, reference, cm = pair
    batch = _batch(5)
    with torch.no_grad():
        plain, with_loss = cm(**batch), cm(**batch, labels=batch["input_ids"])
        assert plain.loss is None and with_loss.loss is not None
        torch.testing.assert_close(plain.logits, with_loss.logits, atol=0, rtol=0)
        torch.testing.assert_close(plain.logits, reference(**batch).logits, atol=1e-5, rtol=0)
    assert "labels" not in [n.target for n in cm.graph.nodes if n.op == "placeholder"]
    assert list(inspect.signature(cm.forward).parameters)[-1] == "labels"  # what HF Trainer looks for


def test_omitted_inputs_give_the_original_outputs_for_the_same_omission(pair):
    family, reference, cm = pair
    ids = _batch(7)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
        if family == "gpt2":
            positions = torch.arange(2, 9).expand(3, 7)
            torch.testing.assert_close(cm(ids, position_ids=positions).logits,
                                       reference(input_ids=ids, position_ids=positions).logits, atol=1e-5, rtol=0)


def test_unknown_or_missing_inputs_are_refused_by_name(pair):
    _, _, cm = pair
    ids = _batch(0)["input_ids"]
    with pytest.raises(TypeError, match="token_type_id"):
        cm(ids, token_type_id=ids)
    with pytest.raises(TypeError, match="input_ids"):
        cm(attention_mask=torch.ones_like(ids))

