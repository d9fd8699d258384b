"""(IA)^3 agrees with HF PEFT on the same scale vectors; folds exactly into the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters, shared_hf

import pefc
from pefc.spec import parse_spec

peft = pytest.importorskip("peft")

CASES = {
    # family: (pefc targets or None for the defaults, peft target_modules, peft feedforward_modules)
    "llama": (None, ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["@attn.qkv", "@mlp.down"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["@attn.k", "@attn.v", "@mlp.down"], r".*\.(key|value|\d+\.output\.dense)$", r".*\.\d+\.output\.dense$"),
}


def ia3(targets: list[str] | None, **keys) -> list[dict]:
    return [{"name": "s", "method": "ia3", **({"target": targets} if targets else {}), **keys}]


def copy_vectors_from_peft(compiled, peft_model) -> int:
    """pefc `<adapter>.<site>.ia3_l` [n] <- peft `base_model.model.<site>.ia3_l.default` [out, 1] or [1, in]."""
    state = peft_model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, param in compiled.named_parameters():
            if param.requires_grad:
                param.copy_(state[f"base_model.model.{name.split('.', 1)[1]}.default"].flatten())
                copied += 1
    return copied


@pytest.mark.parametrize("family", sorted(CASES))
def test_ia3_outputs_match_peft(family):
    ours, targets, feedforward = CASES[family]
    base = shared_hf(family)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=family == "gpt2"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "ia3_l" in name:
                p.normal_(1.0, 0.3)  # all-ones vectors would prove nothing
    compiled = pefc.compile(parse_spec(make_spec(ia3(ours), family=None)), model=base,
                            example_inputs=batch(2, 8))
    assert copy_vectors_from_peft(compiled, reference) == (4 if family == "gpt2" else 6)
    reference.eval()
    compiled.eval()
    for shape in [(3, 5), (1, 11)]:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            want, got = reference(**inputs), compiled(**inputs)
        key = "logits" if hasattr(want, "logits") else "last_hidden_state"
        diff = (getattr(want, key) - getattr(got, key)).abs().max().item()
        assert diff < 1e-5, f"{family} {shape}: max |diff| {diff}"


def test_ia3_scales_outputs_of_k_v_and_the_input_of_the_ffn_down_projection():
    report = pefc.compile(parse_spec(make_spec(ia3(None)))).parameter_report().adapters[0]
    roles = {s.path: (s.role, s.params) for s in report.sites}
    assert roles["model.layers.0.self_attn.k_proj"] == ("attn.k", 16)
    assert roles["model.layers.0.mlp.down_proj"] == ("mlp.down", 64)  # input side: d_ff
    assert {s.role for s in report.sites} == {"attn.k", "attn.v", "mlp.down"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ia3_merge_is_exact_and_restores_the_base_graph(family):
    targets = ["@attn.k", "@attn.v", "@mlp.down", "@mlp.up"] if family == "llama" else ["@attn.qkv", "@mlp"]
    model = pefc.compile(parse_spec(make_spec(ia3(targets), family=family)))
    randomize_adapters(model, scale=0.3)
    merged = model.merge()
    model.eval()
    merged.eval()
    inputs = batch(3, 7, pad=True)
    with torch.no_grad():
        diff = (model(**inputs).logits - merged(**inputs).logits).abs().max().item()
    assert diff < 1e-5
    assert len(merged.graph.nodes) == model.pefc.base_node_count


def test_ia3_parameter_report_counts_equal_the_formula(registry):
    model = pefc.compile(parse_spec(make_spec(ia3(None))))
    report = model.parameter_report()
    adapter = report.adapters[0]
    assert adapter.params == report.trainable_params == 2 * (16 + 16 + 64)  # d_k + d_v + d_ff per layer
    method, config = registry.method("ia3"), model.pefc.spec.adapters[0]
    for site in adapter.sites:
        out_f, in_f = model.get_parameter(site.path + ".weight").shape
        linear = pefc.LinearSite(path=site.path, node=None, role=site.role, in_features=in_f, out_features=out_f)
        assert site.params == method.param_count(config, linear) == (in_f if site.role == "mlp.down" else out_f)
