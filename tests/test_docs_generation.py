"""The Python and shell blocks of docs/generation.md run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pefc.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "generation.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_python_and_bash_blocks_run(tmp_path, monkeypatch):
    root = DOC.parents[1]
    (tmp_path / "specs").symlink_to(root / "specs")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in blocks("python"):
        exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 (the project's own docs)
    assert (tmp_path / "out" / "merged-hf" / "model.safetensors").exists()
    for script in blocks("bash"):
        for line in script.strip().splitlines():
            argv = shlex.split(line)
            assert argv[0] == "pefc" and main(argv[1:]) == 0, line
    assert (tmp_path / "out" / "qv-hf" / "config.json").exists()
