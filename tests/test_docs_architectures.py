"""Every Python snippet of docs/architectures.md runs and prints what the page says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs_and_prints_what_the_page_says(index):
    code = BLOCKS[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{PAGE.name}[{index}]", "exec"), {})
    printed = out.getvalue().splitlines()
    assert printed == [] if not promised(code) else len(printed) == len(promised(code))
    for got, want in zip(printed, promised(code), strict=True):
        assert got.startswith(want.removesuffix("...")), (got, want)


def promised(code: str) -> list[str]:
    """What each print is said to print: its trailing comment, or the comment line after it."""
    lines = code.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("print("):
            comment = line.split("# ", 1)[1] if "# " in line else lines[i + 1].removeprefix("# ")
            out.append(comment)
    return out
