"""The VeRA plugin passes pefc's conformance kit and trains through a spec."""

from __future__ import annotations

import torch

import pefc
from pefc.testing import check_method, tiny_model_spec


def test_vera_passes_the_conformance_kit(tmp_path):
    report = check_method("vera", {"target": ["@attn.q", "@attn.v"], "r": 16}, workdir=tmp_path)
    print(report)
    report.assert_ok()


def test_vera_spec_compiles_and_trains():
    spec = pefc.parse_spec({"version": 1, **tiny_model_spec(),
                            "adapters": [{"name": "v", "method": "vera", "target": ["@attn.q"], "r": 8}]})
    model = pefc.compile(spec)
    report = model.parameter_report().adapters[0]
    assert report.params == report.formula_params == sum(8 + s_out for s_out in [32, 32])
    ids = torch.randint(0, 100, (2, 6))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
