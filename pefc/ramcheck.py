"""Will a model's weights fit in memory? Checked on its meta-device twin before the real build.

Building a model too big for the machine ends with the kernel killing the process, after
minutes and without a word. Building it on the meta device first costs no memory and gives
the exact bytes of its parameters and buffers; :func:`check_fits` compares them with the
memory available now (``MemAvailable`` of ``/proc/meminfo``, else ``os.sysconf``).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from pefc.errors import ModelSourceError

GB = 1 << 30


def available_bytes() -> int | None:
    """Memory available to a new allocation now, in bytes (None when it cannot be told)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (shared tensors once; meta tensors too)."""
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def check_fits(needed: int, what: str) -> None:
    """Refuse, suggesting ``--meta``, when ``needed`` bytes exceed the memory available."""
    available = available_bytes()
    if available is None or needed <= available:
        return
    raise ModelSourceError(f"{what} needs about {needed / GB:.1f} GB for its weights, but only "
                           f"{available / GB:.1f} GB of memory is available; nothing was allocated",
                           hint="plan it without allocating weights: `pefc inspect SPEC --meta` (pefc.plan(spec)), "
                                "or run on a machine with more free memory")
