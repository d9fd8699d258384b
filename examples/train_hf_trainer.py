"""Train a CompiledModel with HF ``transformers.Trainer``: labels in, loss out, adapter-only checkpoints.

    python examples/train_hf_trainer.py specs/llama-lora.yaml --out out/trainer

The spec's ``inputs`` gain an optional ``labels`` (so the model computes its own loss when given
them, and runs without them for evaluation or generation);
``pefc.trainer.AdapterTrainer`` is ``Trainer`` with checkpoints that hold
``adapters.safetensors`` + ``spec.json`` (no base weights). Everything else is plain Trainer:
``TrainingArguments(activation_checkpointing=True)``, ``bf16=True``, torchrun for DDP.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import TrainingArguments

import pefc
from pefc.demo import copy_task_batch
from pefc.trainer import AdapterTrainer


class CopyTask(torch.utils.data.Dataset):
    """The copy task as HF examples: labels are the token ids on the copied half, -100 elsewhere."""

    def __init__(self, size: int, length: int, seed: int = 0) -> None:
        self.ids, _ = copy_task_batch(size, length, torch.Generator().manual_seed(seed))
        self.labels = self.ids.clone()
        self.labels[:, :length + 1] = -100  # the model shifts labels itself

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def with_labels(spec: pefc.Spec) -> pefc.Spec:
    """The spec with an optional ``labels`` input shaped like ``input_ids`` (``.loss`` when given)."""
    if "labels" in spec.inputs:
        return spec
    labels = spec.inputs["input_ids"].model_copy(update={"low": 0, "optional": True})
    return spec.model_copy(update={"inputs": {**spec.inputs, "labels": labels}})


def main(argv: list[str] | None = None) -> AdapterTrainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--out", default="out/trainer")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    model = pefc.compile(with_labels(pefc.load_spec(args.spec)))
    training = TrainingArguments(args.out, max_steps=args.steps, save_steps=args.save_steps, learning_rate=args.lr,
                                 per_device_train_batch_size=args.batch, logging_steps=1, report_to=[],
                                 activation_checkpointing=args.gradient_checkpointing, disable_tqdm=True,
                                 use_cpu=not torch.cuda.is_available())
    trainer = AdapterTrainer(model=model, args=training, train_dataset=CopyTask(4 * args.batch, args.length))
    trainer.train()
    trainer.save_model(os.path.join(args.out, "final"))
    return trainer


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main(sys.argv[1:])
