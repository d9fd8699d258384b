"""Every plain frozen ``linear`` no adapter lowering took (the head, a merged model's linears) runs
its products through ``pefc.cpu_gemm`` (``pefc.frozen_linear``): the same outputs and gradients in
every mode, the graph unchanged, and ``aten.linear`` wherever the weight trains."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_spec, outputs_and_grads, randomize_adapters

import pefc
from pefc import cpu_gemm, frozen_linear
from pefc.spec import parse_spec

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN linear")
LINEARS = 7 * 2 + 1  # every projection of 2 layers, and the head


def _model(**keys: object) -> pefc.CompiledModel:
    spec = {**make_spec([{"name": "a", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}]), **keys}
    model = pefc.compile(parse_spec(spec))
    randomize_adapters(model, scale=0.3)
    return model


class _Calls:
    """Counts ``pefc.cpu_gemm``'s oneDNN products and ``aten.linear`` fallbacks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.onednn = self.fallback = 0
        onednn, linear = cpu_gemm._onednn_linear, frozen_linear._LINEAR

        def counted_onednn(*args: object) -> torch.Tensor:
            self.onednn += 1
            return onednn(*args)

        def counted_fallback(*args: object) -> torch.Tensor:
            self.fallback += 1
            return linear(*args)
        monkeypatch.setattr(cpu_gemm, "_onednn_linear", counted_onednn)
        monkeypatch.setattr(frozen_linear, "_LINEAR", counted_fallback)


def _lowered_linears(model: pefc.CompiledModel) -> int:
    return model.code.count("frozen_linear(")


@needs_onednn
def test_the_head_and_a_merged_model_match_torch_products_in_onednn(monkeypatch):
    model = _model().train()
    merged = model.merge().eval()
    assert _lowered_linears(model) == LINEARS - 4  # q and v of each layer: lowered with their update
    assert _lowered_linears(merged) == LINEARS
    assert not any(node.target is frozen_linear.frozen_linear for node in merged.graph.nodes)  # code, not graph
    calls = _Calls(monkeypatch)
    with cpu_gemm.using("torch"):
        expected, expected_grads = outputs_and_grads(model, batch(2, 6))
        with torch.no_grad():
            expected_merged = merged(**batch(2, 6)).logits
    assert calls.onednn == 0 and calls.fallback == (LINEARS - 4) + LINEARS  # training, merged
    calls.fallback = 0
    with cpu_gemm.using("onednn"):
        out, grads = outputs_and_grads(model, batch(2, 6))
        with torch.no_grad():
            out_merged = merged(**batch(2, 6)).logits
    assert calls.onednn > (LINEARS - 4) + LINEARS and calls.fallback == 0  # and backward's products
    assert (out - expected).abs().max().item() < 1e-5 and (out_merged - expected_merged).abs().max().item() < 1e-5
    assert (out_merged - out).abs().max().item() < 1e-4
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("case", ["trainable head", "float64", "torch mode"])
def test_linears_it_cannot_take_run_as_aten_linear(case, monkeypatch):
    model = _model(**({"modules_to_save": ["lm_head"]} if case == "trainable head" else {})).train()
    if case == "float64":
        model = model.to(torch.float64)
    calls = _Calls(monkeypatch)
    with cpu_gemm.using("torch" if case == "torch mode" else "onednn"):
        _, grads = outputs_and_grads(model, batch(2, 6))
    assert calls.onednn == 0 or case == "trainable head"
    assert calls.fallback >= (1 if case == "trainable head" else LINEARS - 4)
    if case == "trainable head":
        assert any(name.endswith("lm_head.weight") for name in grads)  # its weight gradient still flows
