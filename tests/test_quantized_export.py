"""ONNX export over a quantized base: the merged float export is exact; a re-quantized export
(``pefc export --quantize``) goes through onnxruntime's quantization tooling at the quantized sites
only, and reports its measured error (``--verify``: against the unmerged and the merged float model)
instead of failing on it, warning above ``--max-error`` with the worst sites named.

Two ONNX exports in all: the float one (reused for the int8 tool) and the CLI's nf4 one."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from test_quantized_base import METHODS, NF4, spec_of

import pefc
from pefc.cli import main
from pefc.errors import ExportError
from pefc.export import export_onnx, graph_inputs, verification_sizes
from pefc.onnx_quant import SCHEMES, check_fits, requantize, scheme_for, site_matmuls, weight_errors
from pefc.quant_merge import describe_error, float_weight_name, quantized_sites
from pefc.source import example_inputs

pytest.importorskip("torchao")
ort = pytest.importorskip("onnxruntime")


def lora_model(quantize=NF4):
    compiled = pefc.compile(spec_of(METHODS["lora"], quantize=quantize))
    with torch.no_grad():
        for name, p in compiled.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return compiled


@pytest.fixture(scope="module")
def model():
    return lora_model()


@pytest.fixture(scope="module")
def float_export(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "float.onnx"
    return export_onnx(model, path), path


def merged_weights(model, merged):
    """Site path -> the merged float weight [out, in] of every quantized site of ``model``."""
    return {s.path: merged.get_parameter(float_weight_name(s)).detach().numpy()
            for s in quantized_sites(model).values()}


def kernel_weight(quantized: onnx.ModelProto, node_name: str) -> np.ndarray:
    """The B [K, N] onnxruntime's own kernel multiplies by at ``node_name``: the node alone, fed an identity."""
    node = next(n for n in quantized.graph.node if n.name == node_name)
    k = next(a.i for a in node.attribute if a.name == "K")
    used = [t for t in quantized.graph.initializer if t.name in node.input[1:]]
    graph = onnx.helper.make_graph(
        [node], "one", [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, [k, k])],
        [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)], used)
    single = onnx.helper.make_model(graph, opset_imports=list(quantized.opset_import))
    session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {node.input[0]: np.eye(k, dtype=np.float32)})[0]


def ort_error(session, reference, inputs):
    """Max and mean |logits onnxruntime - logits PyTorch|, computed here."""
    with torch.no_grad():
        want = reference.eval()(**inputs).logits.numpy()
    got = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    diff = np.abs(got - want)
    return diff.max(), diff.mean()


