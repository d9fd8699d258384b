"""Bottleneck adapters: the graph equals the formula applied by hand; zero-init is the identity; presets."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, build_hf, make_spec, randomize_adapters

import pefc
from pefc.spec import parse_spec

ACT = {"relu": torch.relu, "swish": torch.nn.functional.silu, "tanh": torch.tanh}
TARGETS = {"llama": ["@attn.o", "@mlp.down"], "gpt2": ["@attn.o", "@mlp.down"]}


def adapter(**keys) -> dict:
    return {"name": "ad", "method": "adapter", **keys}


def config_of(**keys):
    return parse_spec(make_spec([adapter(**keys)])).adapters[0]


def hook_reference(base: torch.nn.Module, compiled, placement: str, activation: str, scaling: float) -> None:
    """Apply ``y + s * (f(h W_down + b_down) W_up + b_up)`` with forward hooks on the HF modules."""
    f = ACT[activation]
    for site in compiled.parameter_report().adapters[0].sites:
        p = {k: compiled.get_parameter(f"ad.{site.path}.{k}").detach() for k in
             ("down.weight", "down.bias", "up.weight", "up.bias")}

        def hook(module, args, y, p=p):
            h = args[0] if placement == "parallel" else y
            return y + scaling * (f(h @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"])

        base.get_submodule(site.path).register_forward_hook(hook)


@pytest.mark.parametrize("placement,family", [("sequential", "llama"), ("parallel", "llama"),
                                               ("sequential", "gpt2"), ("parallel", "gpt2")])
def test_compiled_graph_equals_the_formula_applied_with_hooks(placement, family):
    keys = {"target": TARGETS[family], "placement": placement, "size": 8, "activation": "swish", "scaling": 2.0}
    compiled = pefc.compile(parse_spec(make_spec([adapter(**keys)], family=family)))
    randomize_adapters(compiled, scale=0.3)  # non-zero W_up: the identity would prove nothing
    base = build_hf(family).eval()
    hook_reference(base, compiled, placement, "swish", 2.0)
    compiled.eval()
    for shape in [(3, 5), (1, 11)]:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            diff = (base(**inputs).logits - compiled(**inputs).logits).abs().max().item()
        assert diff < 1e-5, f"{placement} {family} {shape}: {diff}"


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_a_fresh_adapter_is_the_identity(preset):
    compiled = pefc.compile(parse_spec(make_spec([adapter(preset=preset)]))).eval()
    inputs = batch(2, 6)
    with torch.no_grad():
        assert torch.equal(build_hf("llama").eval()(**inputs).logits, compiled(**inputs).logits)


def test_presets_expand_as_documented():
    houlsby = config_of(preset="houlsby")
    assert (houlsby.targets(), houlsby.activation, houlsby.reduction_factor, houlsby.placement) == \
        (["@attn.o", "@mlp.down"], "swish", 16, "sequential")
    pfeiffer = config_of(preset="pfeiffer")
    assert (pfeiffer.targets(), pfeiffer.activation, pfeiffer.reduction_factor) == (["@mlp.down"], "relu", 16)
    parallel = config_of(preset="parallel")
    assert (parallel.placement, parallel.reduction_factor, parallel.scaling) == ("parallel", 2, 4.0)
    plain = config_of()
    assert (plain.targets(), plain.activation, plain.placement, plain.scaling) == \
        (["@attn.o", "@mlp.down"], "relu", "sequential", 1.0)


def test_explicit_keys_override_the_preset():
    config = config_of(preset="pfeiffer", size=8, activation="tanh", target=["@attn.o"])
    assert (config.size, config.reduction_factor, config.activation, config.targets()) == \
        (8, None, "tanh", ["@attn.o"])
    assert config_of(preset="parallel", scaling=1.0, reduction_factor=4).scaling == 1.0


@pytest.mark.parametrize("keys,where", [({"size": 0}, "size"), ({"reduction_factor": 0}, "reduction_factor"),
                                        ({"size": 8, "reduction_factor": 4}, "not both")])
def test_bad_sizes_are_spec_errors_naming_the_key(keys, where):
    with pytest.raises(pefc.SpecError) as err:
        config_of(**keys)
    assert where in str(err.value)


def test_a_reduction_leaving_no_bottleneck_is_a_target_error():
    with pytest.raises(pefc.TargetError, match="reduction_factor"):
        pefc.compile(parse_spec(make_spec([adapter(reduction_factor=64)])))


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_parameter_report_counts_equal_the_formula(registry, placement):
    compiled = pefc.compile(parse_spec(make_spec([adapter(placement=placement, reduction_factor=4)])))
    adapter_report = compiled.parameter_report().adapters[0]
    method, config = registry.method("adapter"), compiled.pefc.spec.adapters[0]
    for site in adapter_report.sites:
        d_out, d_in = compiled.get_parameter(site.path + ".weight").shape
        m = d_out // 4
        d_read = d_in if placement == "parallel" else d_out
        linear = pefc.LinearSite(path=site.path, node=None, in_features=d_in, out_features=d_out)
        assert site.params == method.param_count(config, linear) == d_read * m + m + m * d_out + d_out
    # o_proj 32 -> 32 and down_proj 64 -> 32, m = 8, two layers
    per_layer = (2 * 32 * 8 + 8 + 32) * 2 if placement == "sequential" else (2 * 32 * 8 + 8 + 32) + (64 * 8 + 8 + 8 * 32 + 32)
    assert adapter_report.params == 2 * per_layer
    assert adapter_report.mergeable is False


def test_merge_leaves_a_bottleneck_adapter_in_place():
    model = pefc.compile(parse_spec(make_spec([adapter(preset="houlsby")])))
    randomize_adapters(model)
    inputs = batch(4, 8)
    merged = model.merge().eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(merged(**inputs).logits, model(**inputs).logits)
