"""Plots of a series (a loss curve) without a plotting library: a text chart and a PNG file.

``text_chart`` draws the series as rows of Unicode block characters (eighths of a cell, so
8 levels per row); ``write_png`` renders a line chart as an RGB PNG written with zlib and
struct only, atomically (a temporary file beside the target, then rename).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from pefc.atomic import atomic_path

BLOCKS = " ▁▂▃▄▅▆▇█"
ASCII_BLOCKS = " .:-=+*#@"
WHITE, GREY, BLUE = (255, 255, 255), (170, 170, 170), (31, 90, 200)


def buckets(values: Sequence[float], n: int) -> list[float]:
    """``values`` resampled to at most ``n`` points, each the mean of its run of values."""
    if not values:
        raise ValueError("cannot plot an empty series")
    n = min(n, len(values))
    edges = [round(i * len(values) / n) for i in range(n + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False)]


def text_chart(values: Sequence[float], *, width: int = 60, height: int = 8, label: str = "loss",
               ascii_only: bool = False) -> str:
    """A ``height``-row chart of ``values`` (resampled to ``width`` columns), y range on the left."""
    points = buckets(values, width)
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    levels = [round((p - lo) / span * (height * 8 - 1)) + 1 for p in points]  # 1 .. 8*height
    chars = ASCII_BLOCKS if ascii_only else BLOCKS
    top, bottom = f"{hi:.3f}", f"{lo:.3f}"
    pad = max(len(top), len(bottom))
    rows = []
    for row in range(height - 1, -1, -1):
        cells = "".join(chars[min(8, max(0, level - row * 8))] for level in levels)
        axis = top if row == height - 1 else bottom if row == 0 else ""
        rows.append(f"{axis:>{pad}} |{cells}")
    rows.append(f"{'':>{pad}} +{'-' * len(points)}")
    rows.append(f"{'':>{pad}}  {label} over {len(values)} steps (step 1 left, step {len(values)} right)")
    return "\n".join(rows)


def line_pixels(values: Sequence[float], width: int, height: int, margin: int) -> list[list[tuple[int, int, int]]]:
    """RGB rows of a white image with grey axes and ``values`` as a blue line inside ``margin``."""
    image = [[WHITE] * width for _ in range(height)]
    x0, x1, y0, y1 = margin, width - 1 - margin, margin, height - 1 - margin
    for x in range(x0, x1 + 1):
        image[y1][x] = GREY
    for y in range(y0, y1 + 1):
        image[y][x0] = GREY
    points = buckets(values, x1 - x0)
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    coords = [(x0 + 1 + round(i * (x1 - x0 - 1) / max(1, len(points) - 1)),
               y0 + round((hi - p) / span * (y1 - y0 - 2))) for i, p in enumerate(points)]
    for (xa, ya), (xb, yb) in zip(coords, coords[1:] or coords, strict=False):
        steps = max(abs(xb - xa), abs(yb - ya), 1)
        for k in range(steps + 1):
            x, y = xa + round(k * (xb - xa) / steps), ya + round(k * (yb - ya) / steps)
            for dy in (0, 1):  # two pixels thick
                image[y + dy][x] = BLUE
    return image


def png_bytes(image: list[list[tuple[int, int, int]]]) -> bytes:
    """``image`` (rows of RGB triples) encoded as an 8-bit RGB PNG."""
    height, width = len(image), len(image[0])
    raw = b"".join(b"\x00" + bytes(c for pixel in row for c in pixel) for row in image)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def write_png(path: str | Path, values: Sequence[float], *, width: int = 640, height: int = 360,
              margin: int = 20) -> Path:
    """Write ``values`` as a ``width`` x ``height`` line chart PNG at ``path`` (atomically)."""
    if width <= 2 * margin + 2 or height <= 2 * margin + 2:
        raise ValueError(f"a {width}x{height} image leaves no room inside a margin of {margin}")
    data = png_bytes(line_pixels(values, width, height, margin))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
