"""An exported selecting model keeps `adapter_ids` as an input; onnxruntime equals PyTorch per row."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters

import pefc

# the three per-row forms: gathered products (lora), a gathered norm over the weight (dora), masked slots (prefix)
ADAPTERS = [{"name": "legal", "method": "lora", "target": ["@attn.q"], "r": 4},
            {"name": "med", "method": "dora", "target": ["@attn.v"], "r": 2},
            {"name": "style", "method": "prefix", "num_virtual_tokens": 2}]


def test_onnx_keeps_adapter_ids_and_matches_pytorch_per_row(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    spec = pefc.parse_spec({**make_spec(ADAPTERS), "select": {"adapters": ["legal", "med", "style"]}})
    model = pefc.compile(spec)
    randomize_adapters(model)
    model.eval()
    result = pefc.export_onnx(model, tmp_path / "select.onnx")
    assert result.inputs == ["input_ids", "attention_mask", "adapter_ids"]
    session = ort.InferenceSession(str(tmp_path / "select.onnx"), providers=["CPUExecutionProvider"])
    inputs = batch(5, 7, pad=True, seed=3)  # other sizes than the capture's
    ids = torch.tensor([2, 0, -1, 1, 0])
    with torch.no_grad():
        want = model(**inputs, adapter_ids=ids).logits
    feeds = {k: v.numpy() for k, v in inputs.items()} | {"adapter_ids": ids.numpy()}
    got = torch.from_numpy(session.run(None, feeds)[0])
    assert (got - want).abs().amax(dim=(1, 2)).max() < 1e-4
    assert (want[0] - want[2]).abs().max() > 1e-3  # rows of different adapters differ
