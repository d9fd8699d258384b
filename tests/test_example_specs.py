"""Every example spec compiles; the 7B specs plan on the meta device with the papers' counts."""

from __future__ import annotations

from pathlib import Path

import pytest

import pefc

SPECS = Path(__file__).resolve().parents[1] / "specs"
SMALL = sorted(p for p in SPECS.rglob("*.yaml") if "7b" not in p.name and "70b" not in p.name
               and p.name != "qlora.yaml")  # bench/qlora.yaml: hidden 1024, 8 layers (pefc bench --quantized)

# Llama-2-7B: 32 layers, d = 4096, d_ff = 11008; 70B: 80 layers, d = 8192, 8 kv heads of 128.
PAPER_COUNTS = {
    "llama2-7b-lora.yaml": 32 * 2 * 8 * (4096 + 4096),                    # 4,194,304
    "llama2-7b-dora.yaml": 32 * 2 * (8 * (4096 + 4096) + 4096),           # 4,456,448
    "llama2-7b-ia3.yaml": 32 * (4096 + 4096 + 11008),                     # 614,400
    "llama2-7b-adapter.yaml": 64 * (2 * 4096 * 256 + 256 + 4096),        # 134,496,256
    "llama2-7b-prefix.yaml": 32 * 30 * 2 * 4096,                          # 7,864,320
    "llama2-7b-prompt.yaml": 100 * 4096,                                  # 409,600
}
# specs/llama2-70b-lora.yaml (80 x 8 x ((8192 + 8192) + (8192 + 1024)) = 16,384,000): tests/test_planning.py.


def test_one_example_spec_per_method_and_mam():
    names = {p.name for p in SMALL}
    assert {f"llama-{m}.yaml" for m in ("lora", "dora", "ia3", "adapter", "prefix", "prompt")} <= names
    assert "mam.yaml" in names


@pytest.mark.parametrize("path", SMALL, ids=lambda p: str(p.relative_to(SPECS)))
def test_example_spec_compiles(path):
    model = pefc.compile(pefc.load_spec(path))
    report = model.parameter_report()
    assert report.trainable_params > 0
    for adapter in report.adapters:
        assert adapter.params == adapter.formula_params


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_large_spec_plans_on_meta_with_the_paper_count(name):
    plan = pefc.plan(pefc.load_spec(SPECS / name))
    assert plan.strategy == "replicated", plan.reason
    report = plan.parameter_report()
    assert report.trainable_params == PAPER_COUNTS[name]
    assert sorted({s.layer for s in report.adapters[0].sites}) in ([None], list(range(32)))
    assert report.adapters[0].formula_params == PAPER_COUNTS[name]


@pytest.mark.parametrize("name, key", [("llama-prefix.yaml", "extra_attention_length"),
                                       ("llama-prompt.yaml", "context_tokens_used")])
def test_inspect_reports_attention_length_and_context_used(name, key):
    spec = pefc.load_spec(SPECS / name)
    adapter = pefc.compile(spec).parameter_report().to_dict()["adapters"][0]
    assert adapter[key] == spec.adapters[0].num_virtual_tokens
