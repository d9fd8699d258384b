"""Data-parallel training of a CompiledModel: DDP, FSDP2, and the checkpoint collectives.

- :func:`ddp` wraps a CompiledModel in ``DistributedDataParallel`` so that only adapter
  parameters are communicated: the frozen base (identical on every rank, built from the same
  spec) is neither broadcast at construction nor synchronised as buffers.
- :func:`fully_shard_layers` applies FSDP2 (``torch.distributed.fsdp.fully_shard``) to each
  decoder layer and then to the root: the frozen base is sharded layer by layer (gathered
  just before a layer runs, freed after), the adapters are sharded with the root's
  parameters and trained; gradients are reduce-scattered for adapters only.
- ``CompiledModel.save_adapters`` / ``load_adapters`` use :func:`full_tensors` and
  :func:`copy_into` (:mod:`pefc.collectives`, re-exported here) so that a sharded model saves
  one full checkpoint (rank 0 writes) and loads one on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from pefc.collectives import (
    barrier,
    copy_into,
    full_tensors,
    is_distributed,
    is_main_process,
    is_sharded,
    local_tensor,
)
from pefc.errors import PefcError

__all__ = ["DistributedContext", "barrier", "copy_into", "ddp", "full_tensors", "fully_shard_layers",
           "init_distributed", "is_distributed", "is_main_process", "is_sharded", "local_tensor"]

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pefc.compiled import CompiledModel


@dataclass
class DistributedContext:
    """This process's place in a ``torchrun`` job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistributedContext:
    """Initialise the default process group from ``torchrun``'s environment (gloo on CPU, NCCL on CUDA).

    Without ``torchrun`` (no ``RANK`` / ``WORLD_SIZE``) it returns a single-process context.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = torch.device(device).type
    place = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(place)
    if "WORLD_SIZE" not in os.environ:
        return DistributedContext(0, 1, 0, place)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=place if kind == "cuda" else None)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, place)


def ddp(model: CompiledModel, **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model)`` communicating adapter parameters only.

    Base parameters and buffers are frozen and identical on every rank, so DDP is told to
    ignore them (no broadcast at construction, no buffer sync per step); ``kwargs`` go to DDP.
    """
    if not dist.is_initialized():
        raise PefcError("torch.distributed is not initialised; start with torchrun and call "
                        "pefc.distributed.init_distributed() (or dist.init_process_group) first")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise PefcError("the model has no trainable parameters; DDP would have nothing to synchronise")
    frozen = [name for name, _ in model.named_parameters() if name not in trainable]
    buffers = [name for name, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def fully_shard_layers(model: CompiledModel, mesh: DeviceMesh | None = None, **kwargs: Any) -> CompiledModel:
    """Apply FSDP2 to every decoder layer of ``model``, then to ``model`` itself; return it.

    The layers become :class:`pefc.layers.LayerBlock` s (see
    :meth:`CompiledModel.partition_layers`) so that each one is called, and FSDP2 gathers its
    weights for exactly that call. ``kwargs`` (``reshard_after_forward``, ``mp_policy``,
    ``offload_policy``) go to every ``fully_shard`` call.
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise PefcError("torch.distributed is not initialised; start with torchrun and call "
                        "pefc.distributed.init_distributed() (or dist.init_process_group) first")
    model.partition_layers()
    from pefc.layers import layer_blocks

    for path, block in layer_blocks(model):
        if block.outside_reads:
            raise PefcError(f"layer {path!r} cannot be sharded on its own: the graph reads its parameter "
                            f"{block.outside_reads[0]!r} outside the layer", hint="shard the root only: "
                            "torch.distributed.fsdp.fully_shard(model)")
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model