def test_requantized_export_reports_its_error_and_the_cli_warns(tmp_path, capsys):
    skipped = ["lm_head", "*.down_proj"]
    compiled = lora_model({**NF4, "skip": skipped})
    spec_file, out_file = tmp_path / "spec.json", tmp_path / "q.onnx"
    spec_file.write_text(compiled.pefc.spec.to_json())
    compiled.save_adapters(tmp_path / "ckpt")
    code = main(["export", str(spec_file), "--adapters", str(tmp_path / "ckpt"), "-o", str(out_file),
                 "--quantize", "--verify", "--max-error", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    # onnxruntime's NF4 op exactly at the quantized sites (named after them), plain MatMul at the skipped ones
    quantized = onnx.load(str(out_file))
    sites = sorted(quantized_sites(compiled).values(), key=lambda s: s.path)
    assert len(sites) == 12 and not [s for s in sites if "down_proj" in s.path]
    assert sorted(n.name for n in quantized.graph.node if n.op_type == "MatMulBnb4") == \
        sorted(f"{s.path}_Bnb4" for s in sites)
    assert not {"MatMulNBits", "DequantizeLinear"} & {n.op_type for n in quantized.graph.node}
    merged = compiled.merge()
    floats = {p: merged.get_parameter(f"{p}.weight").detach().numpy()
              for p in ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]}
    assert {n.op_type for n in site_matmuls(quantized, floats).values()} == {"MatMul"}
    # the reported errors, computed again here: onnxruntime on the file against PyTorch
    session = ort.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    spec = compiled.pefc.spec
    largest, mean = ort_error(session, compiled, graph_inputs(compiled, example_inputs(spec)))
    assert "re-quantized export (nf4, onnxruntime MatMulBnb4Quantizer (NF4), block 64)" in out
    assert f"max |delta logits| = {largest:.3g}, mean = {mean:.3g} (12 sites)" in out
    sizes = verification_sizes(compiled)[0]
    inputs = graph_inputs(compiled, example_inputs(spec, seed=100, sizes=sizes))
    vs_unmerged, vs_float = ort_error(session, compiled, inputs), ort_error(session, merged, inputs)
    verify = [line for line in out.splitlines() if line.startswith("verify: onnxruntime (re-quantized)")]
    assert len(verify) == 2, out
    assert (f"dims {'x'.join(map(str, sizes.values()))}: vs unmerged PyTorch max |diff| = {vs_unmerged[0]:.3g}, "
            f"mean = {vs_unmerged[1]:.3g}; vs merged float max |diff| = {vs_float[0]:.3g}, "
            f"mean = {vs_float[1]:.3g}") in verify[0]
    assert vs_unmerged[0] > 1e-3  # reported, not failed on: the re-quantized weights differ
    # the warning names the worst site, with its weight error as onnxruntime's kernel computes it
    assert "warning: the re-quantized model differs from the unmerged one by more than 0" in out
    worst, value = re.search(r"worst sites: (\S+) \(max \|delta W\| (\S+)\)", out).groups()
    weights = merged_weights(compiled, merged)
    kernel = {p: float(np.abs(kernel_weight(quantized, f"{p}_Bnb4") - w.T).max()) for p, w in weights.items()}
    assert worst == max(kernel, key=kernel.get) and value == f"{kernel[worst]:.3g}"


def test_int8_goes_through_matmulnbits_at_the_quantized_sites_only(model, float_export):
    _, path = float_export
    weights = merged_weights(model, model.merge())
    int8 = SimpleNamespace(method="int8", block_size=64)
    root = logging.getLogger()
    before = list(root.handlers), root.level
    requantized = requantize(onnx.load(str(path)), weights, int8)
    assert (list(root.handlers), root.level) == before  # onnxruntime's tool does not reconfigure logging
    ops = [n for n in requantized.model.graph.node if n.op_type == "MatMulNBits"]
    assert sorted(n.name for n in ops) == sorted(f"{p}_Q8" for p in weights) and len(ops) == 14
    assert {a.name: a.i for a in ops[0].attribute}["bits"] == 8
    head = model.merge().get_parameter("lm_head.weight").detach().numpy()
    assert site_matmuls(requantized.model, {"lm_head": head})["lm_head"].op_type == "MatMul"  # skipped: float
    errors = weight_errors(requantized, weights)  # numpy reads the file; onnxruntime's kernel agrees
    for p, w in weights.items():
        kernel = kernel_weight(requantized.model, requantized.nodes[p])
        assert errors[p]["max_abs"] == pytest.approx(float(np.abs(kernel - w.T).max()), rel=1e-5, abs=1e-7)
        assert 0 < errors[p]["max_abs"] <= np.abs(w).max() / 127  # at most one int8 step of the row
    session = ort.InferenceSession(requantized.model.SerializeToString(), providers=["CPUExecutionProvider"])
    largest, _ = ort_error(session, model.merge(), example_inputs(model.pefc.spec, seed=3))
    assert 0 < largest < 0.05


def test_the_warning_comes_above_the_threshold_only_counting_verify():
    error = {"method": "nf4", "max_abs_logits": 0.01, "mean_abs_logits": 0.001, "tool": "onnxruntime T",
             "sites": {"a": {"max_abs": 0.1, "mean_abs": 0.01}, "b": {"max_abs": 0.3, "mean_abs": 0.02}}}
    assert "warning" not in describe_error(error, 0.05)
    assert "worst sites: b (max |delta W| 0.3), a (max |delta W| 0.1)" in describe_error(error, 0.05, observed=0.06)


def test_what_a_requantized_export_cannot_do_is_refused_up_front(model, tmp_path):
    with pytest.raises(ExportError, match="does not go with --no-merge or --lora-inputs"):
        export_onnx(model, tmp_path / "q.onnx", quantize=True, merge=False)
    with pytest.raises(ExportError, match="take float32 or float16 weights, the merged weights are bfloat16"):
        export_onnx(model, tmp_path / "q.onnx", quantize=True, dtype="bfloat16")
    assert not list(tmp_path.iterdir())


def test_a_block_size_or_method_onnxruntime_cannot_take_names_the_site(tmp_path):
    compiled = pefc.compile(spec_of(METHODS["lora"], quantize={**NF4, "block_size": 8}))
    with pytest.raises(ExportError, match=r"site 'model\.layers\.0\..*MatMulBnb4 takes block sizes 16, 32, 64, "
                                          r"128, 256, model\.quantize\.block_size is 8"):
        export_onnx(compiled, tmp_path / "q.onnx", quantize=True)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match=r"site 'model\.layers\.0\.mlp\.up_proj'.*'fp8'"):
        scheme_for(SimpleNamespace(method="fp8"), {"model.layers.0.mlp.up_proj": (128, 64)})
    with pytest.raises(ExportError, match=r"site 'x\.proj': its \[3, 10\] weight does not split into blocks of 16"):
        check_fits(SCHEMES["nf4"], 16, "x.proj", 3, 10)


def test_the_merged_float_export_of_a_quantized_base_is_exact(model, float_export):
    result, path = float_export
    assert not {"DequantizeLinear", "MatMulNBits", "MatMulBnb4"} & set(result.op_types)
    stored = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
              for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 2}
    assert stored == {"float32"}  # the merged weights are plain float matrices, no quantized codes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = example_inputs(model.pefc.spec, seed=3, sizes={"batch": 3, "seq": 7})
    assert ort_error(session, model.merge(), inputs)[0] < 1e-5
