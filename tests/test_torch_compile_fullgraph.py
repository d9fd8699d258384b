"""``torch.compile(cm, fullgraph=True)``: no graph break for any method (the fused sites included),
train and eval, and a further batch size compiles nothing past the first dynamic recompile.

Dynamo's counters see breaks and recompiles whatever the backend; ``CompileCounter`` runs the
captured graphs eagerly, which keeps this cheap on CPU (inductor would add minutes)."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import pefc
from pefc.spec import parse_spec

SPECS = {  # the six methods (LoRA and DoRA fused at q/k/v and gate/up) and MAM (prefix + parallel adapter)
    "lora+dora+ia3+adapter+prompt": [
        {"name": "lo", "method": "lora", "target": ["@attn.q", "@attn.k", "@attn.v"], "r": 4, "dropout": 0.1},
        {"name": "do", "method": "dora", "target": ["@mlp.gate", "@mlp.up"], "r": 4, "dropout": 0.1},
        {"name": "ia", "method": "ia3"},
        {"name": "ad", "method": "adapter", "target": ["@attn.o"], "size": 8},
        {"name": "p", "method": "prompt", "num_virtual_tokens": 3}],
    "mam": [{"name": "prefix", "method": "prefix", "num_virtual_tokens": 3},
            {"name": "ffn", "method": "adapter", "target": ["@mlp.down"], "placement": "parallel", "size": 8}],
}


def _frames_after(compiled: object, counter: CompileCounter, shapes: list[tuple[int, int]], train: bool) -> list[int]:
    frames = []
    for shape in shapes:
        if train:
            compiled(**batch(*shape)).logits.square().mean().backward()
        else:
            with torch.no_grad():
                compiled(**batch(*shape))
        frames.append(counter.frame_count)
    return frames


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fullgraph_compile_has_no_break_and_recompiles_once_for_a_new_batch_size(name):
    model = pefc.compile(parse_spec(make_spec(SPECS[name])))
    randomize_adapters(model)
    assert name == "mam" or model.pefc.extras["fusion"]["groups"] == 4
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    model.train()
    assert _frames_after(compiled, counter, [(2, 5), (3, 5), (4, 5)], train=True) == [1, 2, 2]
    model.eval()
    assert _frames_after(compiled, counter, [(2, 5), (4, 5)], train=False) == [3, 3]  # dims already dynamic
    assert not counters["graph_break"], dict(counters["graph_break"])
    with torch.no_grad():  # the compiled model computes what the model does
        assert torch.allclose(compiled(**batch(2, 5)).logits, model(**batch(2, 5)).logits, atol=1e-5)
