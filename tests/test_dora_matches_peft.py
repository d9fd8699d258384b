"""DoRA agrees with HF PEFT (use_dora=True) on the same weights; folds exactly; never divides by zero."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FixedMask, batch, build_hf, make_spec, randomize_adapters, shared_hf
from test_lora_matches_peft import copy_adapters_from_peft
from torch.utils._python_dispatch import TorchDispatchMode

import pefc
from pefc.spec import parse_spec

peft = pytest.importorskip("peft")

CASES = {
    # family: (pefc targets, peft target_modules, one site path)
    "llama": (["@attn.q", "@attn.v", "@mlp.down"], ["q_proj", "v_proj", "down_proj"],
              "model.layers.0.self_attn.q_proj"),
    "gpt2": (["@attn.qkv", "@mlp.down"], ["c_attn", "mlp.c_proj"], "transformer.h.0.attn.c_attn"),
}


def dora(targets: list[str], **keys) -> list[dict]:
    return [{"name": "d", "method": "dora", "target": targets, "r": 4, "alpha": 8, **keys}]


def peft_and_pefc(family: str, dropout: float = 0.0, **keys):
    """A peft DoRA model with random A, B, m and a pefc model holding the same tensors."""
    ours, theirs, _ = CASES[family]
    base = shared_hf(family)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=theirs, use_dora=True, lora_dropout=dropout,
        fan_in_fan_out=family == "gpt2"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    spec = parse_spec(make_spec(dora(ours, dropout=dropout, **keys), family=None))
    compiled = pefc.compile(spec, model=base, example_inputs=batch(2, 8))
    n_sites = len(compiled.parameter_report().adapters[0].sites)
    assert copy_adapters_from_peft(compiled, reference) == 3 * n_sites
    return reference, compiled


@pytest.mark.parametrize("family", sorted(CASES))
def test_dora_logits_match_peft(family):
    reference, compiled = peft_and_pefc(family)
    reference.eval()
    compiled.eval()
    for shape in [(3, 5), (1, 11)]:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            want, got = reference(**inputs).logits, compiled(**inputs).logits
        diff = (want - got).abs().max().item()
        assert diff < 1e-5, f"{family} {shape}: max |diff| {diff}"


@pytest.mark.parametrize("family", sorted(CASES))
def test_dora_training_dropout_and_gradients_match_peft_layer(family):
    """Train mode with dropout, ``dropout_scope: update``: the dropped input feeds both correction terms;
    the norm gets no gradient."""
    reference, compiled = peft_and_pefc(family, dropout=0.3, dropout_scope="update")
    path = CASES[family][2]
    layer = reference.base_model.model.get_submodule(path)
    ours = compiled.get_submodule(f"d.{path}")
    base = layer.get_base_layer()
    layer.lora_dropout["default"] = FixedMask(0.3)  # one mask on both sides (their generators differ)
    ours.dropout = FixedMask(0.3)
    layer.train()
    ours.train()
    x = torch.randn(2, 5, base.weight.shape[0] if family == "gpt2" else base.in_features)
    want = layer(x)
    got = ours(x, base(x), base.weight, base.bias)
    assert (want - got).abs().max().item() < 1e-5
    want.square().sum().backward()
    got.square().sum().backward()
    theirs = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
              "lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight}
    for name, param in theirs.items():
        assert torch.allclose(getattr(ours, name).grad, param.grad, atol=1e-4, rtol=1e-4), name


class _CountProducts(TorchDispatchMode):
    """Counts matrix products (mm, addmm, bmm) dispatched while active."""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.PRODUCTS
        return func(*args, **(kwargs or {}))


def _both_scopes(dropout: float):
    """The q_proj DoRA modules of two models, scopes ``update`` and ``low_rank``, same tensors; W0; x; W0 x."""
    modules = []
    for scope in ("update", "low_rank"):
        compiled = pefc.compile(parse_spec(make_spec(dora(["@attn.q"], dropout=dropout, dropout_scope=scope))))
        randomize_adapters(compiled, scale=0.5)
        path = "model.layers.0.self_attn.q_proj"
        modules.append(compiled.get_submodule(f"d.{path}"))
        weight = compiled.get_parameter(f"{path}.weight")
    modules[1].load_state_dict(modules[0].state_dict())
    x = torch.randn(2, 5, weight.shape[1])
    return *modules, weight, x, x @ weight.t()


def test_low_rank_dropout_scope_drops_only_the_low_rank_input_and_skips_the_second_product():
    update, low_rank, weight, x, y = _both_scopes(0.3)
    low_rank.train()
    torch.manual_seed(5)
    dropped = low_rank.dropout(x)
    g = low_rank.lora_magnitude_vector / low_rank.weight_norm(weight)
    want = g * (y + low_rank.low_rank(dropped))
    counts = {}
    for name, module in (("update", update), ("low_rank", low_rank)):
        module.train()
        module.weight_norm(weight)  # cached from here on: count the products of the output only
        torch.manual_seed(5)
        with _CountProducts() as products:
            got = module(x, y, weight, None)
        counts[name] = products.count
        if name == "low_rank":
            assert (got - want).abs().max().item() < 1e-5
    assert counts["update"] == counts["low_rank"] + 1  # W0 drop(x)
    for module in (update, low_rank):
        module.eval()
    assert torch.equal(update(x, y, weight, None), low_rank(x, y, weight, None))  # no dropout: one formula


def test_dropout_scopes_agree_without_dropout_while_training():
    update, low_rank, weight, x, y = _both_scopes(0.0)
    assert torch.equal(update.train()(x, y, weight, None), low_rank.train()(x, y, weight, None))


def test_factored_norm_equals_the_direct_norm_and_follows_weight_and_adapter_changes():
    compiled = pefc.compile(parse_spec(make_spec(dora(["@attn.q"]))))
    randomize_adapters(compiled, scale=0.5)
    module = compiled.get_submodule("d.model.layers.0.self_attn.q_proj")
    weight = compiled.get_parameter("model.layers.0.self_attn.q_proj.weight")
    for change in (lambda: weight.mul_(2.0), lambda: module.lora_A.add_(0.1), lambda: module.lora_B.mul_(-1.5)):
        direct = torch.linalg.vector_norm(weight + module.delta_weight(), dim=1)
        assert torch.allclose(module.weight_norm(weight), direct, atol=1e-5)
        assert module.weight_norm(weight) is module.weight_norm(weight)  # cached while nothing changes
        with torch.no_grad():
            change()  # in place, as an optimizer step or a load: the cached norms must be recomputed
    direct = torch.linalg.vector_norm(weight + module.delta_weight(), dim=1)
    assert torch.allclose(module.weight_norm(weight), direct, atol=1e-5)


def test_cached_norm_serves_training_after_inference_mode():
    compiled = pefc.compile(parse_spec(make_spec(dora(["@attn.q"]))))
    randomize_adapters(compiled)
    inputs = batch(2, 6)
    with torch.inference_mode():
        compiled.eval()(**inputs)
    compiled.train()(**inputs).logits.square().mean().backward()  # the cached norm is not an inference tensor
    assert compiled.get_submodule("d.model.layers.0.self_attn.q_proj").lora_magnitude_vector.grad is not None


def test_dora_merge_is_exact_and_restores_the_base_graph():
    for family, (targets, _, _) in CASES.items():
        model = pefc.compile(parse_spec(make_spec(dora(targets), family=family)))
        randomize_adapters(model, scale=0.2)
        merged = model.merge()
        model.eval()
        merged.eval()
        inputs = batch(3, 7, pad=True)
        with torch.no_grad():
            diff = (model(**inputs).logits - merged(**inputs).logits).abs().max().item()
        assert diff < 1e-5, family
        assert len(merged.graph.nodes) == model.pefc.base_node_count


def test_dora_parameter_report_counts_equal_the_formula(registry):
    model = pefc.compile(parse_spec(make_spec(dora(CASES["llama"][0]))))
    adapter = model.parameter_report().adapters[0]
    # r (in + out) + out per site: q 32->32, v 32->16, down 64->32; two layers
    assert adapter.params == 2 * ((4 * 64 + 32) + (4 * 48 + 16) + (4 * 96 + 32))
    method, config = registry.method("dora"), model.pefc.spec.adapters[0]
    for site in adapter.sites:
        out_f, in_f = model.get_parameter(site.path + ".weight").shape
        linear = pefc.LinearSite(path=site.path, node=None, in_features=in_f, out_features=out_f)
        assert site.params == method.param_count(config, linear) == 4 * (in_f + out_f) + out_f
    assert adapter.mergeable is True


def test_dora_with_a_zero_row_in_the_base_weight_produces_no_nan():
    base = build_hf("llama")
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[3].zero_()
    model = pefc.compile(parse_spec(make_spec(dora(["@attn.q"]), family=None)), model=base,
                         example_inputs=batch(2, 8))
    model.train()
    out = model(**batch(2, 6)).logits
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(**batch(2, 6)).logits).all()
        assert torch.isfinite(model.merge()(**batch(2, 6)).logits).all()
