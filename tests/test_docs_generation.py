"""The Python and shell blocks of docs/generation.md run as written, in the order they appear."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pefc.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "generation.md"


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced python or bash block, in document order."""
    return re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_python_and_bash_blocks_run(tmp_path, monkeypatch):
    root = DOC.parents[1]
    (tmp_path / "specs").symlink_to(root / "specs")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for language, code in blocks():
        if language == "python":
            exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 (the project's own docs)
            continue
        for line in code.strip().splitlines():
            argv = shlex.split(line)
            assert argv[0] == "pefc" and main(argv[1:]) == 0, line
    assert (tmp_path / "out" / "merged-hf" / "model.safetensors").exists()
    assert (tmp_path / "out" / "qv-hf" / "config.json").exists()
    assert (tmp_path / "out" / "decoder.onnx").exists()
