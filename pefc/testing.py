"""Conformance kit for method plugins.

Run it from a plugin's own tests::

    from pefc.testing import check_method

    def test_vera_conforms(tmp_path):
        check_method("vera", {"r": 16}, workdir=tmp_path).assert_ok()

It compiles a small model with one adapter of the method and checks the plugin contract:

- ``schema``: the config validates and its method appears in ``pefc schema``;
- ``params``: only the adapter's parameters are trainable, named ``<adapter>.<site>...``,
  and their count equals the plugin's formula (``param_count`` + ``shared_param_count``);
- ``identity``: a fresh adapter leaves outputs unchanged (if ``identity_at_init``);
- ``training``: a few optimizer steps change adapter parameters and leave base weights bit-identical;
- ``roundtrip``: save_adapters / load_adapters into a freshly compiled model is exact;
- ``merge``: for mergeable methods, merged == unmerged and the merged graph has the base graph's nodes;
- ``onnx``: the ONNX export (merged where mergeable) agrees with torch in onnxruntime on fresh shapes.

The model is a tiny Llama built from a config when transformers is installed, or a small
plain-torch causal LM (:class:`TinyLM`) otherwise, or the spec you pass.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

CHECKS = ("schema", "params", "identity", "training", "roundtrip", "merge", "onnx")

TINY_LLAMA = {"class": "LlamaForCausalLM",
              "config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}
TOKEN_INPUTS = {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": 100},
                "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2}}


class TinyLM(nn.Module):
    """A two-block causal LM in plain torch (used when transformers is not installed)."""

    def __init__(self, vocab: int = 100, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_TinyBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        seq = input_ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=h.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            h = layer(h, mask, self.heads)
        return self.head(h)


class _TinyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, d = h.shape
        x = self.norm1(h)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, heads, d // heads).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                                       split(self.v_proj(x)), attn_mask=mask)
        h = h + self.o_proj(a.transpose(1, 2).reshape(b, s, d))
        return h + self.down(nn.functional.gelu(self.up(self.norm2(h))))


def tiny_model_spec() -> dict[str, Any]:
    """Model and inputs of the default conformance model."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"model": {"python": "pefc.testing:TinyLM"}, "inputs": copy.deepcopy(TOKEN_INPUTS)}
    return {"model": {"hf": copy.deepcopy(TINY_LLAMA)}, "inputs": copy.deepcopy(TOKEN_INPUTS)}


@dataclass
class CheckResult:
    name: str
    passed: bool | None  # None: not applicable
    detail: str


@dataclass
class ConformanceReport:
    method: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed is False]

    def assert_ok(self) -> None:
        if self.failures:
            lines = [f"  {r.name}: {r.detail}" for r in self.failures]
            raise AssertionError(f"method {self.method!r} fails the pefc plugin contract:\n" + "\n".join(lines))

    def __str__(self) -> str:
        marks = {True: "ok  ", False: "FAIL", None: "n/a "}
        return "\n".join(f"{marks[r.passed]} {r.name:<10} {r.detail}" for r in self.results)


def check_method(method: str, config: dict[str, Any] | None = None, *, spec: dict[str, Any] | None = None,
                 checks: Iterable[str] = CHECKS, workdir: str | Path | None = None,
                 atol: float = 1e-5, trust_code: bool = False) -> ConformanceReport:
    """Run the conformance checks on ``method`` with adapter keys ``config``.

    ``spec`` (a spec dict without ``adapters``) replaces the default tiny model; ``trust_code=True``
    consents to build its ``model.python`` (the default model, pefc's own, needs no consent).
    """
    import pefc

    adapter = {"name": "under_test", "method": method, **(config or {})}
    data = {"version": 1, **(copy.deepcopy(spec) if spec else tiny_model_spec()), "adapters": [adapter]}
    report = ConformanceReport(method)
    with tempfile.TemporaryDirectory() as tmp:
        context = _Context(pefc, data, Path(workdir) if workdir else Path(tmp), atol, trust_code or spec is None)
        for name in checks:
            report.results.append(context.run(name))
    return report


