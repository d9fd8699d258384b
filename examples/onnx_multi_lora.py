"""One exported ONNX model, two LoRA adapters swapped per `session.run` in ONNX Runtime.

    python examples/onnx_multi_lora.py [--steps 150] [--out out/multi_lora]

Trains two adapters of the demo spec on different synthetic tasks (copy and reverse),
exports the base graph once with LoRA A/B as inputs (`lora_inputs=True`), writes each
adapter as an `.onnx_adapter` file, then runs one onnxruntime session three ways: no
adapter (must equal the base model), the copy adapter and the reverse adapter (each must
equal its PyTorch CompiledModel).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import pefc
from pefc.demo import DEMO_SPEC, SEP, copy_task_batch, loss_of
from pefc.export import export_lora_adapter, export_onnx
from pefc.spec import parse_spec


def reverse_task_batch(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = copy_task_batch(batch, length, generator)
    ids[:, length + 1:] = ids[:, :length].flip(1)
    labels[:, length:-1] = ids[:, length + 1:]
    return ids, labels


def train(spec: pefc.Spec, task, steps: int, seed: int) -> pefc.CompiledModel:
    torch.manual_seed(seed)
    model = pefc.compile(spec)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids, labels = task(32, 8, generator)
        loss = loss_of(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"  {task.__name__}: final loss {loss.item():.3f}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="out/multi_lora")
    args = parser.parse_args()
    out = Path(args.out)
    spec = parse_spec(DEMO_SPEC, source="demo spec")

    print("training two adapters of one spec on two tasks")
    adapters = {"copy": train(spec, copy_task_batch, args.steps, 1),
                "reverse": train(spec, reverse_task_batch, args.steps, 2)}
    base = pefc.compile(spec.model_copy(update={"adapters": []})).eval()

    exported = export_onnx(adapters["copy"], out / "model.onnx", lora_inputs=True)
    print(f"exported {exported.path}: {exported.nodes} nodes, {len(exported.lora_inputs)} LoRA inputs")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(exported.path), options, providers=["CPUExecutionProvider"])

    ids, _ = copy_task_batch(3, 8, torch.Generator().manual_seed(9))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    with torch.no_grad():
        want_base = base(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    got = session.run(None, feeds)[0]
    print(f"no adapter active:   max |onnxruntime - base model| = {np.abs(got - want_base).max():.2e}")
    assert np.abs(got - want_base).max() < 1e-4
    for name, model in adapters.items():
        path = out / f"{name}.onnx_adapter"
        export_lora_adapter(model, path)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        got = session.run(None, feeds, run_options=run_options)[0]
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
        predicted = got.argmax(-1)[:, 8:-1]
        print(f"{name:>7} adapter:      max |onnxruntime - CompiledModel| = {np.abs(got - want).max():.2e}; "
              f"tokens after SEP ({SEP}) predicted: {predicted[0].tolist()}")
        assert np.abs(got - want).max() < 1e-4
    print(f"input tokens of row 0: {ids[0, :8].tolist()}")


if __name__ == "__main__":
    main()
