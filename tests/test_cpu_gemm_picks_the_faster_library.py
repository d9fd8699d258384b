"""``pefc.cpu_gemm``: float32 CPU products in torch's BLAS or oneDNN, the faster one chosen per shape
by timing both once; every mode gives the same products up to float rounding."""

from __future__ import annotations

import platform

import pytest
import torch

from pefc import cpu_gemm

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(),
                                  reason=f"this torch build has no oneDNN linear ({platform.machine()})")


@pytest.fixture(autouse=True)
def _fresh_choices():
    """Each test starts in ``auto`` with nothing chosen, and leaves the mode as it found it."""
    previous = cpu_gemm.mode()
    cpu_gemm.set_mode("auto")
    yield
    cpu_gemm.set_mode(previous)


def _operands(rows: int = 40, features: int = 24, out: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=generator) for name, shape in
            (("x", (rows, features)), ("weight", (out, features)), ("bias", (out,)), ("add", (rows, out)))}


FORMS = {
    "x Wᵀ": lambda t: ((t["x"], t["weight"]), {}),
    "x Wᵀ + b": lambda t: ((t["x"], t["weight"], t["bias"]), {}),
    "x Wᵀ + acc": lambda t: ((t["x"], t["weight"]), {"add": t["add"].clone()}),
    "x Wᵀ + b + acc": lambda t: ((t["x"], t["weight"], t["bias"]), {"add": t["add"].clone()}),
    "g W (a transposed weight)": lambda t: ((t["add"], t["weight"].t()), {}),
    "gᵀ x (a transposed input)": lambda t: ((t["add"].t(), t["x"].t()), {}),
}


def _reference(args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    x, weight, *bias = (a.double() for a in args)
    out = x @ weight.t()
    if bias:
        out = out + bias[0]
    if "add" in kwargs:
        out = out + kwargs["add"].double()
    return out


@pytest.mark.parametrize("mode", cpu_gemm.MODES)
@pytest.mark.parametrize("form", FORMS)
def test_every_mode_computes_the_same_product(mode, form):
    args, kwargs = FORMS[form](_operands())
    expected = _reference(args, kwargs)
    with cpu_gemm.using(mode):
        out = cpu_gemm.linear(*args, **kwargs)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() < 1e-5


@needs_onednn
def test_auto_keeps_the_library_that_timed_faster(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_gemm, "_onednn_linear", lambda *a: calls.append("onednn") or torch.zeros(1))
    monkeypatch.setattr(cpu_gemm, "_torch_linear", lambda *a: calls.append("torch") or torch.zeros(1))
    timings = {cpu_gemm._onednn_linear: 1.0, cpu_gemm._torch_linear: 2.0}
    monkeypatch.setattr(cpu_gemm, "_best_time", lambda run, *a: timings[run])
    t = _operands()
    cpu_gemm.linear(t["x"], t["weight"])
    timings.update({cpu_gemm._onednn_linear: 2.0, cpu_gemm._torch_linear: 1.0})
    cpu_gemm.linear(t["x"], t["weight"].t().contiguous().t())  # another layout: another key, timed anew
    assert calls == ["onednn", "torch"]
    assert sorted(cpu_gemm.choices().values()) == ["onednn", "torch"]


@needs_onednn
def test_auto_times_a_shape_once_per_power_of_two_of_rows(monkeypatch):
    timed = []
    faster = cpu_gemm._onednn_is_faster
    monkeypatch.setattr(cpu_gemm, "_onednn_is_faster", lambda *a: timed.append(a[0].shape[0]) or faster(*a))
    weight = torch.randn(16, 24)
    for rows in (40, 33, 64, 65, 40):  # 33..64 share a key; 65 is the next one
        cpu_gemm.linear(torch.randn(rows, 24), weight)
    assert timed == [40, 65] and len(cpu_gemm.choices()) == 2
    with cpu_gemm.using("torch"):  # a block in another mode keeps what auto chose
        cpu_gemm.linear(torch.randn(40, 24), weight)
    assert len(cpu_gemm.choices()) == 2
    cpu_gemm.set_mode("auto")  # setting a mode forgets them
    assert cpu_gemm.choices() == {}


@pytest.mark.parametrize("case", ["float64", "needs autograd", "no rows", "oneDNN switched off",
                                  "deterministic algorithms"])
def test_products_it_cannot_take_stay_in_torch(case, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_onednn_linear", lambda *a: pytest.fail("oneDNN was called"))
    x, weight = torch.randn(8, 6), torch.randn(4, 6)
    if case == "float64":
        x, weight = x.double(), weight.double()
    elif case == "needs autograd":
        weight.requires_grad_(True)
    elif case == "no rows":
        x = x[:0]
    elif case == "oneDNN switched off":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    elif case == "deterministic algorithms":  # auto would time a choice that another run could make otherwise
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with cpu_gemm.using("auto" if case == "deterministic algorithms" else "onednn"):
        out = cpu_gemm.linear(x, weight)
    assert torch.allclose(out, x @ weight.t())
    assert out.requires_grad == (case == "needs autograd")


def test_an_unknown_mode_is_refused_and_a_bad_environment_value_warns(monkeypatch):
    with pytest.raises(ValueError, match="auto, torch, onednn"):
        cpu_gemm.set_mode("fast")
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "mkl")
    with pytest.warns(UserWarning, match="PEFC_CPU_GEMM='mkl' is not one of auto, torch, onednn; using auto"):
        assert cpu_gemm._mode_from_env() == "auto"
    monkeypatch.setenv(cpu_gemm.ENV_VAR, " Torch ")
    assert cpu_gemm._mode_from_env() == "torch"
