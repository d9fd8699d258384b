"""Collectives a checkpoint needs when a model may be distributed: which rank writes, and
tensors that may be sharded (FSDP2's ``DTensor``). No dependency on the compiled model, so
:mod:`pefc.compiled` and :mod:`pefc.distributed` both build on it."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (e.g. a parameter under FSDP2)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather sharded (``DTensor``) values to full tensors; a collective when any is sharded."""
    return {name: t.full_tensor() if is_sharded(t) else t for name, t in tensors.items()}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor``, or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``target`` may be sharded: each rank keeps its own shard of ``value``."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                  src_data_rank=None)
    target.copy_(value)
