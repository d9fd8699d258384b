"""LoRA's dropout keeps a boolean mask for backward, with nn.Dropout's draws, outputs and gradients."""

from __future__ import annotations

import torch
from pefc_plugins.lora.dropout import MaskDropout
from torch import nn


def _run(module: nn.Module, x: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(7)
        out = module.train()(x)
    (out * seed).sum().backward()
    return out, x.grad, sum(t.untyped_storage().nbytes() for t in saved)


def test_mask_dropout_is_bit_identical_to_nn_dropout_and_saves_a_quarter():
    x, seed = torch.randn(3, 50, 40), torch.randn(3, 50, 40)
    want, want_grad, want_bytes = _run(nn.Dropout(0.3), x, seed)
    got, got_grad, got_bytes = _run(MaskDropout(0.3), x, seed)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)  # same mask, same values
    assert want_bytes == 4 * x.numel() and got_bytes <= x.numel() + 64  # float mask vs one byte (and a scalar)
    assert torch.equal(MaskDropout(0.3).eval()(x), x)
