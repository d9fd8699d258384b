"""`pefc demo` runs end to end: loss falls, reload is identical, what it keeps works, the loss is plotted."""

from __future__ import annotations

import contextlib
import io
import shlex
import struct
import zlib
from pathlib import Path

import pytest

import pefc.demo
from pefc import cli
from pefc.demo import DemoResult, run_demo
from pefc.plot import BLUE, buckets, text_chart


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DemoResult, str, Path]:
    """One demo run with ``-o DIR`` and ``--plot FILE``: its result, its output and DIR."""
    root = tmp_path_factory.mktemp("demo")
    results: list[DemoResult] = []

    def recorded(**kwargs) -> DemoResult:
        results.append(run_demo(**kwargs))
        return results[-1]

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(pefc.demo, "run_demo", recorded)
        assert cli.main(["demo", "--steps", "60", "-o", str(root / "kept"), "--plot", str(root / "loss.png")]) == 0
    return results[0], out.getvalue(), root


def test_demo_trains_saves_and_reloads(demo):
    result, _, root = demo
    assert result.final_loss < result.first_loss - 0.05
    assert result.reload_max_diff == 0.0
    assert len(result.losses) == 60
    assert sorted(p.name for p in (root / "kept").iterdir()) == ["adapters.safetensors", "model.onnx", "spec.json"]


def test_demo_prints_next_commands_that_work(demo, capsys):
    result, output, root = demo
    printed = output.split("next, on what the demo kept:\n", 1)[1].splitlines()
    assert [line.strip() for line in printed] == result.next_commands
    assert [shlex.split(c)[:2] for c in printed] == [["pefc", "inspect"], ["pefc", "export"], ["pefc", "export-peft"]]
    for command in result.next_commands:
        assert cli.main(shlex.split(command)[1:]) == 0, command
    shown = capsys.readouterr().out
    assert "qv" in shown and "verify: onnxruntime vs PyTorch" in shown
    assert (root / "kept" / "peft" / "adapter_model.safetensors").is_file()


def test_demo_shows_the_loss_chart_in_the_terminal(demo):
    result, output, _ = demo
    chart = text_chart(result.losses)
    assert chart in output
    rows = chart.splitlines()[:8]
    assert rows[0].lstrip().startswith(f"{max(buckets(result.losses, 60)):.3f} |")  # y range on the left
    first, last = (sum(row.split("|", 1)[1][i] != " " for row in rows) for i in (0, -1))
    assert first > last  # the early columns stand higher than the late ones: the loss fell


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB PNG, checking its chunks' CRCs."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    assert all(raw[r * stride] == 0 for r in range(height))  # filter type 0 (none) on every row
    return width, height, [raw[r * stride + 1:(r + 1) * stride] for r in range(height)]


def test_demo_plots_the_loss_curve_as_png(demo):
    result, output, root = demo
    assert f"wrote the loss curve to {root / 'loss.png'}" in output
    width, height, rows = read_png(root / "loss.png")
    assert (width, height) == (640, 360)
    blue = bytes(BLUE)
    line_rows = {x: [y for y in range(height) if rows[y][3 * x:3 * x + 3] == blue] for x in range(width)}
    columns = [x for x, ys in line_rows.items() if ys]
    assert len(columns) > 0.9 * (width - 40)  # the line crosses the plot area
    left, right = min(line_rows[columns[0]]), min(line_rows[columns[-1]])
    assert left < right - height // 4  # a falling loss: the curve starts high (small y) and ends low
