"""The six built-in methods pass the same conformance kit third-party plugins use."""

from __future__ import annotations

import pytest

from pefc.testing import CHECKS, check_method

BUILTINS = {
    "lora": {"target": ["@attn.q", "@attn.v"], "r": 4},
    "dora": {"target": ["@attn.q", "@mlp.down"], "r": 4},
    "ia3": {},
    "adapter": {"size": 8},
    "prefix": {"num_virtual_tokens": 4},
    "prompt": {"num_virtual_tokens": 4},
}


# tests/test_export_onnx.py exports every built-in method (merged and unmerged) with onnxruntime
# verification; the kit's own `onnx` check runs on the third-party example (examples/plugins/pefc-vera).
CHECKS_HERE = [check for check in CHECKS if check != "onnx"]


@pytest.mark.parametrize("method", sorted(BUILTINS))
def test_builtin_method_conforms(method, tmp_path):
    report = check_method(method, BUILTINS[method], checks=CHECKS_HERE, workdir=tmp_path)
    print(report)
    report.assert_ok()
    assert [r.name for r in report.results] == CHECKS_HERE


def test_the_kit_catches_a_wrong_formula(tmp_path, monkeypatch):
    from pefc_plugins.lora import Lora

    monkeypatch.setattr(Lora, "param_count", lambda self, config, site: 1)
    report = check_method("lora", {"target": ["@attn.q"]}, checks=["params"], workdir=tmp_path)
    assert report.failures and "formula says 2" in report.failures[0].detail
    with pytest.raises(AssertionError, match="fails the pefc plugin contract"):
        report.assert_ok()
