"""The verbs that only read specs and plugins answer without importing torch, transformers or onnx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "peft")
PROBE = f"""
import json, sys
from pefc.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)
"""


def _probe(*argv: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    return json.loads(result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["validate", "specs/mam.yaml"], ["schema"], ["plugins"],
                                  ["validate", "specs/llama2-7b-prefix.yaml"]], ids=" ".join)
def test_spec_and_plugin_verbs_import_no_torch(argv):
    assert _probe(*argv) == {"code": 0, "heavy": []}


def test_builtin_plugin_entry_modules_import_no_torch():
    """Each built-in method's entry module holds its config and method; its nn.Modules load when it compiles."""
    code = ("import json, sys; import pefc_plugins.lora, pefc_plugins.dora, pefc_plugins.ia3, pefc_plugins.adapter, "
            "pefc_plugins.prefix, pefc_plugins.prompt; print(json.dumps('torch' in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout) is False
