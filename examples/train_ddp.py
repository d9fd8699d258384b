"""Data-parallel adapter training with torchrun: DDP (default) or FSDP2 (``--fsdp``).

    torchrun --nproc_per_node=2 examples/train_ddp.py specs/llama-lora.yaml --out out/ddp
    torchrun --nproc_per_node=2 examples/train_ddp.py specs/llama-lora.yaml --fsdp --out out/fsdp
    python examples/train_ddp.py specs/llama-lora.yaml --out out/single        # one process, same global batch
    torchrun --nproc_per_node=2 examples/train_ddp.py specs/llama-lora.yaml --no-dropout \\
        --out out/ddp --compare out/single                                    # max |diff| of the adapters

Every rank compiles the same spec (same seed, so the same frozen base), takes its rows of
the same global batch of the copy task (``pefc.demo``), and trains the adapters; rank 0
writes ``--out`` (adapters) and ``--report`` (JSON: losses, base unchanged, what is
communicated). On GPUs: ``--device cuda --dtype bfloat16`` (bf16 base, float32 adapters).
Runs match a single-process run with the same global batch only without dropout
(``--no-dropout``): each rank draws its own dropout masks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import pefc
from pefc.demo import copy_task_batch, loss_of
from pefc.distributed import (
    DistributedContext,
    ddp,
    fully_shard_layers,
    init_distributed,
    is_sharded,
    local_tensor,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 per decoder layer instead of DDP")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split across ranks)")
    parser.add_argument("--length", type=int, default=8, help="copy-task half length (sequence 2n+1)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optim", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="base dtype (spec's default)")
    parser.add_argument("--adapter-dtype", choices=["float32", "bfloat16", "float16"],
                        help="adapter dtype (default: float32 when --dtype is lower precision)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-dropout", action="store_true", help="set every adapter's dropout to 0")
    parser.add_argument("--batches", type=int, default=0, help="cycle through this many global batches "
                        "(0: a new one every step)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data")
    parser.add_argument("--out", default="out/adapters", help="adapter checkpoint directory")
    parser.add_argument("--report", help="write a JSON report here (rank 0)")
    parser.add_argument("--compare", help="adapter checkpoint to compare with (prints the max |diff|)")
    return parser.parse_args(argv)


def load_spec(args: argparse.Namespace) -> pefc.Spec:
    """The spec with the command line's dtype, adapter dtype, checkpointing and dropout applied."""
    spec = pefc.load_spec(args.spec)
    update: dict[str, Any] = {}
    if args.dtype and spec.model is not None:
        update["model"] = spec.model.model_copy(update={"dtype": args.dtype})
    adapter_dtype = args.adapter_dtype or ("float32" if args.dtype in ("bfloat16", "float16") else None)
    if adapter_dtype:
        update["adapter_dtype"] = adapter_dtype
    if args.gradient_checkpointing:
        update["gradient_checkpointing"] = True
    if args.no_dropout:
        update["adapters"] = [a.model_copy(update={"dropout": 0.0}) if hasattr(a, "dropout") else a
                              for a in spec.adapters]
    return spec.model_copy(update=update)


