"""DoRA's hand-written backward (pefc_plugins.dora.autograd) equals autograd through the plain formula."""

from __future__ import annotations

import pytest
import torch
from pefc_plugins.dora.autograd import magnitude_scaled


def _plain(y, bias, h, lora_b, magnitude, norm):
    g = magnitude / norm
    z = y - bias if bias is not None else y
    out = g * (z + h @ lora_b.t())
    return out + bias if bias is not None else out


def _inputs(dtype, with_bias: bool):
    gen = torch.Generator().manual_seed(0)
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    norm = torch.rand(6, generator=gen, dtype=dtype) + 0.5  # no gradient, as the cached norm
    return rand(2, 3, 6), rand(6) if with_bias else None, rand(2, 3, 4), rand(6, 4), rand(6), norm


@pytest.mark.parametrize("with_bias", [False, True])
def test_dora_backward_equals_autograd_through_the_plain_formula(with_bias):
    ours = _inputs(torch.float32, with_bias)
    plain = tuple(t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in ours)
    got, want = magnitude_scaled(*ours), _plain(*plain)
    assert (got - want).abs().max().item() < 1e-5
    seed = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    (got * seed).sum().backward()
    (want * seed).sum().backward()
    for name, a, b in zip(("y", "bias", "h", "B", "m"), ours[:5], plain[:5], strict=True):
        if a is not None:
            assert (a.grad - b.grad).abs().max().item() < 1e-5, name


def test_dora_backward_passes_gradcheck_in_float64():
    y, bias, h, lora_b, magnitude, norm = _inputs(torch.float64, True)
    assert torch.autograd.gradcheck(lambda *t: magnitude_scaled(*t, norm), (y, bias, h, lora_b, magnitude))


def test_dora_backward_skips_the_gradients_nobody_asks_for():
    y, bias, h, lora_b, magnitude, norm = _inputs(torch.float32, True)
    y, bias = y.detach(), bias.detach()  # the frozen base's output and bias: only the adapter learns
    magnitude_scaled(y, bias, h, lora_b, magnitude, norm).sum().backward()
    assert all(t.grad is not None for t in (h, lora_b, magnitude))
