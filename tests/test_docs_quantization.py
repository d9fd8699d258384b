"""Every fenced python and bash block of docs/quantization.md runs (the 7B plan prints its stored size)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pefc.cli import main

pytest.importorskip("torchao")
ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "quantization.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)


def test_python_blocks_run(capsys):
    assert blocks("python")
    for code in blocks("python"):
        exec(compile(code, "docs/quantization.md", "exec"), {})
    assert "base stored:" in capsys.readouterr().out


def test_bash_blocks_run(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = [line for code in blocks("bash") for line in code.splitlines() if line.strip()]
    assert commands
    for line in commands:
        args = shlex.split(line)
        assert args[0] == "pefc"
        assert main(args[1:]) == 0, line
    stored = re.search(r"base stored:\s+([\d.]+) GB \(nf4 weights\)", capsys.readouterr().out)
    assert stored and 3.6 <= float(stored.group(1)) <= 3.9
