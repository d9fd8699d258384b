"""LoRA's dropout: drops at rate p in every lane of its draws, unbiased, the same mask forward and
backward, reproducible from the seed, one byte kept for backward."""

from __future__ import annotations

import math

import pytest
import torch
from pefc_plugins.lora.dropout import MaskDropout, drop_levels
from torch import nn


def _run(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = module.train()(x)
    (out * upstream).sum().backward()
    return out, x.grad, sum(t.untyped_storage().nbytes() for t in saved)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_mask_dropout_drops_at_rate_p_scales_unbiased_and_keeps_one_byte(p):
    torch.manual_seed(0)
    x = torch.rand(1001, 1003) + 0.5  # no zeros: a zero in the output is a dropped element
    upstream = torch.randn_like(x)
    out, grad, saved_bytes = _run(MaskDropout(p), x, upstream)
    keep = out != 0
    p_used = drop_levels(p) / 2**16
    assert abs(p_used - p) <= 2**-17
    scale = torch.tensor(1 / (1 - p_used))
    assert torch.equal(out, torch.where(keep, x * scale, 0.0))
    assert torch.equal(grad, torch.where(keep, upstream * scale, 0.0))  # the forward's mask, backward
    # every 16-bit lane of a 64-bit draw drops at rate p (a lane stuck at a sign bit would not)
    lanes = (~keep).flatten()[: keep.numel() // 4 * 4].view(-1, 4).double().mean(0)
    sigma = math.sqrt(p_used * (1 - p_used) / (keep.numel() / 4))
    assert ((lanes - p_used).abs() < 5 * sigma).all(), lanes
    assert saved_bytes <= x.numel() + 64  # the boolean mask (and a scalar), not nn.Dropout's float one
    assert torch.equal(MaskDropout(p).eval()(x), x)


def test_mask_dropout_is_reproducible_from_the_seed_and_draws_fresh_masks():
    x = torch.randn(64, 300)
    dropout = MaskDropout(0.5).train()
    torch.manual_seed(3)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize(("p", "levels"), [(1e-9, 1), (0.5, 2**15), (1 - 1e-9, 2**16 - 1)])
def test_drop_probability_is_never_rounded_to_zero_or_one(p, levels):
    assert drop_levels(p) == levels


def test_mask_dropout_is_nn_dropout_in_place():
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    want = nn.Dropout(0.3, inplace=True).train()(x.clone())
    torch.manual_seed(1)
    assert torch.equal(MaskDropout(0.3, inplace=True).train()(x.clone()), want)
