"""Forget the generated source of ``fx.GraphModule`` code that no longer runs.

Every ``GraphModule.recompile()`` stores the generated ``forward`` source in torch.fx's
module-level ``_loader.eval_cache`` and a lazy ``linecache`` entry (for tracebacks), and
never removes them: each compile leaves a few copies of the whole model's code behind
(about 60 kB for a tiny Llama, megabytes for a 7B one). pefc forgets an entry once the
``forward`` function compiled from it has been garbage collected.
"""

from __future__ import annotations

import linecache
import weakref
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx import graph_module as _fx_graph_module

_PREFIX = "<eval_with_key>."
_tracked: set[str] = set()


def mark() -> int:
    """The id the next generated source will get; pass it to :func:`forget_since`."""
    return int(getattr(_loader(), "next_id", 0))


def track(module: nn.Module) -> None:
    """Forget the source of ``module``'s current ``forward`` when that function dies."""
    function = getattr(type(module), "forward", None)
    key = _key_of(function)
    if key is None or key in _tracked:
        return
    _tracked.add(key)
    weakref.finalize(function, _forget, key)


def forget_since(start: int, keep: nn.Module | None = None) -> None:
    """Forget sources generated since :func:`mark` ``start``, except the live code of ``keep``'s GraphModules.

    For a stretch of work that makes GraphModules and keeps only ``keep`` (a capture): every
    other module made meanwhile must be dead or about to be dropped.
    """
    live = set()
    for module in keep.modules() if keep is not None else []:
        if isinstance(module, fx.GraphModule):
            track(module)
            live.add(_key_of(getattr(type(module), "forward", None)))
    cache = _eval_cache()
    for key in [k for k in cache if k.startswith(_PREFIX)]:
        number = key[len(_PREFIX):].split(" ", 1)[0]
        if number.isdigit() and int(number) >= start and key not in live and key not in _tracked:
            _forget(key)


def _forget(key: str) -> None:
    _tracked.discard(key)
    _eval_cache().pop(key, None)
    linecache.cache.pop(key, None)


def _key_of(function: Any) -> str | None:
    code = getattr(function, "__code__", None)
    key = getattr(code, "co_filename", None)
    return key if isinstance(key, str) and key.startswith(_PREFIX) else None


def _loader() -> Any:
    return getattr(_fx_graph_module, "_loader", None)


def _eval_cache() -> dict[str, str]:
    cache = getattr(_loader(), "eval_cache", None)
    return cache if isinstance(cache, dict) else {}
