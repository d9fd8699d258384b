"""Every user-facing error is catalogued, and every bad CLI input ends in one clear line, never a traceback."""

from __future__ import annotations

import inspect
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_spec

import pefc
import pefc.errors
from pefc.checkpoint import ADAPTERS_FILE, read_checkpoint, save_checkpoint
from pefc.cli import main
from pefc.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
LORA = {"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}


def error_classes() -> list[type[pefc.PefcError]]:
    return [cls for _, cls in inspect.getmembers(pefc.errors, inspect.isclass) if issubclass(cls, pefc.PefcError)]


def test_every_error_class_has_a_catalogue_section_with_its_exit_code():
    text = (ROOT / "docs" / "errors.md").read_text()
    for cls in error_classes():
        if cls is pefc.PefcError:
            assert "## PefcError itself" in text
            continue
        section = re.search(rf"^## {cls.__name__}\n\n(.*?)(?=^## )", text, re.S | re.M)
        assert section, f"docs/errors.md has no section for {cls.__name__}"
        assert f"Exit {cls.exit_code}." in section.group(1), f"{cls.__name__}: exit code {cls.exit_code} not stated"
        assert re.search(rf"\[`{cls.__name__}`\]\(#\w+\) \| {cls.exit_code} \|", text), f"{cls.__name__} not in the table"


def test_every_error_class_is_exported_from_pefc():
    assert {cls.__name__ for cls in error_classes()} <= set(pefc.__all__)


# --- the CLI sweep -------------------------------------------------------------------------------

def _write_spec(path: Path, adapters: list[dict], **model) -> Path:
    path.write_text(yaml.safe_dump(make_spec(adapters, **model)))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Specs and checkpoints, good and bad, shared by the sweep."""
    root = tmp_path_factory.mktemp("sweep")
    spec = _write_spec(root / "lora.yaml", [LORA])
    model = pefc.compile(pefc.load_spec(spec))
    good = model.save_adapters(root / "good")
    pefc.compile(parse_spec(make_spec([{**LORA, "r": 8}]))).save_adapters(root / "r8")
    tensors, data = read_checkpoint(good)
    spec_json = json.dumps(data)
    save_checkpoint(root / "nan", {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, spec_json)
    save_checkpoint(root / "float64", {k: v.double() for k, v in tensors.items()}, spec_json)
    raw = (good / ADAPTERS_FILE).read_bytes()
    (root / "flipped").mkdir()
    (root / "flipped" / ADAPTERS_FILE).write_bytes(raw[:-5] + bytes([raw[-5] ^ 0x40]) + raw[-4:])
    (root / "truncated").mkdir()
    (root / "truncated" / ADAPTERS_FILE).write_bytes(raw[: len(raw) // 2])
    (root / "pickled").mkdir()
    (root / "pickled" / ADAPTERS_FILE).write_bytes(pickle.dumps({"qv.w": [1.0, 2.0]}))
    (root / "a_file").write_text("not a directory\n")
    (root / "outdir").mkdir()
    return {"spec": spec, "root": root, "good": good,
            "empty_target": _write_spec(root / "empty.yaml", [{**LORA, "target": ["@attn.qq"]}]),
            "no_model": _write_spec(root / "nomodel.yaml", [LORA], family=None),
            "meta": _write_spec(root / "meta.yaml", [LORA], device="meta"),
            "bad_class": _bad_class_spec(root / "badclass.yaml")}


def _bad_class_spec(path: Path) -> Path:
    data = make_spec([LORA])
    data["model"]["hf"]["class"] = "LlamaForCausalLMM"
    path.write_text(yaml.safe_dump(data))
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SWEEP = [
    ("bad spec", lambda f: ["validate", str(_text(f["root"] / "bad.yaml", "version: 1\ninputs: {a: {shape: [2]}}\n"
                                                   "adapters:\n  - {name: a, method: lora, r: 0}\n"))],
     2, "adapters.0.r (line 4)"),
    ("spec is not a mapping", lambda f: ["validate", str(_text(f["root"] / "list.yaml", "- 1\n- 2\n"))],
     2, "a spec is a mapping"),
    ("binary garbage spec", lambda f: ["validate", str(_text(f["root"] / "garbage.json", "\x00\x01{{"))],
     2, "invalid JSON"),
    ("unknown method", lambda f: ["validate", str(_text(f["root"] / "unknown.yaml", "version: 1\ninputs: "
                                                        "{a: {shape: [2]}}\nadapters:\n  - {name: a, method: nope}\n"))],
     2, "unknown method 'nope'"),
    ("missing spec file", lambda f: ["inspect", str(f["root"] / "none.yaml")], 2, "no such spec file"),
    ("unknown model class", lambda f: ["inspect", str(f["bad_class"])], 2, "has no model class 'LlamaForCausalLMM'"),
    ("empty target", lambda f: ["inspect", str(f["empty_target"])], 2, "target '@attn.qq' matches no site"),
    ("spec without model", lambda f: ["compile", str(f["no_model"]), "-o", str(f["root"] / "o1")],
     2, "the spec has no `model`"),
    ("bench without model", lambda f: ["bench", str(f["no_model"]), "--no-peft"], 2, "bench needs a spec with a `model`"),
    ("bad --dims", lambda f: ["bench", str(f["spec"]), "--dims", "seq=0"], 2, "--dims expects NAME=SIZE"),
    ("missing checkpoint", lambda f: ["export", str(f["spec"]), "--adapters", str(f["root"] / "nothing"),
                                      "-o", str(f["root"] / "m.onnx")], 2, "no adapter checkpoint at"),
    ("checkpoint of another rank", lambda f: ["export", str(f["spec"]), "--adapters", str(f["root"] / "r8"),
                                              "-o", str(f["root"] / "m.onnx")],
     2, "adapter 'qv' differs in 'r': checkpoint 8, model 4"),
    ("bit-flipped checkpoint", lambda f: ["export", str(f["spec"]), "--adapters", str(f["root"] / "flipped"),
                                          "-o", str(f["root"] / "m.onnx")], 2, "does not match the digest"),
    ("truncated checkpoint", lambda f: ["export", str(f["spec"]), "--adapters", str(f["root"] / "truncated"),
                                        "-o", str(f["root"] / "m.onnx")], 2, "not a readable safetensors file"),
    ("pickle renamed to .safetensors", lambda f: ["export", str(f["spec"]), "--adapters", str(f["root"] / "pickled"),
                                                  "-o", str(f["root"] / "m.onnx")], 2, "never loads pickle"),
    ("NaN checkpoint", lambda f: ["export", str(f["spec"]), "--adapters", str(f["root"] / "nan"),
                                  "-o", str(f["root"] / "m.onnx")], 2, "holds NaN or Inf values"),
    ("float64 checkpoint", lambda f: ["export", str(f["spec"]), "--adapters", str(f["root"] / "float64"),
                                      "-o", str(f["root"] / "m.onnx")], 2, "is torch.float64 in the checkpoint"),
    ("meta export", lambda f: ["export", str(f["meta"]), "-o", str(f["root"] / "m.onnx")], 2, "meta device"),
    ("export -o a directory", lambda f: ["export", str(f["spec"]), "-o", str(f["root"] / "outdir")],
     2, "is a directory"),
    ("compile -o under a file", lambda f: ["compile", str(f["spec"]), "-o", str(f["root"] / "a_file" / "out")],
     2, "a_file"),
    ("compile -o a file", lambda f: ["compile", str(f["spec"]), "-o", str(f["root"] / "a_file")],
     2, "exists and is not a directory"),
    ("import-peft of a non-PEFT dir", lambda f: ["import-peft", str(f["good"]), "-o", str(f["root"] / "imp")],
     2, "has no adapter_config.json"),
    # a failed --verify (exit 1): tests/test_safe_defaults.py::test_a_failed_verification_leaves_no_file
]


@pytest.mark.parametrize("argv, code, message", [case[1:] for case in SWEEP], ids=[case[0] for case in SWEEP])
def test_bad_input_exits_with_one_clear_error_and_no_traceback(files, capsys, argv, code, message):
    assert main(argv(files)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err
    assert err.startswith(f"pefc {argv(files)[0]}: error: ")


def test_failed_compile_writes_no_output(files):
    assert main(["compile", str(files["empty_target"]), "-o", str(files["root"] / "never")]) == 2
    assert not (files["root"] / "never").exists()


def test_permission_denied_on_output_is_bad_input(files, capsys, monkeypatch):
    def denied(tensors, filename, metadata=None):
        raise PermissionError(13, "Permission denied", filename)

    monkeypatch.setattr("pefc.checkpoint.save_file", denied)
    out = files["root"] / "denied"
    assert main(["compile", str(files["spec"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Permission denied" in err and str(out) in err
    assert not (out / ADAPTERS_FILE).exists()
    shutil.rmtree(out, ignore_errors=True)


def test_unexpected_exception_is_one_line_internal_error(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(pefc.cli._COMMANDS, "schema", broken)
    assert main(["schema"]) == 1
    err = capsys.readouterr().err
    assert err == "pefc schema: error: internal error: RuntimeError: boom (run with --debug for the traceback)\n"
    assert main(["--debug", "schema"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "x.yaml", "--repeats", "0"], ["demo", "--steps", "-1"],
                                  ["bench", "x.yaml", "--warmup", "two"]])
def test_malformed_options_exit_2_with_usage(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err
