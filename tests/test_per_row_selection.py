"""Per-row adapter selection (`select`): each row equals a model compiled with its adapter alone."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import MethodsPlugin, batch, build_hf, make_method, make_spec, randomize_adapters

import pefc
from pefc.cli import main
from pefc.registry import build_registry

SELECTED = [
    {"name": "legal", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4},
    {"name": "short", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 2, "alpha": 4},  # another rank
    {"name": "med", "method": "dora", "target": ["@attn.q", "@attn.v"], "r": 2},
    {"name": "tone", "method": "ia3"},
    {"name": "bn", "method": "adapter", "size": 8, "activation": "gelu"},
    {"name": "style", "method": "prefix", "num_virtual_tokens": 3},
]
NAMES = [a["name"] for a in SELECTED]


def selecting_spec(adapters: list[dict], selected: list[str]) -> pefc.Spec:
    return pefc.parse_spec({**make_spec(adapters), "select": {"input": "adapter_ids", "adapters": selected}})


def alone(adapters: list[dict], keep: set[str], source: pefc.CompiledModel) -> pefc.CompiledModel:
    """A model compiled with ``adapters`` named in ``keep`` only (no select), ``source``'s weights."""
    model = pefc.compile(pefc.parse_spec(make_spec([a for a in adapters if a["name"] in keep])))
    state = source.adapter_state_dict()
    with torch.no_grad():
        for key, value in model.adapter_state_dict().items():
            value.copy_(state[key])
    return model


@pytest.fixture(scope="module")
def selecting() -> pefc.CompiledModel:
    model = pefc.compile(selecting_spec(SELECTED, NAMES))
    randomize_adapters(model)
    return model


@pytest.fixture(scope="module")
def references(selecting) -> dict[int, pefc.CompiledModel]:
    """Row value -> the model that row must equal (-1: the base)."""
    refs = {i: alone(SELECTED, {name}, selecting) for i, name in enumerate(NAMES)}
    refs[-1] = alone(SELECTED, set(), selecting)
    return refs


IDS = torch.tensor([0, 1, 2, 3, 4, 5, -1, 2])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_rows_equal_single_adapter_models(selecting, references, mode):
    inputs = batch(len(IDS), 6, pad=True)
    with torch.no_grad():
        got = selecting.train(mode == "train")(**inputs, adapter_ids=IDS).logits
        for row, value in enumerate(IDS.tolist()):
            want = references[value].train(mode == "train")(**inputs).logits[row]
            assert torch.allclose(got[row], want, atol=1e-5), (mode, NAMES[value] if value >= 0 else "none")
            if value >= 0:  # the adapter matters in that row: the comparison proves something
                assert (want - references[-1](**inputs).logits[row]).abs().max() > 1e-3


def test_gradients_reach_only_the_adapters_their_rows_used(selecting):
    model = selecting.train()
    model.zero_grad()
    used = {"legal", "tone", "style"}
    ids = torch.tensor([0, 3, -1, 5])
    model(**batch(4, 5), adapter_ids=ids).logits.pow(2).mean().backward()
    moved = {name.split(".", 1)[0] for name, p in model.named_parameters()
             if p.grad is not None and p.grad.abs().max() > 0}
    assert moved == used
    model.zero_grad()


def test_bad_adapter_ids_are_refused(selecting):
    inputs = batch(3, 4)
    cases = {"holds 6, out of range": torch.tensor([0, 6, -1]), "holds -2, out of range": torch.tensor([0, -2, 1]),
             "int64 [batch], got int64 [3, 1]": torch.tensor([[0], [1], [2]]),
             "int64 [batch], got int32 [3]": torch.tensor([0, 1, 2], dtype=torch.int32),
             "2 entries but the batch has 3 rows": torch.tensor([0, 1])}
    for message, ids in cases.items():
        with pytest.raises(pefc.PefcError, match=re.escape(message)):
            selecting(**inputs, adapter_ids=ids)
    with pytest.raises(TypeError, match="adapter_ids"):
        selecting(**inputs)


def test_select_naming_unknown_or_repeated_adapters_is_a_spec_error():
    with pytest.raises(pefc.SpecError, match=r"select\.adapters\.1: unknown adapter 'nope'"):
        selecting_spec(SELECTED[:1], ["legal", "nope"])
    with pytest.raises(pefc.SpecError, match="listed twice"):
        selecting_spec(SELECTED[:1], ["legal", "legal"])
    with pytest.raises(pefc.SpecError, match="already one of the spec's inputs"):
        pefc.parse_spec({**make_spec(SELECTED[:1]), "select": {"input": "input_ids", "adapters": ["legal"]}})


