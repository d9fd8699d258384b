"""`pefc.plan` (``pefc inspect --meta``) gives the report of a full capture, from one replicated layer."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MethodsPlugin, make_method, make_spec
from torch import nn

import pefc
from pefc.registry import build_registry
from pefc.spec import parse_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"

LORA_QV = {"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4}
# one depth per family: every case of a family compiles from one cached full capture
CASES: dict[str, tuple[str, int, list[dict[str, Any]]]] = {
    "llama-lora": ("llama", 4, [LORA_QV]),
    "llama-lora-patterns-and-layers": ("llama", 4, [{
        "name": "all", "method": "lora", "target": ["@attn", "@mlp"], "r": 4, "layers": [1, 3],
        "rank_pattern": {"@attn.v": 2, "*.layers.3.mlp.down_proj": 6}, "alpha_pattern": {"@mlp.up": 3.0}}]),
    "llama-lora-path-globs": ("llama", 4, [{"name": "g", "method": "lora", "r": 2,
                                            "target": ["model.layers.2.*_proj", "lm_head"]}]),
    "llama-dora": ("llama", 4, [{"name": "d", "method": "dora", "target": ["@attn.q", "@mlp.down"], "r": 4}]),
    "llama-ia3": ("llama", 4, [{"name": "i", "method": "ia3", "target": ["@attn.k", "@attn.v", "@mlp.down"]}]),
    "llama-adapters": ("llama", 4, [{"name": "h", "method": "adapter", "preset": "houlsby", "size": 8},
                                    {"name": "p", "method": "adapter", "target": ["@mlp.down"],
                                     "placement": "parallel", "size": 4}]),
    "llama-prefix": ("llama", 4, [{"name": "p", "method": "prefix", "num_virtual_tokens": 5, "layers": [0, 2]}]),
    "llama-prefix-projection": ("llama", 4, [{"name": "p", "method": "prefix", "num_virtual_tokens": 4,
                                              "projection": {"hidden": 16}}]),
    "llama-prompt": ("llama", 4, [{"name": "t", "method": "prompt", "num_virtual_tokens": 6}]),
    "llama-mam": ("llama", 4, [{"name": "p", "method": "prefix", "num_virtual_tokens": 4},
                               {"name": "f", "method": "adapter", "target": ["@mlp.down"], "placement": "parallel",
                                "size": 8}]),
    "llama-vera": ("llama", 4, [{"name": "v", "method": "vera", "target": ["@attn.q", "@attn.v"], "r": 16}]),
    "gpt2-lora-ia3": ("gpt2", 3, [{"name": "l", "method": "lora", "target": ["@attn.qkv", "@attn.o"], "r": 4},
                                  {"name": "i", "method": "ia3", "target": ["@attn.qkv", "@mlp.down"]}]),
    "gpt2-prefix": ("gpt2", 3, [{"name": "p", "method": "prefix", "num_virtual_tokens": 3}]),
    "bert-lora-adapter": ("bert", 3, [LORA_QV, {"name": "a", "method": "adapter", "preset": "pfeiffer", "size": 8}]),
    "qwen2-lora": ("qwen2", 3, [{"name": "l", "method": "lora", "target": ["@attn"], "r": 2}]),
}
LAYER_KEY = {"gpt2": "n_layer"}


def _spec(family: str, layers: int, adapters: list[dict[str, Any]]) -> pefc.Spec:
    data = make_spec(copy.deepcopy(adapters), family)
    data["model"]["hf"]["config"][LAYER_KEY.get(family, "num_hidden_layers")] = layers
    return parse_spec(data)


def _without_plan(report: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in report.items() if key != "plan"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_equals_the_report_of_a_full_capture(case):
    spec = _spec(*CASES[case])
    plan = pefc.plan(spec)
    assert plan.strategy == "replicated", plan.reason
    assert _without_plan(plan.to_dict()) == pefc.compile(spec).parameter_report().to_dict()


def test_plan_sites_equal_a_full_capture_on_every_attribute_but_the_node():
    spec = _spec("llama", 4, [LORA_QV])
    planned = pefc.plan(spec).sites
    full = pefc.plan(spec, replicate=False)
    assert full.strategy == "full"
    assert [_site_fields(s) for s in planned] == [_site_fields(s) for s in full.sites]
    assert len({s.layer for s in planned if s.layer is not None}) == 4


def _site_fields(site: pefc.Site) -> dict[str, Any]:
    """Every attribute but the graph's nodes (an attention's record keeps its form, axes and heads)."""
    from pefc.planner import _graph_free

    return {k: _graph_free(v) for k, v in vars(site).items() if not isinstance(v, torch.fx.Node)}


def test_plan_names_the_stack_it_replicated_and_allocates_nothing():
    spec = _spec("llama", 5, [LORA_QV])
    plan = pefc.plan(spec)
    assert plan.stacks == {"model.layers": 5}
    assert plan.to_dict()["plan"]["strategy"] == "replicated"
    assert all(s.node.graph is plan.sites[0].node.graph for s in plan.sites)  # one (cut) graph


def test_a_target_that_matches_nothing_fails_as_in_compile():
    spec = _spec("llama", 4, [{**LORA_QV, "layers": [7]}])
    with pytest.raises(pefc.TargetError) as planned:
        pefc.plan(spec)
    with pytest.raises(pefc.TargetError) as compiled:
        pefc.compile(spec)
    assert str(planned.value) == str(compiled.value)
    assert "matches layers [0, 1, 2, 3]" in str(planned.value)


def test_a_model_of_two_layers_is_captured_whole():
    spec = _spec("llama", 2, [LORA_QV])
    plan = pefc.plan(spec)
    assert (plan.strategy, plan.reason) == ("full", "the model has no stack of identical layers")
    assert plan.to_dict()["trainable_params"] == pefc.compile(spec).parameter_report().trainable_params


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix, self.last = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, is_last: bool) -> torch.Tensor:
        x = x + self.mix(x)
        return self.last(x) if is_last else x


class Stack(nn.Module):
    """Layers with the same parameters; ``last_differs``: only the last one calls ``last``;
    ``reverse``: the layers run from the last to the first."""

    def __init__(self, widths: list[int] | None = None, last_differs: bool = False, reverse: bool = False) -> None:
        super().__init__()
        widths = widths or [8] * 4
        self.inp = nn.Linear(8, widths[0])
        self.layers = nn.ModuleList(_Block(w) for w in widths)
        self.last_differs, self.reverse = last_differs, reverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        order = list(self.layers)[::-1] if self.reverse else list(self.layers)
        for i, layer in enumerate(order):
            x = layer(x[..., :layer.mix.in_features], self.last_differs and i == len(order) - 1)
        return x


def _python_spec(**kwargs: Any) -> pefc.Spec:
    return parse_spec({"version": 1, "model": {"python": "test_planning:Stack", "kwargs": kwargs},
                       "inputs": {"x": {"shape": ["batch", 8], "dtype": "float32"}},
                       "adapters": [{"name": "l", "method": "lora", "r": 2,
                                     "target": ["inp", "*.mix", *(["*.last"] if kwargs.get("last_differs") else [])]}]},
                      trust_code=True)  # the factory is this test module's


def test_a_plain_torch_stack_is_replicated():
    spec = _python_spec()
    plan = pefc.plan(spec)
    assert (plan.strategy, plan.stacks) == ("replicated", {"layers": 4})
    assert _without_plan(plan.to_dict()) == pefc.compile(spec).parameter_report().to_dict()


@pytest.mark.parametrize("kwargs, reason", [
    ({"last_differs": True}, "layers 0 and 1 of layers show different sites"),
    ({"reverse": True}, "the layers of layers do not run one after the other, in order"),
    ({"widths": [8, 8, 4]}, "the model has no stack of identical layers")])
def test_a_stack_that_cannot_be_replicated_is_captured_whole(kwargs, reason):
    spec = _python_spec(**kwargs)
    plan = pefc.plan(spec)
    assert (plan.strategy, plan.reason) == ("full", reason)
    assert _without_plan(plan.to_dict()) == pefc.compile(spec).parameter_report().to_dict()
    full = pefc.plan(spec, replicate=False)
    assert [_site_fields(s) for s in plan.sites] == [_site_fields(s) for s in full.sites]


def test_a_last_layer_with_other_sites_is_reported_as_it_is():
    report = pefc.plan(_python_spec(last_differs=True)).to_dict()
    paths = [s["path"] for s in report["adapters"][0]["sites"]]
    assert paths == ["inp", "layers.0.mix", "layers.1.mix", "layers.2.mix", "layers.3.mix", "layers.3.last"]


class _Scale(pefc.SiteModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(width))

    def forward(self, x, y):
        return y * self.g


def _scale_every_output(self, ctx, config, sites):
    for site in sites:
        ctx.wrap_output(site, _Scale(site.out_features))


def test_a_method_without_a_formula_is_planned_by_a_full_capture():
    method = make_method("noformula", rewrite=_scale_every_output)
    registry = build_registry(extra_plugins=[("noformula", MethodsPlugin(method))])
    spec = parse_spec(make_spec([{"name": "n", "method": "noformula", "target": ["@attn.q"]}]), registry=registry)
    data = spec.model_dump(by_alias=True)
    data["model"]["hf"]["config"]["num_hidden_layers"] = 3
    spec = parse_spec(data, registry=registry)
    plan = pefc.plan(spec, registry=registry)
    assert plan.strategy == "full"
    assert plan.reason == "method 'noformula' gives no parameter formula (param_count)"
    assert plan.report.trainable_params == 3 * 32


def test_plan_of_a_7b_wide_stack_equals_the_full_meta_capture():
    """Llama-2-7B's widths with 11 of its 32 layers (a two-digit layer index included): the full
    meta capture of all 32 takes 25 s; the plan's replication does not depend on the count."""
    spec = pefc.load_spec(SPECS / "llama2-7b-ia3.yaml")
    config = {**spec.model.hf.config, "num_hidden_layers": 11}
    spec = spec.model_copy(update={"model": spec.model.model_copy(
        update={"hf": spec.model.hf.model_copy(update={"config": config})})})
    plan = pefc.plan(spec)
    assert plan.strategy == "replicated" and plan.stacks == {"model.layers": 11}
    full = pefc.compile(spec, device="meta").parameter_report().to_dict()
    assert _without_plan(plan.to_dict()) == full
    assert full["trainable_params"] == 11 * (4096 + 4096 + 11008)  # k, v and the down projection's input


_PEAK_RSS = ("import resource, sys; from pefc.cli import main; code = main(sys.argv[1:]); "
             "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
             "sys.exit(code)")


def test_inspect_meta_plans_70b_in_one_process_under_1_5_gb():
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, "inspect", str(SPECS / "llama2-70b-lora.yaml"),
                             "--meta", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["trainable_params"] == 80 * 8 * ((8192 + 8192) + (8192 + 1024))  # 16,384,000
    assert report["base_params"] == 68_976_648_192
    assert report["plan"]["strategy"] == "replicated" and report["plan"]["stacks"] == {"model.layers": 80}
    peak_kib = int(result.stderr.split("peak_kib")[-1].split()[0])
    assert peak_kib < 1.5 * 1024 * 1024


def test_a_spec_without_a_model_cannot_be_planned():
    with pytest.raises(pefc.SpecError, match="the spec has no model to plan"):
        pefc.plan(parse_spec(make_spec([LORA_QV], family=None)))
