"""HF transformers.Trainer trains a CompiledModel (labels in, loss out); checkpoints hold adapters only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_spec
from safetensors.torch import load_file

import pefc

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_hf_trainer.py"
ADAPTERS = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4, "alpha": 8}]


def _script():
    spec = importlib.util.spec_from_file_location("train_hf_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    spec = out / "spec.yaml"
    spec.write_text(yaml.safe_dump(make_spec(ADAPTERS)))
    trainer = _script().main([str(spec), "--out", str(out), "--steps", "6", "--save-steps", "3", "--batch", "4",
                              "--gradient-checkpointing"])
    return trainer, out


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_trains_and_loss_falls(run):
    trainer, _ = run
    losses = _losses(trainer)
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    model = trainer.model
    assert isinstance(model, pefc.CompiledModel) and model.is_gradient_checkpointing
    assert "labels" in model.pefc.spec.inputs


def test_checkpoints_hold_adapter_tensors_only(run):
    trainer, out = run
    adapter_names = set(trainer.model.adapter_state_dict())
    for checkpoint in (out / "checkpoint-3", out / "checkpoint-6", out / "final"):
        assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("pytorch_model*"))
        tensors = load_file(str(checkpoint / "adapters.safetensors"))
        assert set(tensors) == adapter_names
    optimizer = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter_names)  # the optimizer holds adapter state only


def test_final_checkpoint_loads_into_a_fresh_model(run):
    trainer, out = run
    fresh = pefc.compile(trainer.model.pefc.spec)
    fresh.load_adapters(out / "final")
    for key, value in trainer.model.adapter_state_dict().items():
        assert torch.equal(fresh.adapter_state_dict()[key], value)


def test_resume_from_checkpoint_matches_uninterrupted_run(run, tmp_path):
    trainer, out = run
    module = _script()
    model = pefc.compile(trainer.model.pefc.spec)
    resumed = module.AdapterTrainer(model=model, args=trainer.args.__class__(
        str(tmp_path), **{k: getattr(trainer.args, k) for k in (
            "max_steps", "save_steps", "learning_rate", "per_device_train_batch_size", "logging_steps",
            "report_to", "activation_checkpointing", "disable_tqdm", "use_cpu")}), train_dataset=trainer.train_dataset)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    for key, value in trainer.model.adapter_state_dict().items():
        torch.testing.assert_close(model.adapter_state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_labels_are_optional_and_evaluate_reports_the_models_loss(run):
    trainer, _ = run
    model = trainer.model
    assert trainer.label_names == ["labels"]  # Trainer found them in the call signature
    eval_set = torch.utils.data.Subset(trainer.train_dataset, range(4))
    batch = {k: torch.stack([eval_set[i][k] for i in range(4)]) for k in eval_set[0]}
    metrics = trainer.evaluate(eval_dataset=eval_set)
    model.eval()
    with torch.no_grad():
        full, plain = model(**batch), model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert plain.loss is None and torch.equal(plain.logits, full.logits)
    assert abs(metrics["eval_loss"] - float(full.loss)) < 1e-5
