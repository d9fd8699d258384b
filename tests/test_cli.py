"""The CLI: exit codes, one-paragraph errors without tracebacks, no partial files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pefc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def pefc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real entry point, in a fresh process (the verbs that answer without importing torch)."""
    return subprocess.run([sys.executable, "-m", "pefc.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def pefc_here(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
              *args: str) -> subprocess.CompletedProcess:
    """``pefc ARGS`` in this process (``main`` is the entry point's body): the verbs that build models."""
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["pefc", *args], code, captured.out, captured.err)


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_validate_ok():
    result = pefc("validate", "specs/llama-lora.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid (qv:lora)" in result.stdout


def test_validate_bad_spec_exits_2_with_key_paths(tmp_path):
    path = write(tmp_path, "version: 1\nmodel: {hf: {class: X}}\ninputs: {a: {shape: [2]}}\n"
                           "adapters:\n  - {name: a, method: lora, r: 0}\n  - {name: b, method: nope}\n")
    result = pefc("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "adapters.0.r (line 5)" in result.stderr
    assert "adapters.1.method (line 6): unknown method 'nope'" in result.stderr


def test_schema_is_json():
    result = pefc("schema")
    assert result.returncode == 0
    assert "LoraConfig" in json.dumps(json.loads(result.stdout))


def test_plugins_lists_distribution():
    result = pefc("plugins", "--json")
    rows = json.loads(result.stdout)
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["distribution"] == "pefc" and lora["module"] == "pefc_plugins.lora"


def test_inspect_json_contract(capsys, monkeypatch):
    result = pefc_here(capsys, monkeypatch, "inspect", "specs/llama-lora.yaml", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"base_params", "trainable_params", "adapters"} <= set(data)
    adapter = data["adapters"][0]
    assert {"name", "method", "params", "mergeable", "sites"} <= set(adapter)
    assert {"path", "role", "params"} <= set(adapter["sites"][0])
    assert data["trainable_params"] == sum(s["params"] for s in adapter["sites"])


def test_inspect_meta_prints_the_table_and_how_it_planned(capsys, monkeypatch):
    result = pefc_here(capsys, monkeypatch, "inspect", "specs/llama2-7b-lora.yaml", "--meta")
    assert result.returncode == 0, result.stderr
    assert "trainable params: 4,194,304 (0.0622% of base)" in result.stdout
    assert "model.layers.31.self_attn.v_proj" in result.stdout
    assert "captured the first layers of model.layers (32 layers) and replicated their sites" in result.stdout


def test_compile_writes_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    result = pefc_here(capsys, monkeypatch, "compile", "specs/llama-lora.yaml", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapters.safetensors", "spec.json"]


@pytest.mark.parametrize("target, message", [
    ('["@attn.qq"]', "target '@attn.qq' matches no site; roles found in this model"),
    ('["*.q_prj"]', "matches no site; nearest sites: model.layers.1.self_attn.q_proj"),
])
def test_empty_target_match_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, target, message):
    spec = (ROOT / "specs/llama-lora.yaml").read_text().replace('["@attn.q", "@attn.v"]', target)
    path = write(tmp_path, spec)
    out = tmp_path / "out"
    result = pefc_here(capsys, monkeypatch, "compile", str(path), "-o", str(out))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_debug_flag_shows_traceback(tmp_path):
    path = write(tmp_path, "version: 2\n")
    result = pefc("--debug", "validate", str(path))
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_missing_spec_file(tmp_path):
    result = pefc("inspect", str(tmp_path / "none.yaml"))
    assert result.returncode == 2
    assert "no such spec file" in result.stderr
