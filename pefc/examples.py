"""Example inputs as users pass them, made fit for capture.

A user's example tensors may be views or slices of a bigger batch, non-contiguous, on another
device than the model, or of size 1 in a dim the spec names (dynamic). torch.export keeps the
first three in its guards (a slice gives a model whose every call fails) and specialises a
size-1 dim to 1. :func:`normalize_examples` hands capture contiguous copies on the model's
device, each named dim of size 1 grown (by repeating the example) to a size no other named
dim has, so the captured model runs at every size of its dynamic dims, 1 included.
"""

from __future__ import annotations

from typing import Any

import torch

from pefc.schema import SpecBase


def normalize_examples(spec: SpecBase, inputs: dict[str, Any], device: torch.device | None,
                       *, dynamic: bool = True) -> dict[str, Any]:
    """Contiguous copies of the tensors of ``inputs`` on ``device``; size-1 named dims grown when ``dynamic``."""
    out = {name: _own_copy(value, device) for name, value in inputs.items()}
    if dynamic:
        for dim, size in _grown_sizes(spec, out).items():
            for name, index in _places(spec, out, dim):
                out[name] = _grow(out[name], index, size)
    return out


def _own_copy(value: Any, device: torch.device | None) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if device is not None and device.type != "meta" and value.device != device:
        value = value.to(device)
    return value.contiguous().clone()


def _places(spec: SpecBase, inputs: dict[str, Any], dim: str) -> list[tuple[str, int]]:
    """``(input, index)`` of every tensor dim the spec names ``dim``."""
    places = []
    for name, value in inputs.items():
        entry = spec.inputs.get(name)
        if entry is not None and isinstance(value, torch.Tensor) and len(entry.shape) == value.dim():
            places.extend((name, i) for i, d in enumerate(entry.shape) if d == dim)
    return places


def _grown_sizes(spec: SpecBase, inputs: dict[str, Any]) -> dict[str, int]:
    """The named dims whose examples all have size 1, each with the size to capture it at."""
    sizes: dict[str, set[int]] = {}
    for entry_name, value in inputs.items():
        entry = spec.inputs.get(entry_name)
        if entry is None or not isinstance(value, torch.Tensor) or len(entry.shape) != value.dim():
            continue
        for d, size in zip(entry.shape, value.shape, strict=True):
            if isinstance(d, str):
                sizes.setdefault(d, set()).add(int(size))
    taken = {s for found in sizes.values() for s in found}
    grown: dict[str, int] = {}
    for dim, found in sizes.items():
        if found == {1}:
            grown[dim] = next(n for n in range(2, 1 << 16) if n not in taken)
            taken.add(grown[dim])
    return grown


def _grow(tensor: torch.Tensor, index: int, size: int) -> torch.Tensor:
    """``tensor`` (size 1 in dim ``index``) repeated to ``size`` there."""
    shape = list(tensor.shape)
    shape[index] = size
    return tensor.expand(shape).contiguous()
