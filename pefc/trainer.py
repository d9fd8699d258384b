"""HF ``transformers.Trainer`` for a CompiledModel: its checkpoints hold the adapters only.

A CompiledModel of a transformers model takes ``labels`` and returns the model's output with
its ``loss`` when the spec's ``inputs`` include ``labels``, which is all ``Trainer`` needs to
train it. The plain ``Trainer`` would save the whole ``state_dict`` (the frozen base too);
:class:`AdapterTrainer` saves ``adapters.safetensors`` + ``spec.json`` instead, and resumes
from (and loads the best model from) such checkpoints::

    from pefc.trainer import AdapterTrainer
    trainer = AdapterTrainer(model=cm, args=TrainingArguments("out", ...), train_dataset=ds)
    trainer.train()
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from pefc.compiled import CompiledModel
from pefc.errors import PefcError


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints are pefc adapter checkpoints (no base weights)."""

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        compiled_model(self.model).save_adapters(output_dir, writer=True)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        compiled_model(model if model is not None else self.model).load_adapters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            compiled_model(self.model).load_adapters(self.state.best_model_checkpoint)


def compiled_model(model: nn.Module) -> CompiledModel:
    """The CompiledModel inside ``model`` (itself, or wrapped by DDP / accelerate)."""
    while not isinstance(model, CompiledModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, CompiledModel):
        raise PefcError(f"AdapterTrainer trains a pefc CompiledModel, got {type(model).__name__}",
                        hint="model = pefc.compile(spec) with `labels` among the spec's inputs")
    return model
