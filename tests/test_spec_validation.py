"""Spec parsing and validation: every error names its key path (and YAML line)."""

from __future__ import annotations

import json

import pytest
from conftest import make_spec

import pefc
from pefc.spec import parse_spec, spec_schema


def test_example_spec_loads():
    spec = pefc.load_spec("specs/llama-lora.yaml")
    assert spec.adapters[0].method == "lora"
    assert spec.adapters[0].targets() == ["@attn.q", "@attn.v"]
    assert spec.dims() == {"batch": 2, "seq": 8}


def test_json_and_yaml_give_the_same_spec(tmp_path):
    yaml_spec = pefc.load_spec("specs/llama-lora.yaml")
    path = tmp_path / "s.json"
    path.write_text(yaml_spec.to_json())
    assert pefc.load_spec(path) == yaml_spec


def test_errors_name_key_path_and_yaml_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nmodel:\n  hf: {class: LlamaForCausalLM}\n  dtype: float8\n"
                    "inputs:\n  input_ids: {shape: [batch, seq]}\nadapters:\n"
                    "  - name: qv\n    method: lora\n    r: 0\n")
    with pytest.raises(pefc.SpecError) as info:
        pefc.load_spec(path)
    text = str(info.value)
    assert str(path) in text
    assert "model.dtype (line 4)" in text
    assert "adapters.0.r (line 10)" in text


def test_unknown_method_lists_installed_ones():
    with pytest.raises(pefc.SpecError, match=r"adapters.0.method: unknown method 'nope' \(installed: .*lora"):
        parse_spec(make_spec([{"name": "a", "method": "nope"}]))


def test_unknown_key_is_rejected():
    with pytest.raises(pefc.SpecError, match=r"adapters.0.rank: Extra inputs are not permitted"):
        parse_spec(make_spec([{"name": "a", "method": "lora", "rank": 4}]))


def test_duplicate_adapter_names_are_rejected():
    with pytest.raises(pefc.SpecError, match="two adapters are named 'a'"):
        parse_spec(make_spec([{"name": "a", "method": "lora"}, {"name": "a", "method": "lora"}]))


@pytest.mark.parametrize("entry, key", [
    ({"r": 0}, "r"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"name": "has.dot"}, "name"), ({"target": [""]}, "target"), ({"layers": [-1]}, "layers"),
])
def test_bad_lora_values_name_the_key(entry, key):
    with pytest.raises(pefc.SpecError, match=rf"adapters\.0\.{key}"):
        parse_spec(make_spec([{"name": "a", "method": "lora", **entry}]))


def test_model_needs_exactly_one_source():
    data = make_spec([])
    data["model"]["python"] = "pkg.mod:factory"
    with pytest.raises(pefc.SpecError, match="exactly one of `hf` or `python`"):
        parse_spec(data)


def test_yaml_duplicate_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("version: 1\nversion: 1\n")
    with pytest.raises(pefc.SpecError, match="duplicate key 'version'"):
        pefc.load_spec(path)


def test_yaml_never_constructs_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("version: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(pefc.SpecError, match="invalid YAML"):
        pefc.load_spec(path)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(pefc.SpecError, match="no such spec file"):
        pefc.load_spec(tmp_path / "nope.yaml")


def test_schema_has_a_discriminated_adapter_union():
    schema = spec_schema()
    text = json.dumps(schema)
    assert "LoraConfig" in text
    assert schema["properties"]["adapters"]["type"] == "array"
