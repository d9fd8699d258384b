"""Per-layer regions (pefc.layers) and gradient checkpointing: same names, same outputs, less memory."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters

import pefc
from pefc.layers import LayerBlock, layer_blocks
from pefc.memory import PeakTensorMemory

ADAPTERS = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4, "dropout": 0.2},
            {"name": "down", "method": "dora", "target": ["@mlp.down"], "r": 2},
            {"name": "pre", "method": "prefix", "num_virtual_tokens": 3}]


def _spec(adapters=ADAPTERS, family="llama", layers=2, **extra):
    spec = make_spec(copy.deepcopy(adapters), family)
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    spec["model"]["hf"]["config"][key] = layers
    return pefc.parse_spec({**spec, **extra})


@pytest.fixture(scope="module")
def model():
    compiled = pefc.compile(_spec(layers=4))
    randomize_adapters(compiled)
    return compiled


def _grads(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks
    with PeakTensorMemory() as memory:
        model(**inputs).logits.logsumexp(-1).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, memory.peak_bytes


def test_partition_keeps_names_graph_and_outputs(model):
    cut = model.clone()
    paths = cut.partition_layers()
    assert paths == [f"model.layers.{i}" for i in range(4)]
    assert all(isinstance(cut.get_submodule(p), LayerBlock) for p in paths)
    assert list(cut.state_dict()) == list(model.state_dict())
    assert [n for n, _ in cut.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n.name for n in cut.graph.nodes] == [n.name for n in model.graph.nodes]  # the flat graph stays
    assert "model.layers" in cut.code and "model.layers" not in model.code.split("def forward")[0]
    inputs = batch(pad=True)
    for mode in (True, False):
        model.train(mode), cut.train(mode)
        torch.manual_seed(0)
        expected = model(**inputs).logits
        torch.manual_seed(0)
        assert torch.equal(cut(**inputs).logits, expected)


def test_checkpointing_gives_identical_gradients_and_less_memory(model):
    inputs = batch(b=2, s=64)
    model.train()
    expected, plain_peak = _grads(model, inputs)
    checkpointed = model.clone()
    checkpointed.gradient_checkpointing_enable()
    checkpointed.train()
    grads, peak = _grads(checkpointed, inputs)
    assert grads.keys() == expected.keys()
    assert all(torch.equal(grads[k], expected[k]) for k in expected)  # dropout masks replayed exactly
    assert peak < 0.75 * plain_peak, (peak, plain_peak)


def test_spec_flag_call_and_every_n_layers():
    compiled = pefc.compile(_spec(ADAPTERS[:1], layers=4, gradient_checkpointing=True))
    assert compiled.is_gradient_checkpointing
    assert all(block.checkpoint for _, block in layer_blocks(compiled))
    compiled.gradient_checkpointing_enable(every_n_layers=2)
    assert [block.checkpoint for _, block in layer_blocks(compiled)] == [True, False, True, False]
    compiled.gradient_checkpointing_disable()
    assert not compiled.is_gradient_checkpointing
    with pytest.raises(pefc.PefcError, match="offload"):
        compiled.gradient_checkpointing_enable(offload=True)


def test_merge_clone_move_save_load_export_on_partitioned_model(model, tmp_path):
    cut = model.clone()
    cut.gradient_checkpointing_enable()
    cut.eval(), model.eval()
    inputs = batch()
    merged = cut.merge()
    assert isinstance(merged.get_submodule("model.layers.0"), LayerBlock)
    assert torch.equal(merged(**inputs).logits, model.merge()(**inputs).logits)
    copy_ = cut.clone()
    assert copy_.get_submodule("model.layers.1")._pefc_root is copy_ and copy_.is_gradient_checkpointing
    wide = cut.clone().to(torch.float64)
    torch.testing.assert_close(wide(**inputs).logits.float(), model(**inputs).logits, atol=1e-5, rtol=0)
    cut.save_adapters(tmp_path)
    fresh = pefc.compile(model.pefc.spec)
    fresh.gradient_checkpointing_enable()
    fresh.load_adapters(tmp_path)
    fresh.eval()
    assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)
    from pefc.export import prepare_for_export

    prepared = prepare_for_export(cut)
    assert not list(layer_blocks(prepared)) and "model.layers.0" not in prepared.code


@pytest.mark.parametrize(("family", "container"), [("gpt2", "transformer.h"), ("bert", "encoder.layer")])
def test_other_families(family, container):
    adapters = [{"name": "lo", "method": "lora", "target": ["@attn.qkv" if family == "gpt2" else "@attn.q"], "r": 2}]
    compiled = pefc.compile(_spec(adapters, family))
    randomize_adapters(compiled)
    compiled.eval()
    inputs = batch()
    expected = compiled(**inputs)[0]
    assert compiled.partition_layers() == [f"{container}.0", f"{container}.1"]
    assert torch.equal(compiled(**inputs)[0], expected)


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_a_model_without_repeated_layers_is_refused():
    spec = pefc.parse_spec({"version": 1, "inputs": {"x": {"shape": ["batch", 4], "dtype": "float32"}},
                            "adapters": [{"name": "lo", "method": "lora", "target": ["up"], "r": 2}]})
    compiled = pefc.compile(spec, model=_Mlp(), example_inputs={"x": torch.randn(2, 4)})
    with pytest.raises(pefc.PefcError, match="no repeated layers"):
        compiled.gradient_checkpointing_enable()
    assert not compiled.is_gradient_checkpointing
