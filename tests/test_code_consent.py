"""A spec runs no code unless the user says so: `model.python` (import and call) needs consent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pefc
from pefc.cli import main

SIDE_EFFECT = "pefc_test_import_side_effect"  # a module whose import writes IMPORTED
FACTORY = "pefc_test_user_factory"  # the user's own factory, next to the spec

FACTORIES = {
    "subprocess": {"python": "subprocess:run", "kwargs": {"args": ["touch", "PWNED"]}},
    "os": {"python": "os:system", "kwargs": {"command": "touch PWNED"}},
    "import": {"python": f"{SIDE_EFFECT}:make"},
}
TAIL = {"inputs": {"x": {"shape": ["batch", 4], "dtype": "float32"}},
        "adapters": [{"name": "l", "method": "lora", "target": ["lin"], "r": 2}]}
FACTORY_SOURCE = """
import torch

class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x)

def make(width=4):
    return Net(width)
"""


def _write_spec(folder: Path, model: dict, name: str = "spec.json") -> Path:
    path = folder / name
    path.write_text(json.dumps({"version": 1, "model": model, **TAIL}))
    return path


def _peft_dir(folder: Path) -> Path:
    """A LoRA checkpoint for the factory's `lin` (import-peft reads it before building the base)."""
    peft = folder / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"], "lora_dropout": 0.0}))
    save_file({"base_model.model.lin.lora_A.weight": torch.randn(2, 4),
               "base_model.model.lin.lora_B.weight": torch.randn(4, 2)}, str(peft / "adapter_model.safetensors"))
    return peft


def _verbs(spec: Path, folder: Path) -> dict[str, list[str]]:
    """Every CLI verb that builds the spec's model."""
    out = folder / "out"
    return {"inspect": ["inspect", str(spec)], "inspect --meta": ["inspect", str(spec), "--meta"],
            "compile": ["compile", str(spec), "-o", str(out)],
            "export": ["export", str(spec), "-o", str(out / "m.onnx")],
            "export-adapter": ["export-adapter", str(spec), "--adapters", str(out), "-o", str(out / "a.onnx_adapter")],
            "export-peft": ["export-peft", str(spec), "--adapters", str(out), "-o", str(out / "peft")],
            "bench": ["bench", str(spec), "--no-peft", "--repeats", "1", "--warmup", "0"],
            "import-peft": ["import-peft", str(_peft_dir(folder)), "--model-spec", str(spec), "-o", str(out)]}


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    """A working directory holding the side-effect module; PWNED / IMPORTED would land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFC_TRUST_CODE", raising=False)
    (tmp_path / f"{SIDE_EFFECT}.py").write_text(
        f"open({str(tmp_path / 'IMPORTED')!r}, 'w').write('imported')\n" + FACTORY_SOURCE)
    (tmp_path / f"{FACTORY}.py").write_text(FACTORY_SOURCE)
    yield tmp_path
    for name in (SIDE_EFFECT, FACTORY):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize("verb", ["inspect", "inspect --meta", "compile", "export", "export-adapter",
                                  "export-peft", "bench", "import-peft"])
def test_no_verb_runs_a_spec_factory_without_consent(folder, capsys, verb, factory):
    spec = _write_spec(folder, FACTORIES[factory])
    assert main(_verbs(spec, folder)[verb]) == 2
    err = capsys.readouterr().err
    assert FACTORIES[factory]["python"] in err and "--trust-code" in err and "PEFC_TRUST_CODE=1" in err
    assert "nothing was imported" in err
    assert not (folder / "PWNED").exists() and not (folder / "IMPORTED").exists()
    assert SIDE_EFFECT not in sys.modules
    assert not (folder / "out").exists()


def test_validate_says_the_spec_would_run_code_and_runs_none(folder, capsys):
    spec = _write_spec(folder, FACTORIES["import"])
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and f"imports and calls '{SIDE_EFFECT}:make'" in out and "--trust-code" in out
    assert SIDE_EFFECT not in sys.modules and not (folder / "IMPORTED").exists()


def test_the_python_api_refuses_without_consent(folder):
    spec = pefc.load_spec(_write_spec(folder, FACTORIES["subprocess"]))
    for call in (pefc.compile, pefc.plan):
        with pytest.raises(pefc.ModelSourceError, match="subprocess:run.*nothing was imported"):
            call(spec)
    assert not (folder / "PWNED").exists()


def test_with_consent_the_users_factory_next_to_the_spec_works(folder, tmp_path_factory, capsys, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)  # the factory module is found beside the spec, not in the working directory
    spec = _write_spec(folder, {"python": f"{FACTORY}:make", "kwargs": {"width": 4}})
    assert main(["inspect", str(spec), "--trust-code", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["path"] for s in report["adapters"][0]["sites"]] == ["lin"]
    assert main(["compile", str(spec), "-o", str(elsewhere / "out"), "--trust-code"]) == 0
    assert (elsewhere / "out" / "adapters.safetensors").is_file()
    assert main(["import-peft", str(_peft_dir(elsewhere)), "--model-spec", str(spec), "-o",
                 str(elsewhere / "imported"), "--trust-code"]) == 0
    assert (elsewhere / "imported" / "spec.yaml").is_file()


def test_consent_by_keyword_or_environment(folder, monkeypatch):
    path = _write_spec(folder, {"python": f"{FACTORY}:make"})
    assert pefc.plan(pefc.load_spec(path), trust_code=True).report.trainable_params == 16
    assert pefc.compile(pefc.load_spec(path, trust_code=True)).parameter_report().trainable_params == 16
    monkeypatch.setenv("PEFC_TRUST_CODE", "1")
    assert pefc.compile(pefc.load_spec(path)).parameter_report().trainable_params == 16


def test_a_model_passed_in_needs_no_consent(folder):
    spec = pefc.load_spec(_write_spec(folder, FACTORIES["subprocess"]))
    namespace: dict = {}
    exec(FACTORY_SOURCE, namespace)  # the user's own module, built by the user
    model = pefc.compile(spec, model=namespace["make"](), example_inputs={"x": torch.randn(2, 4)})
    assert model.parameter_report().trainable_params == 16
    assert not (folder / "PWNED").exists()


def test_a_pretrained_directory_asking_for_remote_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (tmp_path / "modeling_evil.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w')\n")
    data = {"version": 1, "model": {"hf": {"pretrained": str(tmp_path)}}, "inputs": TAIL["inputs"]}
    with pytest.raises(pefc.SpecError, match="asks for remote code.*trust_remote_code off"):
        pefc.parse_spec(data)  # validate says so too
    from pefc.source import build_model
    from pefc.spec import ModelSpec

    with pytest.raises(pefc.ModelSourceError, match=r"auto_map: AutoModelForCausalLM -> modeling_evil"):
        build_model(ModelSpec.model_validate(data["model"]))
    assert not (tmp_path / "RAN").exists()

