"""Peak activation memory of one training step with and without gradient checkpointing.

    python examples/gradient_checkpointing_memory.py                  # 4-layer Llama, batch 4, seq 512, CPU
    python examples/gradient_checkpointing_memory.py --device cuda --dtype bfloat16

On CPU the peak is counted op by op (:class:`pefc.memory.PeakTensorMemory`); on CUDA it is
``torch.cuda.max_memory_allocated`` above the memory held before the step. Weights are not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

import pefc
from pefc.memory import PeakTensorMemory

CONFIG = {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024}


def spec(layers: int, dtype: str) -> pefc.Spec:
    return pefc.parse_spec({
        "version": 1, "model": {"hf": {"class": "LlamaForCausalLM", "config": {**CONFIG, "num_hidden_layers": layers}},
                                "dtype": dtype},
        "inputs": {"input_ids": {"shape": ["batch", "seq"], "high": CONFIG["vocab_size"]},
                   "attention_mask": {"shape": ["batch", "seq"], "low": 1, "high": 2}},
        "adapter_dtype": "float32",
        "adapters": [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 8}]})


def peak_mib(model: pefc.CompiledModel, inputs: dict[str, torch.Tensor]) -> float:
    """Peak memory of one forward + backward above what was allocated before, in MiB."""
    model.zero_grad(set_to_none=True)
    device = inputs["input_ids"].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        model(**inputs).logits.float().logsumexp(-1).mean().backward()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    with PeakTensorMemory() as memory:
        model(**inputs).logits.float().logsumexp(-1).mean().backward()
    return memory.peak_bytes / 2**20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    model = pefc.compile(spec(args.layers, args.dtype), device=args.device)
    model.train()
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)}
    plain = peak_mib(model, inputs)
    model.gradient_checkpointing_enable()
    checkpointed = peak_mib(model, inputs)
    print(f"{args.layers} layers, batch {args.batch}, seq {args.seq}, {args.dtype} on {args.device}: peak "
          f"{plain:.1f} MiB -> {checkpointed:.1f} MiB with gradient checkpointing "
          f"({1 - checkpointed / plain:.0%} less)")
    return {"plain_mib": plain, "checkpointed_mib": checkpointed}


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main(sys.argv[1:])
