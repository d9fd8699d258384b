"""Example inputs as users pass them (slices, non-contiguous views, batch 1, sequence 1) give
models that run at every size of their dynamic dims; a dim the model fixes is named with its line."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, build_hf, make_spec
from torch import nn

import pefc
from pefc.spec import parse_spec

SPEC = parse_spec(make_spec([{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 2}], family=None))
BIG = batch(4, 12, seed=1)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return build_hf("llama").eval()


EXAMPLES = {
    "slice": {"input_ids": BIG["input_ids"][:2, :8], "attention_mask": BIG["attention_mask"][:2, :8]},
    "non-contiguous": {"input_ids": BIG["input_ids"].t().contiguous().t()[:3, 2:9],
                       "attention_mask": BIG["attention_mask"].t()[2:9, :3].t()},
    "batch 1": {"input_ids": BIG["input_ids"][:1], "attention_mask": BIG["attention_mask"][:1]},
    "sequence 1": {"input_ids": BIG["input_ids"][:, :1], "attention_mask": BIG["attention_mask"][:, :1]},
}


@pytest.mark.parametrize("case", list(EXAMPLES))
def test_compiled_model_runs_at_batch_1_and_7_and_other_lengths(case, llama):
    """(A fresh LoRA is the identity: the compiled model computes what the base model computes.)"""
    example = EXAMPLES[case]
    before = {k: v.clone() for k, v in example.items()}
    model = pefc.compile(SPEC, model=llama, example_inputs=example).eval()
    for shape in [(1, 1), (7, 3), (1, 10), (7, 1)]:
        inputs = batch(*shape, seed=shape[0] + shape[1], pad=True)
        with torch.no_grad():
            got, want = model(**inputs).logits, llama(**inputs).logits
        assert got.shape == (*shape, 100)
        assert (got - want).abs().max().item() <= 1e-5
    assert all(torch.equal(example[k], before[k]) for k in example)  # the user's tensors are left alone


class FixesBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.ones(3, 4)  # pins dim 0 of x to 3


def test_a_dim_the_model_fixes_is_named_with_the_line_that_fixes_it():
    spec = parse_spec({"version": 1, "inputs": {"x": {"shape": ["batch", 4], "dtype": "float32"}},
                       "adapters": [{"name": "l", "method": "lora", "target": ["proj"]}]})
    with pytest.raises(pefc.CaptureError) as info:
        pefc.compile(spec, model=FixesBatch(), example_inputs={"x": torch.randn(3, 4)})
    hint = info.value.hint
    assert "dim 0 of input 'x' was fixed to 3 by test_example_inputs.py:" in hint
    assert "in forward: `return self.proj(x) + torch.ones(3, 4)" in hint
