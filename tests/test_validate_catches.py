"""`pefc validate` catches what would fail later, with "did you mean ...", and so do load_spec and compile."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import make_spec

import pefc
from pefc.cli import main

LORA = [{"name": "qv", "method": "lora", "target": ["@attn.q"], "r": 4}]


def _spec(**change) -> dict:
    data = make_spec(copy.deepcopy(LORA))
    for path, value in change.items():
        *parents, key = path.split("__")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[key] = value
    return data


CASES = [
    ({"model__hf__config__num_hiden_layers": 3}, "model.hf.config.num_hiden_layers",
     "LlamaConfig has no parameter 'num_hiden_layers'", "did you mean num_hidden_layers?"),
    ({"model__hf__class": "Qwen2ForCasualLM"}, "model.hf.class",
     "transformers has no model class 'Qwen2ForCasualLM'", "did you mean Qwen2ForCausalLM?"),
    ({"inputs__input_id": {"shape": ["batch", "seq"], "high": 100}}, "inputs.input_id",
     "LlamaForCausalLM.forward takes no input 'input_id'", "did you mean input_ids?"),
    ({"adapters__0__alpah": 8}, "adapters.0.alpah", "Extra inputs are not permitted", "did you mean alpha?"),
    ({"modle": {}}, "modle", "Extra inputs are not permitted", "did you mean model?"),
    ({"model__dtyp": "float16"}, "model.dtyp", "Extra inputs are not permitted", "did you mean dtype?"),
]


@pytest.mark.parametrize("change, where, what, guess", CASES, ids=[c[1] for c in CASES])
def test_validate_names_the_key_and_suggests_the_fix(tmp_path, capsys, change, where, what, guess):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_spec(**change)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{where}: {what}" in err and guess in err
    with pytest.raises(pefc.SpecError) as loaded:  # load_spec (and so compile) gives the same error
        pefc.load_spec(path)
    assert f"{where}: {what}" in str(loaded.value) and guess in str(loaded.value)


def test_keys_transformers_translates_and_valid_specs_pass():
    pefc.parse_spec(_spec(model__hf__config__rope_theta=5e5))  # rope_theta goes into rope_parameters
    for family in ("gpt2", "bert"):  # aliases (attribute_map) and other config classes
        pefc.parse_spec(make_spec(copy.deepcopy(LORA) if family == "gpt2" else [], family=family))


def test_a_typo_in_yaml_gives_its_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("version: 1\nmodel:\n  hf:\n    class: LlamaForCausalLM\n    config:\n"
                    "      vocab_size: 100\n      num_hiden_layers: 2\n"
                    "inputs:\n  input_ids: {shape: [batch, seq], high: 100}\n")
    with pytest.raises(pefc.SpecError, match=r"model.hf.config.num_hiden_layers \(line 7\): .*num_hidden_layers"):
        pefc.load_spec(path)
