"""Small frictions gone: Ctrl-C prints one line, --debug goes after the verb, all roles are listed."""

from __future__ import annotations

import json

import pytest
from conftest import make_spec

from pefc import cli


def test_ctrl_c_while_starting_up_prints_one_line(monkeypatch, capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt  # as if Ctrl-C landed while the parser (and its imports) were being set up

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["validate", "spec.yaml"]) == 130
    assert capsys.readouterr().err == "pefc: interrupted\n"


@pytest.mark.parametrize("argv", [["--debug", "validate", "missing.yaml"], ["validate", "missing.yaml", "--debug"]])
def test_debug_is_accepted_before_and_after_the_verb(tmp_path, capsys, argv):
    assert cli.main([str(tmp_path / a) if a.endswith(".yaml") else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "no such spec file" in err


def test_without_debug_after_the_verb_there_is_no_traceback(tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_role_the_model_lacks_lists_every_role_found(tmp_path, capsys):
    roles = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}  # Llama's linear roles
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(make_spec([{"name": "a", "method": "lora", "target": ["@attn.qq"]}])))
    assert cli.main(["inspect", str(path), "--meta"]) == 2
    err = capsys.readouterr().err
    listed = err.split("roles found in this model: ")[1].split(" (did you mean")[0].strip().split(", ")
    assert {r.lstrip("@") for r in listed} == roles
    assert "(did you mean @attn.q?)" in err
