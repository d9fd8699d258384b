"""CompiledModel behaviour: signature and output type, dynamic shapes, training, dropout, merge."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, build_hf, make_spec, randomize_adapters

import pefc
from pefc.spec import parse_spec

LORA = [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"], "r": 4, "alpha": 8}]


@pytest.fixture(scope="module")
def compiled():
    return pefc.compile(parse_spec(make_spec(LORA)))


def test_parameter_names_and_only_adapters_trainable(compiled):
    trainable = [n for n, p in compiled.named_parameters() if p.requires_grad]
    assert "qv.model.layers.0.self_attn.q_proj.lora_A" in trainable
    assert all(n.startswith("qv.") for n in trainable)
    assert "model.layers.0.self_attn.q_proj.weight" in dict(compiled.named_parameters())


def test_output_type_and_values_equal_the_base_model_at_init(compiled):
    base = build_hf("llama").eval()
    compiled.eval()
    inputs = batch(2, 8)
    with torch.no_grad():
        want, got = base(**inputs), compiled(**inputs)
    assert type(got) is type(want)
    assert torch.equal(want.logits, got.logits)  # B = 0 at init: the adapter is the identity


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (5, 3), (4, 40)])
def test_dynamic_batch_and_sequence(compiled, shape):
    base = build_hf("llama").eval()
    inputs = batch(*shape)
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(base(**inputs).logits, compiled(**inputs).logits, atol=1e-6)


def test_positional_call_matches_keyword_call(compiled):
    inputs = batch(2, 4)
    compiled.eval()
    with torch.no_grad():
        assert torch.equal(compiled(inputs["input_ids"], inputs["attention_mask"]).logits,
                           compiled(**inputs).logits)


def test_training_changes_only_adapter_params():
    model = pefc.compile(parse_spec(make_spec(LORA)))
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("qv.")}
    adapters = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for step in range(3):
        inputs = batch(4, 8, seed=step)
        loss = model(**inputs).logits.logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert any(not torch.equal(v, after[k]) for k, v in adapters.items())


def test_train_and_eval_switch_dropout_like_the_original():
    spec = make_spec([{"name": "lo", "method": "lora", "target": ["@attn.o"], "dropout": 0.5}], family="gpt2")
    model = pefc.compile(parse_spec(spec))
    randomize_adapters(model)
    inputs = batch(2, 6)
    model.train()
    a, b = model(**inputs).logits, model(**inputs).logits
    assert not torch.equal(a, b)  # base dropout (GPT-2 p=0.1) and LoRA dropout are active
    model.eval()
    with torch.no_grad():
        c, d = model(**inputs).logits, model(**inputs).logits
    assert torch.equal(c, d)


def test_merge_is_exact_and_restores_the_base_graph():
    model = pefc.compile(parse_spec(make_spec(LORA)))
    randomize_adapters(model)
    merged = model.merge()
    model.eval()
    merged.eval()
    inputs = batch(3, 7)
    with torch.no_grad():
        diff = (model(**inputs).logits - merged(**inputs).logits).abs().max().item()
    assert diff < 1e-5
    assert len(merged.graph.nodes) == model.pefc.base_node_count
    assert not any(n.startswith("qv.") for n, _ in merged.named_parameters())
    assert any(n.startswith("qv.") for n, _ in model.named_parameters())  # original untouched


def test_parameter_report_counts_equal_the_formula(compiled):
    report = compiled.parameter_report()
    adapter = report.adapters[0]
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads x 8), two layers, r = 4
    assert adapter.params == 2 * 4 * ((32 + 32) + (32 + 16))
    assert report.trainable_params == adapter.params
    assert adapter.mergeable is True
    assert [s.role for s in adapter.sites].count("attn.q") == 2
    data = report.to_dict()
    assert set(data) >= {"base_params", "trainable_params", "adapters"}
    assert data["adapters"][0]["sites"][0].keys() >= {"path", "role", "params"}


def test_layers_filter():
    spec = parse_spec(make_spec([{**LORA[0], "layers": [1]}]))
    sites = pefc.compile(spec).parameter_report().adapters[0].sites
    assert {s.layer for s in sites} == {1}


def test_plain_torch_model_compiles_with_role_targets():
    from test_sites_and_roles import PlainBlock

    spec = parse_spec({"version": 1, "inputs": {"tokens": {"shape": ["batch", "seq"], "high": 50}},
                       "adapters": [{"name": "a", "method": "lora", "target": ["@attn.q", "@mlp.down"]}]})
    model = pefc.compile(spec, model=PlainBlock(), example_inputs={"tokens": torch.randint(0, 50, (2, 6))})
    out = model(torch.randint(0, 50, (3, 9)))
    assert out.shape == (3, 9, 16)
    assert {s.path for s in model.parameter_report().adapters[0].sites} == {"wq", "fc2"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_moves_work_like_any_module(dtype):
    model = pefc.compile(parse_spec(make_spec(LORA)))
    randomize_adapters(model)
    reference = model.clone().eval()
    model = model.to(dtype).eval()
    assert all(p.dtype == dtype for p in model.parameters())
    inputs = batch(2, 6)
    with torch.no_grad():
        got = model(**inputs).logits
        want = reference(**inputs).logits
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float64 else 0.1  # vs a float32 reference
    assert (got.float() - want).abs().max() < tolerance
    model.float()
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.float32


def test_python_factory_model_source():
    spec = parse_spec({"version": 1, "model": {"python": "pefc.testing:TinyLM", "kwargs": {"layers": 1}},
                       "inputs": {"input_ids": {"shape": ["batch", "seq"], "high": 100},
                                  "attention_mask": {"shape": ["batch", "seq"], "low": 1, "high": 2}},
                       "adapters": [{"name": "a", "method": "lora", "target": ["@attn.v"], "init": "gaussian"}]})
    model = pefc.compile(spec, trust_code=True)
    assert [s.path for s in model.parameter_report().adapters[0].sites] == ["layers.0.v_proj"]


def test_bad_python_factory_is_a_model_source_error():
    spec = parse_spec({"version": 1, "model": {"python": "pefc.testing:NoSuchFactory"},
                       "inputs": {"x": {"shape": ["batch", 4], "dtype": "float32"}}})
    with pytest.raises(pefc.ModelSourceError, match="cannot import 'pefc.testing:NoSuchFactory'"):
        pefc.compile(spec, trust_code=True)


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on tensor values: torch.export cannot capture it
            return self.proj(x)
        return x


def test_untraceable_model_names_the_model_and_the_reason():
    spec = parse_spec({"version": 1, "inputs": {"x": {"shape": ["batch", 4], "dtype": "float32"}},
                       "adapters": [{"name": "a", "method": "lora", "target": ["proj"]}]})
    with pytest.raises(pefc.CaptureError, match="cannot capture model DataDependent with torch.export") as info:
        pefc.compile(spec, model=DataDependent(), example_inputs={"x": torch.randn(2, 4)})
    assert "data-dependent" in str(info.value).lower() or "branches on tensor values" in str(info.value)


class Misconfigured(torch.nn.Module):
    """Fails when simply called (as StableLM with its default 32 key/value heads on 4 query heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


class NumpyInside(torch.nn.Module):
    """Runs when called, but torch.export cannot trace its round trip through numpy."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.from_numpy(x.detach().numpy()).sum()


@pytest.mark.parametrize("model", [Misconfigured, NumpyInside])
def test_capture_error_says_whether_the_model_runs_without_export(model):
    spec = parse_spec({"version": 1, "inputs": {"x": {"shape": ["batch", 4], "dtype": "float32"}},
                       "adapters": [{"name": "a", "method": "lora", "target": ["proj"]}]})
    with pytest.raises(pefc.CaptureError) as info:
        pefc.compile(spec, model=model(), example_inputs={"x": torch.randn(2, 4)})
    eager = "fails without torch.export too, called on the example inputs (RuntimeError: mat1 and mat2 shapes"
    assert (eager in info.value.hint) == (model is Misconfigured), info.value.hint
