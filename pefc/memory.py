"""Peak tensor memory of a block of code, on any device (CPU included).

``torch.cuda.max_memory_allocated`` exists for CUDA only; :class:`PeakTensorMemory` counts,
op by op, the storage of every tensor the block allocates while it is alive (activations
kept for backward, temporaries, gradients), so it measures what gradient checkpointing
saves on CPU too. Tensors that existed before the block (weights) are not counted.

    with PeakTensorMemory() as memory:
        model(**batch).logits.sum().backward()
    print(memory.peak_bytes)
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storage allocated by the ops run inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: set[tuple[str, int]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[tuple[str, int]]) -> None:
        key, size = _key(storage), storage.nbytes()
        if size == 0 or key in self._live or key in inputs:  # views and in-place results allocate nothing
            return
        self._live.add(key)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: tuple[str, int], size: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.live_bytes -= size


def _key(storage: torch.UntypedStorage) -> tuple[str, int]:
    return str(storage.device), storage.data_ptr()
