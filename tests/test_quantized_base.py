"""Adapters over a quantized base (QLoRA): the same logits as the dequantized float model, frozen
codes, an exact float merge and a re-quantized merge whose reported error is the true one."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import INPUTS, randomize_adapters

import pefc
from pefc.errors import SpecError
from pefc.quant import QuantizedLinear, format_of_buffer
from pefc.source import example_inputs

torchao = pytest.importorskip("torchao")
from torchao.quantization import to_nf4  # noqa: E402

# hidden 64: every weight splits into blocks of 64 and scaler blocks of 32 (k/v: [32, 64] = 32 blocks)
LLAMA64 = {"class": "LlamaForCausalLM",
           "config": {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}
NF4 = {"method": "nf4", "compute_dtype": "float32", "scaler_block_size": 32}
ALL_LINEARS = ["@attn", "@mlp"]
METHODS = {
    "lora": [{"name": "lora", "method": "lora", "target": ALL_LINEARS, "r": 4, "alpha": 8}],
    "dora": [{"name": "dora", "method": "dora", "target": ["@attn.q", "@attn.v"], "r": 4}],
    "ia3": [{"name": "ia3", "method": "ia3"}],
    "adapter": [{"name": "houlsby", "method": "adapter", "preset": "houlsby"}],
    "prefix": [{"name": "prefix", "method": "prefix", "num_virtual_tokens": 3}],
    "prompt": [{"name": "prompt", "method": "prompt", "num_virtual_tokens": 3}],
    "mam": [{"name": "prefix", "method": "prefix", "num_virtual_tokens": 3},
            {"name": "ffn", "method": "adapter", "target": ["@mlp.down"], "placement": "parallel", "size": 8}],
}


def spec_of(adapters, quantize=NF4, **model):
    data = {"version": 1, "inputs": copy.deepcopy(INPUTS), "adapters": adapters,
            "model": {"hf": copy.deepcopy(LLAMA64), **model}}
    if quantize is not None:
        data["model"]["quantize"] = dict(quantize)
    return pefc.parse_spec(data)


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 100, (2, 6), generator=g), "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def dequantized_oracle(quantized, adapters):
    """The float model whose weights are ``quantized``'s dequantized ones, with the same adapter values."""
    oracle = pefc.compile(spec_of(adapters, quantize=None))
    sites = [s for s in pefc.sites.find_sites(quantized).of_kind("linear") if s.quantized]
    assert sites
    with torch.no_grad():
        for site in sites:
            oracle.get_parameter(f"{site.path}.weight").copy_(site.weight(quantized))
        for name, value in quantized.adapter_state_dict().items():
            oracle.get_submodule(name.rpartition(".")[0])  # same adapter layout
            dict(oracle.named_parameters()).get(name, dict(oracle.named_buffers()).get(name)).copy_(value)
    return oracle


@pytest.fixture(scope="module")
def lora():
    model = pefc.compile(spec_of(METHODS["lora"]))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_logits_equal_the_dequantized_float_model(method):
    model = pefc.compile(spec_of(METHODS[method]))
    randomize_adapters(model)
    oracle = dequantized_oracle(model, METHODS[method])
    inputs = batch()
    torch.testing.assert_close(logits(model, inputs), logits(oracle, inputs), atol=1e-4, rtol=0)


def test_sites_roles_and_report_of_a_quantized_base(lora):
    base = pefc.compile(spec_of(METHODS["lora"], quantize=None))
    roles = {(s.path, s.role, s.in_features, s.out_features) for s in pefc.sites.find_sites(base).of_kind("linear")}
    found = pefc.sites.find_sites(lora).of_kind("linear")
    assert {(s.path, s.role, s.in_features, s.out_features) for s in found} == roles
    assert {s.path for s in found if not s.quantized} == {"lm_head"}  # the default skip: the output head
    assert all(p.dtype == torch.float32 for p in lora.trainable_parameters())
    assert {n.split(".", 1)[0] for n, p in lora.named_parameters() if p.requires_grad} == {"lora"}
    report, float_report = lora.parameter_report(), base.parameter_report()
    assert report.base_params == float_report.base_params
    assert report.quantized == "nf4" and report.base_bytes < 0.5 * float_report.base_bytes


def test_lora_equals_hf_peft_on_the_dequantized_model(lora):
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA64["config"], attn_implementation="sdpa")).eval()
    sites = [s for s in pefc.sites.find_sites(lora).of_kind("linear") if s.quantized]
    with torch.no_grad():
        for site in sites:
            hf.get_parameter(f"{site.path}.weight").copy_(site.weight(lora))
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            hf.get_parameter(name).copy_(lora.get_parameter(name))
        for layer in range(2):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                name = f"model.layers.{layer}.{norm}.weight"
                hf.get_parameter(name).copy_(lora.get_parameter(name))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    reference = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():
        for site in sites:
            module = reference.base_model.model.get_submodule(site.path)
            module.lora_A["default"].weight.copy_(lora.get_parameter(f"lora.{site.path}.lora_A"))
            module.lora_B["default"].weight.copy_(lora.get_parameter(f"lora.{site.path}.lora_B"))
    inputs = batch()
    with torch.no_grad():
        want = reference(**inputs).logits
    torch.testing.assert_close(logits(lora, inputs), want, atol=1e-4, rtol=0)


