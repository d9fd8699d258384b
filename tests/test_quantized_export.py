"""ONNX export over a quantized base: a re-quantized export (its weights dequantized in the ONNX graph)
reports its measured error (``pefc export --quantize --verify``) and warns naming the worst sites.

The default (float) merge is an ordinary float model: tests/test_quantized_base.py proves it exact
and free of quantized buffers, and tests/test_export_onnx.py that such models export exactly."""

from __future__ import annotations

import json

import pytest
import torch
from test_quantized_base import METHODS, spec_of

import pefc
from pefc.cli import main

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def model():
    compiled = pefc.compile(spec_of(METHODS["lora"]))
    with torch.no_grad():
        for name, p in compiled.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return compiled


def test_requantized_export_reports_its_error_and_the_cli_warns(model, tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(model.pefc.spec.to_json())
    model.save_adapters(tmp_path / "ckpt")
    code = main(["export", str(spec_file), "--adapters", str(tmp_path / "ckpt"), "-o", str(tmp_path / "q.onnx"),
                 "--quantize", "--verify", "--max-error", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "re-quantized merge (nf4)" in out and "warning:" in out and "worst sites: model.layers." in out
    diffs = [float(line.rsplit("= ", 1)[1]) for line in out.splitlines() if line.startswith("verify:")]
    assert len(diffs) == 2 and max(diffs) > 1e-4  # reported, not failed on: the re-quantized weights differ
    error = model.merge(quantize=True).pefc.extras["quantization_error"]
    assert f"max |delta logits| = {error['max_abs_logits']:.3g}" in out
    json.dumps(error)  # JSON-serialisable, as `pefc export` output


def test_the_merged_float_export_of_a_quantized_base_is_exact(model, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from pefc.export import export_onnx
    from pefc.source import example_inputs

    result = export_onnx(model, tmp_path / "float.onnx")
    assert not {"DequantizeLinear", "MatMulNBits"} & set(result.op_types)
    stored = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
              for t in onnx.load(str(tmp_path / "float.onnx")).graph.initializer if len(t.dims) == 2}
    assert stored == {"float32"}  # the merged weights are plain float matrices, no quantized codes
    merged = model.merge().eval()
    session = ort.InferenceSession(str(tmp_path / "float.onnx"), providers=["CPUExecutionProvider"])
    inputs = example_inputs(model.pefc.spec, seed=3, sizes={"batch": 3, "seq": 7})
    with torch.no_grad():
        want = merged(**inputs).logits.numpy()
    got = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(got - want).max() < 1e-5
