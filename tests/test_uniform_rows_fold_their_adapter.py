"""A selecting model's batch whose rows all run one LoRA adapter folds it into the frozen products
(``pefc.uniform_rows``): the same outputs as the row-wise code; mixed batches, training with
dropout and rows of no adapter keep the row-wise code; the graph is unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_spec, randomize_adapters

import pefc
from pefc import fused_linear, uniform_rows

ADAPTERS = [{"name": name, "method": "lora", "target": ["@attn.q", "@attn.v", "@mlp.down"], "r": r, "dropout": 0.1}
            for name, r in (("a", 4), ("b", 2))]
LOWERED = 3 * 2


@pytest.fixture(scope="module")
def models() -> tuple[pefc.CompiledModel, pefc.CompiledModel]:
    """(row-wise, lowered): one selecting model, and its clone without the lowerings."""
    spec = pefc.parse_spec({**make_spec(ADAPTERS), "select": {"input": "adapter_ids", "adapters": ["a", "b"]}})
    lowered = pefc.compile(spec)
    randomize_adapters(lowered, scale=0.3)
    plain = lowered.clone()
    plain.pefc.lowerings.clear()
    plain.recompile()
    return plain, lowered


class _Taken:
    """Counts the batches ``uniform_rows_linear`` folds or adds as one update, and the row-wise calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folded = 0
        self.rows = 0
        folded_weight = fused_linear.folded_weight

        def counted_fold(*args: object) -> torch.Tensor:
            self.folded += 1
            return folded_weight(*args)
        monkeypatch.setattr(fused_linear, "folded_weight", counted_fold)
        self._linear = uniform_rows.frozen_linear

        def counted_rows(*args: object) -> torch.Tensor:
            self.rows += 1
            return self._linear(*args)
        monkeypatch.setattr(uniform_rows, "frozen_linear", counted_rows)


def _logits(model: pefc.CompiledModel, ids: list[int], seq: int) -> torch.Tensor:
    inputs = {**batch(len(ids), seq), "adapter_ids": torch.tensor(ids)}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("ids", "seq", "folded", "rows"), [
    ([1, 1, 1], 16, LOWERED - 2, 0),  # 48 rows: q and v fold (32 features), down does not (64)
    ([0, 0], 6, 0, 0),  # 12 rows: the update added to the base product, nothing gathered
    ([0, 1, 0], 16, 0, LOWERED),  # a mixed batch: row-wise
    ([-1, -1], 6, 0, LOWERED),  # rows of no adapter: row-wise (its zero entry)
])
def test_a_batch_on_one_adapter_matches_the_row_wise_code(models, ids, seq, folded, rows, monkeypatch):
    plain, lowered = models
    plain.eval(), lowered.eval()
    assert lowered.code.count("uniform_rows_linear(") == LOWERED and "uniform_rows_linear" not in plain.code
    assert not any(node.target is uniform_rows.uniform_rows_linear for node in lowered.graph.nodes)
    taken = _Taken(monkeypatch)
    out = _logits(lowered, ids, seq)
    assert (taken.folded, taken.rows) == (folded, rows)
    assert (out - _logits(plain, ids, seq)).abs().max().item() < 1e-5


def test_training_keeps_the_row_wise_code(models, monkeypatch):
    """Dropout draws per row and the adapters need gradients: no fold, the same gradients."""
    plain, lowered = models
    inputs = {**batch(2, 16), "adapter_ids": torch.tensor([1, 1])}
    grads = []
    for model in (plain, lowered):
        model.train()
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    taken = _Taken(monkeypatch)
    torch.manual_seed(0)
    lowered(**inputs)
    assert (taken.folded, taken.rows) == (0, LOWERED)
    assert grads[0].keys() == grads[1].keys() and any("b." in name for name in grads[0])
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name
