"""The Python and shell blocks of docs/selection.md run as written; its YAML is specs/llama-select.yaml's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from pefc.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "selection.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_blocks_run_and_the_yaml_is_the_example_spec(tmp_path, monkeypatch):
    root = DOC.parents[1]
    (tmp_path / "specs").symlink_to(root / "specs")
    monkeypatch.chdir(tmp_path)
    shown = yaml.safe_load(blocks("yaml")[0])
    spec = yaml.safe_load((root / "specs" / "llama-select.yaml").read_text())
    assert shown == {"adapters": spec["adapters"], "select": spec["select"]}
    scope: dict = {}
    for code in blocks("python"):
        exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 (the project's own docs)
    assert (tmp_path / "out" / "style" / "adapters.safetensors").exists()
    for script in blocks("bash"):
        for line in script.strip().splitlines():
            argv = shlex.split(line)
            assert argv[0] == "pefc" and main(argv[1:]) == 0, line
