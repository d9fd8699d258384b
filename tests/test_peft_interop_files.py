"""HF PEFT interop: clear errors for checkpoints that do not fit, refusals, local pretrained bases, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from conftest import FAMILIES, batch, build_hf, make_spec, randomize_adapters, shared_hf
from peft_roundtrip import max_diff, peft_checkpoint

import pefc
from pefc.cli import main
from pefc.interop import peft as interop
from pefc.source import build_model
from pefc.spec import ModelSpec, parse_spec

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def llama(**config) -> torch.nn.Module:
    hf = copy.deepcopy(FAMILIES["llama"])
    hf["config"].update(config)
    return build_model(ModelSpec.model_validate({"hf": hf})).eval()


@pytest.fixture(scope="module")
def wide_llama() -> torch.nn.Module:
    """A llama of hidden size 48 (the checkpoints' is 32): one capture for the tests it fails."""
    return llama(hidden_size=48)


def compiled(entries: list[dict], family: str = "llama") -> pefc.CompiledModel:
    """``entries`` over the shared base (its capture is cached: the adapters are not part of the key)."""
    model = pefc.compile(parse_spec(make_spec(entries, family=None)), model=shared_hf(family),
                         example_inputs=batch(2, 8))
    randomize_adapters(model)
    return model


# --- checkpoints that do not fit the base model -------------------------------------------------

def test_other_hidden_size_names_module_and_shapes(tmp_path, wide_llama):
    peft_checkpoint("llama", peft.LoraConfig(**LORA), tmp_path)
    with pytest.raises(pefc.CheckpointError, match=r"adapter_model\.safetensors: module "
                       r"'model\.layers\.0\.self_attn\.q_proj': lora_A has shape \[4, 32\] in the checkpoint "
                       r"but the base model needs \[4, 48\]"):
        interop.load(tmp_path, wide_llama)


def test_missing_module_names_it_and_the_nearest(tmp_path):
    peft_checkpoint("llama", peft.LoraConfig(**LORA), tmp_path)
    with pytest.raises(pefc.CheckpointError, match=r"adapts module 'model\.layers\.1\.self_attn\.q_proj', which "
                       r"the base model LlamaForCausalLM does not have.*nearest modules: model\.layers\.0\."):
        interop.load(tmp_path, llama(num_hidden_layers=1))


def test_prefix_for_another_depth_names_the_shapes(tmp_path):
    peft_checkpoint("llama", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path)
    with pytest.raises(pefc.CheckpointError, match=r"prompt_embeddings has shape \[3, 64\].*base model has 3 "
                       r"attention layers with 2 key/value heads of width 16 \(needs \[3, 96\]"):
        interop.load(tmp_path, llama(num_hidden_layers=3))


def test_prompt_for_another_width_names_the_shapes(tmp_path, wide_llama):
    peft_checkpoint("llama", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path)
    with pytest.raises(pefc.CheckpointError, match=r"prompt_embeddings has shape \[4, 32\] in the checkpoint "
                       r"but the base model needs \[4, 48\]"):
        interop.load(tmp_path, wide_llama)


# --- what pefc does not import ---------------------------------------------------------------------

def test_unsupported_peft_checkpoints_are_refused(tmp_path):
    # (SEQ_CLS checkpoints with modules_to_save import: tests/test_trainable_heads.py)
    peft.get_peft_model(build_hf("llama"), peft.LoHaConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "loha")
    with pytest.raises(pefc.CheckpointError, match="peft_type 'LOHA' has no pefc equivalent"):
        interop.load(tmp_path / "loha", build_hf("llama"))
    peft.get_peft_model(build_hf("llama"), peft.LoraConfig(target_modules=["q_proj"], bias="all")) \
        .save_pretrained(tmp_path / "bias")
    with pytest.raises(pefc.CheckpointError, match="bias: 'all'"):
        interop.load(tmp_path / "bias", build_hf("llama"))
    peft.get_peft_model(build_hf("llama"), peft.LoraConfig(target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with pytest.raises(pefc.CheckpointError, match="adapter_model.bin, a pickle, which pefc never loads"):
        interop.load(tmp_path / "pickle", build_hf("llama"))


# --- what PEFT cannot express --------------------------------------------------------------------

@pytest.mark.parametrize("entries, message", [
    ([{"name": "bn", "method": "adapter", "target": ["@mlp.down"]}], "no equivalent of method 'adapter'"),
    ([{"name": "a", "method": "lora", "target": ["@attn.q"]}, {"name": "b", "method": "ia3"}],
     "holds exactly one adapter; this model has 2: a \\(lora\\), b \\(ia3\\)"),
    ([{"name": "p", "method": "prefix", "num_virtual_tokens": 2, "layers": [1]}], "covers 1 of the model's 2"),
], ids=["bottleneck", "two-adapters", "prefix-some-layers"])
def test_save_refuses_what_peft_cannot_express(entries, message, tmp_path):
    with pytest.raises(pefc.PefcError, match=message):
        interop.save(compiled(entries), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_save_refuses_a_merged_adapter_and_can_pick_one_of_several(tmp_path):
    model = compiled([{"name": "a", "method": "lora", "target": ["@attn.q"]}, {"name": "b", "method": "ia3"}])
    with pytest.raises(pefc.PefcError, match="'a' has been merged"):
        interop.save(model.merge(), tmp_path, adapter="a")
    interop.save(model, tmp_path, adapter="b")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IA3"


# --- local pretrained bases and the command line --------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A local transformers checkpoint (config.json + model.safetensors) and a PEFT LoRA saved on it."""
    root = tmp_path_factory.mktemp("pretrained")
    build_hf("llama", seed=7).save_pretrained(root / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base", local_files_only=True).eval()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    randomize_adapters(reference)
    reference.eval().save_pretrained(root / "peft")
    return root, base, reference


def test_hf_pretrained_spec_loads_the_local_checkpoint(pretrained):
    root, base, _ = pretrained
    spec = make_spec([{"name": "lo", "method": "lora", "target": ["@attn.q"]}], family=None)
    spec["inputs"]["attention_mask"]["optional"] = True  # the model and inputs `interop.load` gives: one capture
    spec = parse_spec(spec | {"model": {"hf": {"pretrained": str((root / "base").resolve())}}})
    model = pefc.compile(spec)
    assert torch.equal(model.get_parameter("model.layers.0.mlp.up_proj.weight"), base.model.layers[0].mlp.up_proj.weight)
    assert max_diff(base, model.eval()) == 0.0  # B = 0: the base model's outputs


def test_load_finds_a_local_base_model_by_name(pretrained):
    root, _, reference = pretrained
    assert json.loads((root / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(root / "base")
    model = interop.load(root / "peft")
    assert model.pefc.spec.model.hf.pretrained == str((root / "base").resolve())
    assert max_diff(reference, model) < 1e-5


def test_cli_import_then_export_round_trip(pretrained, tmp_path, capsys):
    root, base, reference = pretrained
    assert main(["import-peft", str(root / "peft"), "-o", str(tmp_path / "spec")]) == 0
    spec = yaml.safe_load((tmp_path / "spec" / "spec.yaml").read_text())
    assert spec["model"]["hf"]["pretrained"] == str((root / "base").resolve())
    assert spec["adapters"][0]["target"] == ["q_proj", "v_proj"]
    assert main(["export-peft", str(tmp_path / "spec" / "spec.yaml"), "--adapters", str(tmp_path / "spec"),
                 "-o", str(tmp_path / "back")]) == 0
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert max_diff(reference, again) < 1e-5
    assert "wrote" in capsys.readouterr().out


def test_cli_import_with_a_model_spec_or_base_dir(pretrained, tmp_path):
    root, _, reference = pretrained
    model_spec = tmp_path / "model.yaml"
    model_spec.write_text(yaml.safe_dump({"hf": copy.deepcopy(FAMILIES["llama"]), "seed": 7}))
    assert main(["import-peft", str(root / "peft"), "-o", str(tmp_path / "a"), "--model-spec", str(model_spec),
                 "--name", "mine"]) == 0
    model = pefc.compile(pefc.load_spec(tmp_path / "a" / "spec.yaml"))
    model.load_adapters(tmp_path / "a")
    assert model.pefc.spec.adapters[0].name == "mine" and max_diff(reference, model.eval()) < 1e-5
    assert main(["import-peft", str(root / "peft"), "-o", str(tmp_path / "b"), "--base", str(root / "base")]) == 0


def test_cli_import_without_a_local_base_exits_2(tmp_path, capsys):
    peft_checkpoint("llama", peft.LoraConfig(**LORA), tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    assert main(["import-peft", str(tmp_path / "peft"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'meta-llama/Llama-2-7b-hf' is not a local directory" in err and "--base DIR" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