def test_prompt_tuning_and_third_party_methods_are_refused_by_name(tmp_path, capsys, monkeypatch):
    prompt = [{"name": "p", "method": "prompt", "num_virtual_tokens": 2}]
    with pytest.raises(pefc.SpecError, match="method 'prompt' cannot be selected per row"):
        selecting_spec(prompt, ["p"])
    registry = build_registry(extra_plugins=[("thirdparty", MethodsPlugin(make_method("thirdparty")))])
    data = {**make_spec([{"name": "t", "method": "thirdparty", "target": ["@attn.q"]}]),
            "select": {"adapters": ["t"]}}
    with pytest.raises(pefc.SpecError, match="method 'thirdparty' cannot be selected per row"):
        pefc.parse_spec(data, registry=registry)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**make_spec(SELECTED[:1]), "select": {"adapters": ["legal", "legal"]}}))
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path)]) == 2
    assert "listed twice" in capsys.readouterr().err


def test_slot_loads_from_peft_and_pefc_checkpoints_and_clears(selecting, references, tmp_path):
    peft = pytest.importorskip("peft")
    base = build_hf("llama")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    oracle = peft.get_peft_model(copy.deepcopy(base), config).eval()
    oracle.save_pretrained(tmp_path / "peft")
    model = selecting.clone().eval()
    inputs = batch(3, 5)
    ids = torch.tensor([0, 2, -1])
    before = model(**inputs, adapter_ids=ids).logits
    model.load_slot("legal", tmp_path / "peft")
    with torch.no_grad():
        got = model(**inputs, adapter_ids=ids).logits
        assert torch.allclose(got[0], oracle(**inputs).logits[0], atol=1e-5)
    assert torch.allclose(got[1:], before[1:], atol=1e-6)  # the other slots keep serving
    model.clear_slot("legal")
    with torch.no_grad():
        assert torch.allclose(model(**inputs, adapter_ids=ids).logits[0], references[-1](**inputs).logits[0],
                              atol=1e-5)
    references[0].save_adapters(tmp_path / "pefc")
    model.load_slot("legal", tmp_path / "pefc")
    with torch.no_grad():
        assert torch.allclose(model(**inputs, adapter_ids=ids).logits[0], references[0](**inputs).logits[0],
                              atol=1e-5)
    with pytest.raises(pefc.CheckpointError, match="cannot fill slot 'tone'"):
        model.load_slot("tone", tmp_path / "peft")
    with pytest.raises(pefc.CheckpointError, match="differs from slot 'short' in 'alpha'"):
        model.load_slot("short", tmp_path / "pefc")


MAM = [{"name": "prefix", "method": "prefix", "num_virtual_tokens": 2},
       {"name": "par", "method": "adapter", "placement": "parallel", "size": 8, "target": ["@mlp.down"]},
       {"name": "up", "method": "lora", "target": ["@mlp.up"], "r": 2},
       *SELECTED[:1], SELECTED[2]]


def test_always_on_mam_beside_a_selected_group_and_merge_folds_only_always_on():
    model = pefc.compile(selecting_spec(MAM, ["legal", "med"]))
    randomize_adapters(model)
    model.eval()
    always = {"prefix", "par", "up"}
    refs = {0: alone(MAM, always | {"legal"}, model), 1: alone(MAM, always | {"med"}, model),
            -1: alone(MAM, always, model)}
    inputs = batch(4, 5, pad=True)
    ids = torch.tensor([1, -1, 0, 1])
    merged = model.merge()
    assert merged.pefc.extras["merged"] == ["up"]
    with torch.no_grad():
        got, folded = model(**inputs, adapter_ids=ids).logits, merged(**inputs, adapter_ids=ids).logits
        for row, value in enumerate(ids.tolist()):
            assert torch.allclose(got[row], refs[value].eval()(**inputs).logits[row], atol=1e-5)
    assert torch.allclose(folded, got, atol=1e-5)


def test_generate_refuses_per_row_selection(selecting):
    with pytest.raises(pefc.PefcError, match="generate does not take per-row adapter_ids"):
        selecting.generate(batch(1, 3)["input_ids"], max_new_tokens=1)


def test_selection_bench_compares_peft_mixed_batch_and_separate_forwards():
    from pefc.selbench import run_selection_bench

    pytest.importorskip("peft")
    lora = [{"name": n, "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 2} for n in ("a", "b")]
    report = run_selection_bench(selecting_spec(lora, ["a", "b"]), repeats=1, warmup=0,
                                 dims={"batch": 4, "seq": 6})
    assert set(report.forward) == {"selecting", "separate", "peft mixed", "selecting one", "single"}
    assert set(report.ratios) == {"selecting/separate", "selecting/peft mixed", "selecting one/single"}
    assert report.peft["max_abs_diff"] < 1e-5  # HF PEFT's mixed batch computes what pefc computes
    assert "selecting/peft mixed" in report.table()
