"""The Python blocks of docs/trust.md run as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "trust.md"


def test_the_python_blocks_run(monkeypatch, capsys):
    monkeypatch.delenv("PEFC_TRUST_CODE", raising=False)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), {})
    finally:
        sys.modules.pop("mymodel", None)
    out = capsys.readouterr().out
    assert "'mymodel:make'" in out and "--trust-code" in out and out.rstrip().endswith("16")
