"""docs/training.md: its Python runs and its YAML fragments are valid spec keys."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import pefc

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_yaml_fragments_make_a_valid_spec():
    data = {"version": 1, "adapters": [{"name": "qv", "method": "lora", "target": ["@attn.q"]}]}
    for block in _blocks("yaml"):
        data.update(yaml.safe_load(block))
    spec = pefc.parse_spec(data)
    assert spec.modules_to_save == ["classifier"] and spec.inputs["labels"].optional


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (block,) = _blocks("python")
    exec(compile(block, str(DOC), "exec"), {})
    assert (tmp_path / "out" / "classifier" / "adapters.safetensors").is_file()