class _Context:
    """State shared by the checks: the parsed spec, a compiled model and reference inputs."""

    def __init__(self, pefc: Any, data: dict[str, Any], workdir: Path, atol: float, trust_code: bool) -> None:
        self.pefc = pefc
        self.data = data
        self.workdir = workdir
        self.atol = atol
        self.spec = pefc.parse_spec(data, source="conformance spec", trust_code=trust_code)
        self.method = pefc.registry.default_registry().method(self.spec.adapters[0].method)
        self.name = self.spec.adapters[0].name

    def run(self, name: str) -> CheckResult:
        check: Callable[[], tuple[bool | None, str]] = getattr(self, f"check_{name}")
        try:
            passed, detail = check()
        except Exception as exc:  # a crash is a failed check, reported with its cause
            passed, detail = False, f"raised {type(exc).__name__}: {exc}"
        return CheckResult(name, passed, detail)

    # -- helpers ---------------------------------------------------------------------------------

    def compile(self, adapters: bool = True) -> Any:
        spec = self.spec if adapters else self.spec.model_copy(update={"adapters": []})
        return self.pefc.compile(spec)

    def inputs(self, seed: int = 5) -> dict[str, torch.Tensor]:
        from pefc.source import example_inputs

        sizes = {name: size + 2 for name, size in self.spec.dims().items()}
        return example_inputs(self.spec, seed=seed, sizes=sizes)

    @staticmethod
    def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        model.eval()
        with torch.no_grad():
            return [t for t in pytree.tree_leaves(model(**inputs)) if isinstance(t, torch.Tensor)]

    def max_diff(self, a: nn.Module, b: nn.Module) -> float:
        inputs = self.inputs()
        return max(float((x.float() - y.float()).abs().max())
                   for x, y in zip(self.outputs(a, inputs), self.outputs(b, inputs), strict=True))

    def randomized(self) -> Any:
        model = self.compile()
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.1)
        return model

    # -- checks ----------------------------------------------------------------------------------

    def check_schema(self) -> tuple[bool, str]:
        from pefc.spec import spec_schema

        found = f'"{self.method.name}"' in __import__("json").dumps(spec_schema())
        return found, "config validates and appears in `pefc schema`" if found else "method missing from the schema"

    def check_params(self) -> tuple[bool, str]:
        model = self.compile()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        stray = [n for n in trainable if not n.startswith(self.name + ".")]
        if stray or not trainable:
            return False, f"trainable parameters outside the adapter: {stray[:3]}" if stray else "nothing trainable"
        report = model.parameter_report().adapters[0]
        if report.formula_params is None:
            return False, "the plugin gives no param_count formula"
        ok = report.params == report.formula_params
        return ok, f"{report.params:,} trainable params; formula says {report.formula_params:,}"

    def check_identity(self) -> tuple[bool | None, str]:
        if not self.method.identity_at_init:
            return None, "the method does not declare identity at init"
        diff = self.max_diff(self.compile(), self.compile(adapters=False))
        return diff <= self.atol, f"fresh adapter vs base: max |diff| {diff:.3g}"

    def check_training(self) -> tuple[bool, str]:
        model = self.compile()
        base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(self.name + ".")}
        before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        model.train()
        for step in range(3):
            output = model(**self.inputs(seed=step))
            loss = next(t for t in pytree.tree_leaves(output) if t.is_floating_point()).float().pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = model.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
        touched = [k for k, v in base.items() if not torch.equal(v, after[k])]
        ok = bool(changed) and not touched
        return ok, f"{len(changed)} adapter tensors changed, {len(touched)} base tensors changed"

    def check_roundtrip(self) -> tuple[bool, str]:
        model = self.randomized()
        directory = self.workdir / "roundtrip"
        model.save_adapters(directory)
        fresh = self.compile()
        fresh.load_adapters(directory)
        diff = self.max_diff(model, fresh)
        return diff == 0.0, f"saved and reloaded: max |diff| {diff:.3g}"

    def check_merge(self) -> tuple[bool | None, str]:
        if not self.method.mergeable:
            return None, "not mergeable"
        model = self.randomized()
        merged = model.merge()
        diff = self.max_diff(model, merged)
        same_graph = len(merged.graph.nodes) == model.pefc.base_node_count
        return (diff <= self.atol and same_graph,
                f"merged vs unmerged max |diff| {diff:.3g}; merged graph has "
                f"{len(merged.graph.nodes)} nodes, base {model.pefc.base_node_count}")

    def check_onnx(self) -> tuple[bool, str]:
        from pefc.export import export_onnx

        model = self.randomized()
        result = export_onnx(model, self.workdir / "model.onnx", merge=self.method.mergeable, verify=True,
                             atol=max(self.atol, 1e-4))
        worst = max(result.verify_max_abs_diff.values())
        return True, f"{result.nodes} ONNX nodes; onnxruntime vs torch max |diff| {worst:.3g}"
