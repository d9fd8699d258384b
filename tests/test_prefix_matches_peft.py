"""Prefix tuning agrees with HF PEFT on the same weights (float32, atol 1e-5), trains, and counts right."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyLM, TwoLayerMLP, batch, make_spec, shared_hf
from torch import nn

import pefc
from pefc.spec import parse_spec

peft = pytest.importorskip("peft")

P, HIDDEN = 3, 16
SHAPES = [(3, 5), (1, 11)]  # the capture uses (2, 8)


def prefix_spec(projection: bool = False, name: str = "pfx", **extra) -> pefc.Spec:
    entry = {"name": name, "method": "prefix", "num_virtual_tokens": P, **extra}
    if projection:
        entry["projection"] = {"hidden": HIDDEN}
    return parse_spec(make_spec([entry], family=None))


def compile_prefix(base: nn.Module, projection: bool = False, **extra) -> pefc.CompiledModel:
    return pefc.compile(prefix_spec(projection, **extra), model=base, example_inputs=batch(2, 8))


def peft_prefix(base: nn.Module, family: str, projection: bool):
    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=HIDDEN if projection else None)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)  # non-trivial everywhere, biases too
    return model.eval()


def copy_from_peft(compiled: pefc.CompiledModel, reference) -> None:
    """PEFT's ``prompt_encoder`` -> pefc: the MLP as is, or the flat table split per layer."""
    state = reference.prompt_encoder["default"].state_dict()
    own = dict(compiled.named_parameters())
    with torch.no_grad():
        if "transform.0.weight" in state:
            for key, value in state.items():
                own[f"pfx.prefix_encoder.{key}"].copy_(value)
            return
        table = state["embedding.weight"]  # [P, layers * 2 * d_kv]: layer-major, keys then values
        for layer, ins in enumerate(i for i in compiled.pefc.insertions if i.adapter == "pfx"):
            module = compiled.get_submodule(ins.module)
            width = module.prefix_key.shape[1]
            module.prefix_key.copy_(table[:, 2 * layer * width:(2 * layer + 1) * width])
            module.prefix_value.copy_(table[:, (2 * layer + 1) * width:(2 * layer + 2) * width])


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prefix_logits_match_peft(family, projection):
    base = shared_hf(family)
    reference = peft_prefix(base, family, projection)
    compiled = compile_prefix(base, projection).eval()
    copy_from_peft(compiled, reference)
    for shape in SHAPES:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            want, got, plain = reference(**inputs), compiled(**inputs), base(**inputs)
        diff = (main_output(want) - main_output(got)).abs().max().item()
        assert diff < 1e-5, f"{family} {shape}: max |diff| {diff}"
        assert type(got) is type(want) and main_output(got).shape == main_output(plain).shape
        assert (main_output(plain) - main_output(got)).abs().max() > 1e-2  # the prefix does something


def test_bake_gives_peft_saved_table_and_same_outputs():
    base = shared_hf("llama")
    reference = peft_prefix(base, "llama", projection=True)
    compiled = compile_prefix(base, projection=True).eval()
    copy_from_peft(compiled, reference)
    baked = compiled.bake()
    assert isinstance(compiled.pfx.prefix_encoder, pefc.BakeableModule)  # the original is untouched
    names = [n for n, _ in baked.named_parameters() if n.startswith("pfx.")]
    assert names == ["pfx.prefix_encoder.prompt_embeddings"]
    saved = peft.get_peft_model_state_dict(reference)["prompt_embeddings"]  # PEFT saves the MLP output
    assert torch.allclose(baked.pfx.prefix_encoder.prompt_embeddings, saved, atol=1e-6)
    inputs = batch(3, 6, pad=True)
    with torch.no_grad():
        assert (compiled(**inputs).logits - baked(**inputs).logits).abs().max() < 1e-6


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_parameter_counts_match_formula(projection, registry):
    spec = parse_spec({"version": 1, "model": {"hf": {"class": "LlamaForCausalLM", "config": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 3,
        "num_attention_heads": 32, "num_key_value_heads": 8}}},
        "inputs": make_spec([])["inputs"],
        "adapters": [{"name": "pfx", "method": "prefix", "num_virtual_tokens": 20,
                      **({"projection": {"hidden": 512}} if projection else {})}]})
    report = pefc.compile(spec, device="meta").parameter_report().adapters[0]
    d_kv, layers = 8 * 128, 3
    if projection:  # embedding [P, d_kv], Linear(d_kv, 512), Linear(512, layers*2*d_kv)
        expected = 20 * d_kv + (d_kv + 1) * 512 + (512 + 1) * layers * 2 * d_kv
        assert [s.params for s in report.sites] == [0] * layers and report.shared_params == expected
    else:
        expected = layers * 20 * 2 * d_kv
        assert [s.params for s in report.sites] == [20 * 2 * d_kv] * layers and report.shared_params == 0
    assert report.params == expected
    method, config = registry.method("prefix"), spec.adapters[0]
    sites = [pefc.AttentionSite(path=f"l{i}", node=None, num_heads=32, num_kv_heads=8, head_dim=128)
             for i in range(layers)]
    assert sum(method.param_count(config, s) for s in sites) + method.shared_param_count(config, sites) == expected


def test_prefix_without_attention_names_the_adapter():
    spec = parse_spec({"version": 1, "inputs": {"x": {"shape": ["batch", 16], "dtype": "float32"}},
                       "adapters": [{"name": "my_prefix", "method": "prefix"}]})
    with pytest.raises(pefc.TargetError, match="adapter 'my_prefix'.*no attention sites"):
        pefc.compile(spec, model=TwoLayerMLP(), example_inputs={"x": torch.randn(2, 16)})


# --- a plain torch model (conftest.TinyLM) ----------------------------------------------------------

@pytest.mark.parametrize("float_mask", [False, True], ids=["causal-no-mask", "float-mask"])
def test_prefix_on_plain_model_matches_eager_reference(float_mask):
    model = TinyLM(float_mask).eval()
    ids = torch.randint(0, 50, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)} if float_mask else {"input_ids": ids}
    spec = parse_spec({"version": 1, "inputs": {k: {"shape": ["batch", "seq"], "dtype": "int64"} for k in inputs},
                       "adapters": [{"name": "pfx", "method": "prefix", "num_virtual_tokens": P}]})
    compiled = pefc.compile(spec, model=model, example_inputs=inputs).eval()
    prefix = [(compiled.get_submodule(i.module).prefix_key.view(P, 2, 8).transpose(0, 1),
               compiled.get_submodule(i.module).prefix_value.view(P, 2, 8).transpose(0, 1))
              for i in compiled.pefc.insertions]
    for b, s in SHAPES:
        test_inputs = batch(b, s, vocab=50, pad=True)
        if not float_mask:
            test_inputs.pop("attention_mask")
        wide = dict(test_inputs)
        if float_mask:
            wide["attention_mask"] = torch.cat([torch.ones(b, P, dtype=torch.long), test_inputs["attention_mask"]], 1)
        kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix]
        with torch.no_grad():
            want = model(**wide, prefix=kv)
            got = compiled(**test_inputs)
        assert (want - got).abs().max().item() < 1e-5
