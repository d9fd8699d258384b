"""Reading transformers' source gives what importing its classes gives, without importing them."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from pefc import hfsource

CLASSES = ["LlamaForCausalLM", "GPT2LMHeadModel", "BertModel", "BertForSequenceClassification", "Qwen2ForCausalLM",
           "T5ForConditionalGeneration", "BartForConditionalGeneration", "ViTForImageClassification",
           "Gemma2ForCausalLM", "BloomForCausalLM", "GPTNeoForCausalLM", "DebertaV2Model"]


def _imported(name: str):
    import transformers

    return getattr(transformers, name)


@pytest.mark.parametrize("name", CLASSES)
def test_forward_signature_equals_the_imported_one(name):
    params = inspect.signature(_imported(name).forward).parameters
    names = tuple(n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD)
    signature = hfsource.forward_signature(name)
    assert signature == hfsource.Signature(names, any(p.kind is p.VAR_KEYWORD for p in params.values()))


@pytest.mark.parametrize("name", CLASSES)
def test_config_keys_are_what_the_config_class_declares(name):
    import dataclasses

    config_cls = _imported(name).config_class
    declared = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    for klass in config_cls.__mro__:
        declared |= set(vars(klass).get("attribute_map", {}))
    keys = hfsource.config_keys(name)
    assert keys is not None and declared <= keys
    assert keys <= declared | set(inspect.signature(config_cls.__init__).parameters)


def test_every_auto_table_class_is_known_and_typos_are_not():
    import transformers

    known = hfsource.model_classes()
    assert {"LlamaForCausalLM", "GPT2LMHeadModel", "BertModel", "T5ForConditionalGeneration"} <= known
    assert "Qwen2ForCasualLM" not in known
    assert all(hasattr(transformers, name) for name in sorted(known)[::50])


def test_reading_the_source_imports_neither_transformers_nor_torch():
    code = ("import sys; from pefc import hfsource; assert hfsource.config_keys('LlamaForCausalLM'); "
            "assert hfsource.forward_signature('GPT2LMHeadModel'); print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_validation_catches_typos_from_the_source_alone():
    """A misspelt class, config key and input: caught by spec validation, with neither torch nor transformers."""
    code = """
import sys
from pefc.errors import SpecError
from pefc.spec import parse_spec
spec = {"version": 1, "inputs": {"input_id": {"shape": ["batch", "seq"]}, "attention_mask": {"shape": ["batch", "seq"]}},
        "model": {"hf": {"class": "LlamaForCausalLM", "config": {"num_hiden_layers": 2, "hidden_size": 32}}}}
try:
    parse_spec(spec)
except SpecError as exc:
    print(exc)
spec["model"]["hf"] = {"class": "Qwen2ForCasualLM"}
try:
    parse_spec(spec)
except SpecError as exc:
    print(exc)
print("torch" in sys.modules, "transformers" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    out = result.stdout
    assert "model.hf.config.num_hiden_layers: LlamaConfig has no parameter 'num_hiden_layers'" in out
    assert "did you mean num_hidden_layers?" in out
    assert "inputs.input_id: LlamaForCausalLM.forward takes no input 'input_id'; did you mean input_ids?" in out
    assert "model.hf.class: transformers has no model class 'Qwen2ForCasualLM'; did you mean Qwen2ForCausalLM?" in out
    assert out.split()[-2:] == ["False", "False"]
