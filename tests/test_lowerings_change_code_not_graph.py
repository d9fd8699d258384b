"""A plugin's lowering (pefc.lowering.add_lowering) changes the code a model runs, not its graph."""

from __future__ import annotations

import torch
import torch.fx as fx
from conftest import batch, make_spec

import pefc
from pefc.lowering import add_lowering
from pefc.spec import parse_spec

CALLS: list[int] = []


def counted_silu(x: torch.Tensor) -> torch.Tensor:
    CALLS.append(1)
    return torch.nn.functional.silu(x)


def silu_counter(model: fx.GraphModule, graph: fx.Graph) -> None:
    """A third-party lowering: every ``aten.silu`` runs through :func:`counted_silu`."""
    for node in graph.nodes:
        if node.target is torch.ops.aten.silu.default:
            node.target = counted_silu


def test_a_plugin_lowering_runs_in_the_code_and_stays_with_copies():
    spec = parse_spec(make_spec([{"name": "a", "method": "lora", "target": ["@attn.q"], "r": 2}]))
    model = pefc.compile(spec).eval()
    with torch.no_grad():
        before = model(**batch(2, 6)).logits
    nodes = [(n.name, n.target) for n in model.graph.nodes]
    add_lowering(model, silu_counter)
    add_lowering(model, silu_counter)  # registered once
    assert model.pefc.lowerings.count(silu_counter) == 1
    assert [(n.name, n.target) for n in model.graph.nodes] == nodes  # the graph is as it was
    CALLS.clear()
    with torch.no_grad():
        assert torch.equal(model(**batch(2, 6)).logits, before)
    assert len(CALLS) == 2  # one MLP per layer
    CALLS.clear()
    with torch.no_grad():
        model.clone()(**batch(2, 6))
        model.merge()(**batch(2, 6))
    assert len(CALLS) == 4
