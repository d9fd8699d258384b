"""save_merged / `pefc export-hf`: a transformers save_pretrained directory with the folded weights."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters

import pefc
from pefc.cli import main
from pefc.spec import parse_spec

transformers = pytest.importorskip("transformers")

LORA_IA3 = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4},
            {"name": "scale", "method": "ia3"}]


def test_from_pretrained_loads_the_merged_logits(tmp_path):
    model = pefc.compile(parse_spec(make_spec(LORA_IA3, "llama"))).eval()
    randomize_adapters(model, scale=0.3)
    out = model.save_merged(tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = batch(2, 6, pad=True)
    with torch.no_grad():
        want = model.merge()(**inputs).logits
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert loaded.generation_config.eos_token_id == 2


def test_export_hf_refuses_methods_that_cannot_merge(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(make_spec([{"name": "pre", "method": "prefix", "num_virtual_tokens": 2}],
                                             "gpt2")))
    assert main(["export-hf", str(spec), "-o", str(tmp_path / "hf")]) == 2
    assert "cannot merge adapter 'pre' (prefix)" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
