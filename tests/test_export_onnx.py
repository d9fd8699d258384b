"""ONNX export: merged graphs cost nothing, onnxruntime agrees on fresh shapes, writes are atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_spec, randomize_adapters

import pefc
from pefc.export import _atomic_save, export_lora_adapter, export_onnx, verification_sizes
from pefc.source import example_inputs
from pefc.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
LORA = {"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def lora_model():
    model = pefc.compile(parse_spec(make_spec([LORA])))
    randomize_adapters(model)
    return model


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    base = pefc.compile(parse_spec(make_spec([])))
    return export_onnx(base, tmp_path_factory.mktemp("base") / "base.onnx")


@pytest.fixture(scope="module")
def merged_export(lora_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("merged")
    return export_onnx(lora_model, directory / "model.onnx", merge=True, verify=True, external_data=True)


def test_merged_lora_export_has_the_base_graph_and_agrees(merged_export, base_export):
    assert merged_export.nodes == base_export.nodes
    assert merged_export.op_types == base_export.op_types
    assert set(merged_export.verify_max_abs_diff) == {"3x9", "1x11"}  # batch/seq other than the capture's 2x8
    assert max(merged_export.verify_max_abs_diff.values()) < 1e-4
    assert merged_export.outputs == ["logits"]


def test_external_data_is_written_beside_the_model(merged_export):
    import onnx

    assert merged_export.external_data
    directory = merged_export.path.parent
    assert sorted(p.name for p in directory.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(merged_export.path))


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_lora_inputs_follow_the_onnxruntime_adapter_convention(lora_model, tmp_path):
    result = export_onnx(lora_model, tmp_path / "model.onnx", lora_inputs=True)
    assert "qv.model.layers.0.self_attn.q_proj.lora_A" in result.inputs
    export_lora_adapter(lora_model, tmp_path / "qv.onnx_adapter")
    session = _session(tmp_path / "model.onnx")
    inputs = example_inputs(lora_model.pefc.spec, seed=7, sizes=verification_sizes(lora_model)[0])
    feeds = {k: v.numpy() for k, v in inputs.items()}
    base = pefc.compile(parse_spec(make_spec([]))).eval()
    reference = lora_model.eval()
    with torch.no_grad():
        want_base = base(**inputs).logits.numpy()
        want_lora = reference(**inputs).logits.numpy()
    no_adapter = session.run(None, feeds)[0]
    assert np.abs(no_adapter - want_base).max() < 1e-4
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "qv.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    with_adapter = session.run(None, feeds, run_options=options)[0]
    assert np.abs(with_adapter - want_lora).max() < 1e-4
    assert np.abs(with_adapter - want_base).max() > 1e-3


class _HalfWrittenProgram:
    """An ONNX program whose save writes part of the file, then fails (a full disk)."""

    def save(self, path, external_data=False):
        Path(path).write_bytes(b"\x08\x07partial")
        raise OSError("disk full")


def test_failed_export_leaves_no_file(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(OSError, match="disk full"):
        _atomic_save(_HalfWrittenProgram(), target, external_data=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_the_previous_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    class Saved:
        def save(self, path, external_data=False):
            Path(path).write_bytes(b"new")

    def verify(written):
        assert written.read_bytes() == b"new" and written != target
        raise pefc.VerificationError("outputs differ")

    with pytest.raises(pefc.VerificationError):
        _atomic_save(Saved(), target, external_data=False, check=verify)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and target.read_bytes() == b"previous"


MERGEABLE = {
    "dora": {"name": "d", "method": "dora", "target": ["@attn.q", "@mlp.down"], "r": 4},
    "ia3": {"name": "i", "method": "ia3"},
    "lora+ia3": [{"name": "l", "method": "lora", "target": ["@attn.v"], "r": 4}, {"name": "i", "method": "ia3"}],
}
UNMERGEABLE = [  # every unmergeable method in one model (MAM: prefix + parallel adapter), beside unmerged LoRA
    {"name": "p", "method": "prefix", "num_virtual_tokens": 3, "projection": {"hidden": 16}},
    {"name": "a", "method": "adapter", "target": ["@mlp.up"], "size": 8},
    {"name": "pa", "method": "adapter", "placement": "parallel", "target": ["@mlp.down"], "size": 8},
    {"name": "t", "method": "prompt", "num_virtual_tokens": 2},
    {"name": "l", "method": "lora", "target": ["@attn.v"], "r": 4},
]


def _compiled(adapters):
    model = pefc.compile(parse_spec(make_spec(adapters if isinstance(adapters, list) else [adapters])))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("case", sorted(MERGEABLE))
def test_mergeable_methods_export_the_base_graph(case):
    model = _compiled(MERGEABLE[case])
    merged = model.merge()
    assert len(merged.graph.nodes) == model.pefc.base_node_count
    base = pefc.compile(parse_spec(make_spec([])))
    assert [(n.op, n.target) for n in merged.graph.nodes] == [(n.op, n.target) for n in base.graph.nodes]
    inputs = example_inputs(model.pefc.spec, seed=3, sizes=verification_sizes(model)[1])
    with torch.no_grad():
        assert (model.eval()(**inputs).logits - merged.eval()(**inputs).logits).abs().max() < 1e-5
    # the base's graph exports as the base's ONNX graph: the merged LoRA export above proves it


def test_unmergeable_methods_export_unmerged_and_agree(base_export, tmp_path):
    import onnx

    model = _compiled(UNMERGEABLE)
    result = export_onnx(model, tmp_path / "model.onnx", merge=False, verify=True)
    assert result.nodes > base_export.nodes
    assert max(result.verify_max_abs_diff.values()) < 1e-4
    names = {t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    assert not any("transform" in n for n in names)  # the prefix MLP is baked into a plain table