def test_training_lowers_the_loss_and_leaves_the_codes_bit_identical():
    model = pefc.compile(spec_of(METHODS["lora"]))
    stored = {n: b.clone() for n, b in model.named_buffers() if format_of_buffer(n) or "weight_nf4" in n}
    assert stored
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    inputs = batch()
    ids = inputs["input_ids"]
    model.train()
    losses = []
    for _ in range(8):
        out = model(**inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[n], value) for n, value in stored.items())


def test_merge_dequantizes_folds_and_is_exact(lora):
    merged = lora.merge()
    assert not any(format_of_buffer(n) for n, _ in merged.named_buffers())
    assert merged.parameter_report().quantized is None
    inputs = batch()
    torch.testing.assert_close(logits(merged, inputs), logits(lora, inputs), atol=1e-5, rtol=0)
    assert "quantization_error" not in merged.pefc.extras


def test_requantized_merge_reports_the_error_an_independent_computation_finds(lora):
    merged = lora.merge(quantize=True)
    error = merged.pefc.extras["quantization_error"]
    assert merged.parameter_report().quantized == "nf4"
    # independently: fold with the LoRA formula, quantize with torchao, run the float model on those weights
    oracle = dequantized_oracle(lora, METHODS["lora"]).merge()
    sites = [s for s in pefc.sites.find_sites(lora).of_kind("linear") if s.quantized]
    weight_errors = {}
    with torch.no_grad():
        for site in sites:
            a, b = lora.get_parameter(f"lora.{site.path}.lora_A"), lora.get_parameter(f"lora.{site.path}.lora_B")
            folded = site.weight(lora) + (b @ a) * 2.0
            requantized = to_nf4(folded, 64, 32).get_original_weight()
            weight_errors[site.path] = float((requantized - folded).abs().max())
            oracle.get_parameter(f"{site.path}.weight").copy_(requantized)
    inputs = example_inputs(lora.pefc.spec)  # the capture's inputs
    diff = (logits(oracle, inputs) - logits(lora, inputs)).abs()
    assert error["max_abs_logits"] == pytest.approx(float(diff.max()), abs=1e-5)
    assert error["mean_abs_logits"] == pytest.approx(float(diff.mean()), abs=1e-6)
    assert set(error["sites"]) == set(weight_errors)
    for path, expected in weight_errors.items():
        assert error["sites"][path]["max_abs"] == pytest.approx(expected, abs=1e-6)
    assert error["max_abs_logits"] > 0
    torch.testing.assert_close(logits(merged, inputs), logits(oracle, inputs), atol=1e-4, rtol=0)


def test_adapters_save_and_load_over_a_quantized_base(lora, tmp_path):
    lora.save_adapters(tmp_path / "ckpt")
    fresh = pefc.compile(spec_of(METHODS["lora"]))
    fresh.load_adapters(tmp_path / "ckpt")
    inputs = batch()
    torch.testing.assert_close(logits(fresh, inputs), logits(lora, inputs), atol=0, rtol=0)


def test_int8_base_equals_its_dequantized_float_model():
    model = pefc.compile(spec_of(METHODS["lora"], quantize={"method": "int8"}))
    randomize_adapters(model)
    assert model.parameter_report().quantized == "int8"
    inputs = batch()
    torch.testing.assert_close(logits(model, inputs), logits(dequantized_oracle(model, METHODS["lora"]), inputs),
                               atol=1e-4, rtol=0)


def test_nf4_dequantizes_as_torchao_does():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    linear = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    spec = spec_of([], quantize={**NF4, "skip": []})
    module = pefc.quant.quantize_spec_model(spec, torch.nn.Sequential(linear))[0]
    assert isinstance(module, QuantizedLinear)
    assert torch.equal(module.dequantized_weight(), to_nf4(weight, 64, 32).get_original_weight())


def test_a_weight_the_blocks_cannot_take_is_named():
    spec = spec_of(METHODS["lora"], quantize={"method": "nf4"})  # 256 scaler blocks: k_proj has 32 blocks
    with pytest.raises(SpecError, match=r"model\.layers\.0\.self_attn\.(q|k)_proj.*scaler_block_size"):
        pefc.compile(spec)


def test_an_unknown_method_is_a_spec_error():
    with pytest.raises(SpecError, match=r"model\.quantize\.method"):
        spec_of(METHODS["lora"], quantize={"method": "fp3"})


def test_without_torchao_the_error_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(SpecError, match=r"pip install pefc\[quant\]"):
        pefc.quant.quantize_weight(torch.ones(4, 64), pefc.spec.QuantizeSpec(method="nf4"), torch.float32)


def test_a_7b_nf4_base_plans_to_under_4_gb():
    spec = pefc.load_spec("specs/llama2-7b-qlora.yaml")
    report = pefc.plan(spec).parameter_report()
    assert report.base_params == 6_738_415_616
    assert report.quantized == "nf4"
    assert 3.6e9 <= report.base_bytes <= 3.9e9, report.base_bytes
    assert report.trainable_params == 32 * (4 * 16 * 8192 + 3 * 16 * (4096 + 11008))  # 39,976,960
    assert "base_bytes" in report.to_dict()