def global_batch(step: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: the same on every rank and in a single-process run."""
    index = step % args.batches if args.batches else step
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
    return copy_task_batch(args.batch, args.length, generator)


def my_rows(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    if tensor.shape[0] % ctx.world_size:
        raise SystemExit(f"--batch {tensor.shape[0]} is not divisible by the {ctx.world_size} ranks")
    rows = tensor.shape[0] // ctx.world_size
    return tensor[ctx.rank * rows:(ctx.rank + 1) * rows].to(ctx.device)


def wrap(model: pefc.CompiledModel, ctx: DistributedContext, fsdp: bool) -> tuple[torch.nn.Module, list[str]]:
    """The module to call and the names of the parameters whose gradients are communicated."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if ctx.world_size == 1:
        return model, []
    if fsdp:
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        return fully_shard_layers(model, mesh), trainable  # only trainable params have gradients to reduce
    wrapped = ddp(model)
    return wrapped, [n for n, _ in model.named_parameters() if n not in wrapped.parameters_to_ignore]


def fingerprint(model: pefc.CompiledModel) -> dict[str, torch.Tensor]:
    """A bitwise fingerprint of this rank's frozen base tensors."""
    digest = getattr(torch, "hash_tensor", None)
    frozen = [(n, local_tensor(p.detach())) for n, p in model.named_parameters() if not p.requires_grad]
    return {n: digest(t) if digest else t.clone() for n, t in frozen}


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistributedContext,
          args: argparse.Namespace) -> list[float]:
    """Train for ``args.steps`` steps; return the global mean loss of each step."""
    losses = []
    model.train()
    for step in range(args.steps):
        ids, labels = (my_rows(t, ctx) for t in global_batch(step, args))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        loss = loss_of(out.logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        if ctx.world_size > 1:
            dist.all_reduce(value)
            value /= ctx.world_size
        losses.append(value.item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"the loss became {losses[-1]} at step {step}")
    return losses


def sharding(model: pefc.CompiledModel) -> dict[str, Any]:
    """How many parameters are sharded (DTensors), and which modules are FSDP units."""
    from torch.distributed.fsdp import FSDPModule

    return {"params": sum(is_sharded(p) for p in model.parameters()), "of": len(list(model.parameters())),
            "units": [name or "(root)" for name, m in model.named_modules() if isinstance(m, FSDPModule)]}


def reload_is_exact(model: pefc.CompiledModel, directory: str) -> bool:
    """Zero the adapters, load ``directory`` on every rank, and check each rank got its tensors back."""
    own = model.adapter_state_dict()
    saved = {k: local_tensor(v).clone() for k, v in own.items()}
    with torch.no_grad():
        for value in own.values():
            local_tensor(value).zero_()
    model.load_adapters(directory)
    return all(torch.equal(local_tensor(own[k]), saved[k]) for k in saved)


def compare(directory: str, other: str) -> float:
    from safetensors.torch import load_file

    mine = load_file(str(Path(directory) / "adapters.safetensors"))
    theirs = load_file(str(Path(other) / "adapters.safetensors"))
    if mine.keys() != theirs.keys():
        raise SystemExit(f"{directory} and {other} hold different tensors")
    return max((mine[k].float() - theirs[k].float()).abs().max().item() for k in mine)


def everywhere(flags: list[bool], ctx: DistributedContext) -> list[bool]:
    """Whether each flag holds on every rank."""
    values = torch.tensor([float(f) for f in flags])
    if ctx.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return [bool(v) for v in values]


def run(args: argparse.Namespace, ctx: DistributedContext) -> dict[str, Any]:
    """Compile, wrap, train, save and reload on this rank; return the report (the same on every rank)."""
    started = time.perf_counter()
    model = pefc.compile(load_spec(args), device=str(ctx.device))
    wrapped, communicated = wrap(model, ctx, args.fsdp)
    before = fingerprint(model)  # after sharding: each rank checks its own shards
    params = model.trainable_parameters()
    optimizer = (torch.optim.AdamW(params, lr=args.lr) if args.optim == "adamw"
                 else torch.optim.SGD(params, lr=args.lr))
    losses = train(wrapped, optimizer, ctx, args)
    after = fingerprint(model)
    model.save_adapters(args.out)  # rank 0 writes (under FSDP2 every rank takes part in the gather)
    if ctx.world_size > 1:
        dist.barrier()  # the checkpoint exists before any rank reads it
    unchanged, reloaded = everywhere([all(torch.equal(before[n], after[n]) for n in before),
                                      reload_is_exact(model, args.out)], ctx)
    mode = "single" if ctx.world_size == 1 else "fsdp" if args.fsdp else "ddp"
    return {"world_size": ctx.world_size, "mode": mode, "losses": losses, "base_unchanged": unchanged,
            "reload_exact": reloaded, "sharded": sharding(model), "communicated": communicated,
            "adapters": str(args.out), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ctx = init_distributed(args.device)
    report = run(args, ctx)
    if ctx.is_main:
        if args.compare:
            report["max_abs_diff"] = compare(args.out, args.compare)
        losses = report["losses"]
        print(f"{report['mode']} x{ctx.world_size}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, base unchanged: "
              f"{report['base_unchanged']}, adapters in {args.out}"
              + (f", max |diff| vs {args.compare}: {report['max_abs_diff']:.3g}" if args.compare else ""))
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2))
    if dist.is_initialized():
        dist.barrier()  # no rank tears its group down while another still talks to it
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main(sys.argv[1:])
