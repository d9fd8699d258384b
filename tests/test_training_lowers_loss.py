"""A few training steps on the demo copy task lower the loss for every method and for MAM,
and leave every base weight bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch

import pefc
from pefc.demo import DEMO_SPEC, copy_task_batch, loss_of
from pefc.spec import parse_spec

METHODS = {
    "lora": [{"name": "a", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 8}],
    "dora": [{"name": "a", "method": "dora", "target": ["@attn.q", "@attn.v"], "r": 8}],
    "ia3": [{"name": "a", "method": "ia3"}],
    "adapter": [{"name": "a", "method": "adapter", "preset": "houlsby"}],
    "prefix": [{"name": "a", "method": "prefix", "num_virtual_tokens": 4}],
    "prefix-mlp": [{"name": "a", "method": "prefix", "num_virtual_tokens": 4, "projection": {"hidden": 32}}],
    "prompt": [{"name": "a", "method": "prompt", "num_virtual_tokens": 4}],
    "mam": [{"name": "a", "method": "prefix", "num_virtual_tokens": 4},
            {"name": "b", "method": "adapter", "placement": "parallel", "target": ["@mlp.down"], "size": 16,
             "scaling": 4.0}],
}


def train(adapters: list[dict], steps: int = 8, lr: float = 1e-2) -> tuple[list[float], bool]:
    spec = parse_spec({**copy.deepcopy(DEMO_SPEC), "adapters": adapters})
    model = pefc.compile(spec)
    names = tuple(a["name"] + "." for a in adapters)
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(names)}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    ids, labels = copy_task_batch(16, 8, torch.Generator().manual_seed(0))  # one batch: no sampling noise
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_of(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = model.state_dict()
    return losses, all(torch.equal(v, after[k]) for k, v in base.items())


@pytest.mark.parametrize("case", sorted(METHODS))
def test_training_lowers_the_loss_and_keeps_base_weights(case):
    losses, base_unchanged = train(METHODS[case])
    assert losses[-1] < losses[0] - 1e-3, losses
    assert base_unchanged
