"""NaN/Inf in adapters is reported naming the tensor; low-precision DoRA takes its norm in float32."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_spec, randomize_adapters

import pefc
from pefc.demo import run_demo
from pefc.graphutil import attr_value
from pefc.spec import parse_spec

ADAPTER_TENSOR = r"adapter tensor 'qv\.model\.layers\.\d\.self_attn\.[qv]_proj\.lora_[AB]'"


@pytest.mark.parametrize("lr, message", [
    (1e30, r"^the training loss became nan at step 1$"),  # huge but finite weights: the next loss diverges
    (float("inf"), rf"^{ADAPTER_TENSOR} holds \d+ NaN/Inf values"),  # the step itself breaks the weights
])
def test_diverging_demo_training_is_a_numerical_error(lr, message):
    with pytest.raises(pefc.NumericalError, match=message):
        run_demo(steps=5, lr=lr, quiet=True)


def test_nan_injected_during_demo_training_is_reported_at_that_step(monkeypatch):
    steps = []

    class Poisoned(torch.optim.AdamW):
        def step(self, closure=None):
            result = super().step(closure)
            steps.append(len(steps))
            if len(steps) == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][1][0, 0] = float("nan")
            return result

    monkeypatch.setattr(torch.optim, "AdamW", Poisoned)
    with pytest.raises(pefc.NumericalError, match=rf"^{ADAPTER_TENSOR} holds 1 NaN/Inf values"):
        run_demo(steps=10, quiet=True)
    assert len(steps) == 3  # reported right after the step that broke it


def test_check_finite_names_the_first_bad_tensor():
    model = pefc.compile(parse_spec(make_spec([{"name": "qv", "method": "lora", "target": ["@attn.v"], "r": 2}])))
    model.check_finite()
    name = "qv.model.layers.1.self_attn.v_proj.lora_B"
    with torch.no_grad():
        model.get_parameter(name)[3] = float("inf")
    with pytest.raises(pefc.NumericalError, match=re.escape(f"adapter tensor '{name}' holds 2 NaN/Inf values")):
        model.check_finite()


def _dora_sites(dtype: str, scale: float = 1.0) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    spec = make_spec([{"name": "d", "method": "dora", "target": ["@attn.q"], "r": 4}], dtype=dtype)
    model = pefc.compile(parse_spec({**spec, "adapter_dtype": dtype}))  # adapters in the base's half precision
    randomize_adapters(model, scale=0.05)
    sites = []
    for ins in model.pefc.insertions:
        weight = attr_value(model, ins.weight_name)
        with torch.no_grad():
            weight.mul_(scale)
        sites.append((model.get_submodule(ins.module), weight))
    return sites


def _reference_norm(update: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Row norms of ``W0 + s B A`` in float64."""
    delta = update.lora_B.double() @ update.lora_A.double()
    return torch.linalg.vector_norm(weight.double() + update.scaling * delta, dim=1)


def test_bfloat16_dora_takes_its_norm_in_float32():
    for update, weight in _dora_sites("bfloat16"):
        assert weight.dtype == update.lora_A.dtype == torch.bfloat16
        norm = update.weight_norm(weight)
        assert norm.dtype == torch.float32
        error = ((norm.double() - _reference_norm(update, weight)).abs() / _reference_norm(update, weight)).max()
        assert error < 1e-5  # computed in bfloat16 it would be ~1e-3


def test_float16_dora_norm_does_not_overflow():
    for update, weight in _dora_sites("float16", scale=5000.0):  # row norms ~500: squares overflow float16
        assert torch.isfinite(weight).all()
        norm = update.weight_norm(weight)
        assert torch.isfinite(norm).all() and (norm > 256).all()
        assert torch.allclose(norm.double(), _reference_norm(update, weight), rtol=1e-5)
