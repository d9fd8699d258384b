"""Mixed precision: a bfloat16 base with float32 adapters (spec `adapter_dtype`), and torch.autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters

import pefc

ALL_METHODS = [{"name": "qv", "method": "lora", "target": ["@attn.q"], "r": 4},
               {"name": "mag", "method": "dora", "target": ["@attn.v"], "r": 2},
               {"name": "scale", "method": "ia3"},
               {"name": "bottle", "method": "adapter", "target": ["@attn.o"], "size": 8},
               {"name": "pre", "method": "prefix", "num_virtual_tokens": 3},
               {"name": "soft", "method": "prompt", "num_virtual_tokens": 2}]


def _spec(dtype: str, adapters=ALL_METHODS, **extra) -> pefc.Spec:
    return pefc.parse_spec({**make_spec(copy.deepcopy(adapters), dtype=dtype), **extra})


@pytest.fixture(scope="module")
def bf16():
    return pefc.compile(_spec("bfloat16", adapter_dtype="float32"))


def _loss(model, inputs) -> torch.Tensor:
    logits = model(**inputs).logits.float()
    ids = inputs["input_ids"]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _train(model, inputs, steps: int = 6, autocast: bool = False) -> list[float]:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(model, inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.trainable_parameters()]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_base_fp32_adapters_every_method_trains(bf16, tmp_path):
    model = bf16.clone()
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    base = {k: v.clone() for k, v in model.state_dict().items() if k not in model.adapter_state_dict()}
    inputs = batch(b=4, s=6)
    assert model(**inputs).logits.dtype == torch.bfloat16
    losses = _train(model, inputs)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    model.save_adapters(tmp_path)
    fresh = bf16.clone()
    fresh.load_adapters(tmp_path)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


def test_bf16_outputs_follow_the_float32_model(bf16, tmp_path):
    model = bf16.clone()
    randomize_adapters(model, scale=0.05)
    model.save_adapters(tmp_path)
    reference = pefc.compile(_spec("float32", adapter_dtype="float32"))
    reference.load_adapters(tmp_path)  # the same float32 adapters on the float32 base
    model.eval(), reference.eval()
    inputs = batch()
    expected = reference(**inputs).logits
    got = model(**inputs).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    merged = model.merge()
    assert merged.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.bfloat16
    assert (merged(**inputs).logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_dora_norm_is_float32_on_a_bf16_base(bf16):
    module = bf16.get_submodule("mag.model.layers.0.self_attn.v_proj")
    weight = bf16.get_submodule("model.layers.0.self_attn.v_proj").weight
    randomize_adapters(module)
    norm = module.weight_norm(weight)
    assert norm.dtype == torch.float32
    exact = torch.linalg.vector_norm(weight.float() + module.delta_weight().float(), dim=1)
    torch.testing.assert_close(norm, exact, atol=1e-5, rtol=1e-5)


def test_autocast_trains_a_float32_model():
    model = pefc.compile(_spec("float32", ALL_METHODS[:2]))
    inputs = batch(b=4, s=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(**inputs).logits.dtype == torch.bfloat16
    losses = _train(model, inputs, autocast=True)
    assert losses[-1] < losses[0] - 0.05
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_adapter_dtype_is_validated():
    with pytest.raises(pefc.SpecError, match="adapter_dtype"):
        _spec("bfloat16", adapter_dtype="int8")
