"""Shared fixtures: tiny transformers models built from configs with a fixed seed."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Literal

import pydantic
import pytest
import torch
from torch import nn

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PEFC_CAPTURE_CACHE", "64")  # reuse captures of identical spec models (tests/test_capture_cache.py)
warnings.filterwarnings("ignore")

import pefc  # noqa: E402  (after PEFC_CAPTURE_CACHE is set: pefc reads it on import)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest-xdist worker per core: no thread oversubscription
    torch.set_num_threads(1)

INPUTS = {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": 100},
          "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2}}

LLAMA = {"class": "LlamaForCausalLM",
         "config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}
GPT2 = {"class": "GPT2LMHeadModel",
        "config": {"vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128,
                   "bos_token_id": 1, "eos_token_id": 2}}
BERT = {"class": "BertModel",
        "config": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 64, "max_position_embeddings": 128}}
QWEN2 = {"class": "Qwen2ForCausalLM",
         "config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}
MISTRAL = {"class": "MistralForCausalLM", "config": {**LLAMA["config"], "sliding_window": None}}
FAMILIES = {"llama": LLAMA, "gpt2": GPT2, "bert": BERT, "qwen2": QWEN2, "mistral": MISTRAL}


def make_spec(adapters: list[dict[str, Any]], family: str | None = "llama", **model: Any) -> dict[str, Any]:
    """A spec dict for a tiny model of ``family`` (None: no model section)."""
    spec: dict[str, Any] = {"version": 1, "inputs": copy.deepcopy(INPUTS), "adapters": adapters}
    if family:
        spec["model"] = {"hf": copy.deepcopy(FAMILIES[family]), **model}
    return spec


def build_hf(family: str, seed: int = 0) -> torch.nn.Module:
    """The same model `make_spec(family)` builds, as a plain transformers module."""
    from pefc.source import build_model
    from pefc.spec import ModelSpec

    return build_model(ModelSpec.model_validate({"hf": FAMILIES[family], "seed": seed}))


_SHARED: dict[str, torch.nn.Module] = {}


def shared_hf(family: str) -> torch.nn.Module:
    """One `build_hf(family)` module (eval mode) per test process. Compiling it again with the same
    inputs reuses its capture (``PEFC_CAPTURE_CACHE``: a module is keyed by identity and state), so
    tests that only read it share one capture. Never modify it in place: deep-copy it first."""
    if family not in _SHARED:
        _SHARED[family] = build_hf(family).eval()
    return _SHARED[family]


def batch(b: int = 3, s: int = 5, vocab: int = 100, seed: int = 0, pad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad and b > 1 and s > 2:
        mask[0, :2] = 0  # left padding on the first row
    return {"input_ids": ids, "attention_mask": mask}


def randomize_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Give every trainable tensor non-trivial values (a zero-init comparison proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def outputs_and_grads(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first output (logits, or an encoder's hidden states) of ``inputs`` (default: one
    `batch(2, 6)`) and every parameter's gradient of its mean square."""
    model.zero_grad(set_to_none=True)
    logits = model(**(inputs or batch(2, 6)))[0]
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_outputs_and_grads(a: torch.nn.Module, b: torch.nn.Module,
                                  inputs: dict[str, torch.Tensor] | None = None) -> None:
    """Two models compute the same logits and gradients (float32: 1e-5)."""
    out_a, grads_a = outputs_and_grads(a, inputs)
    out_b, grads_b = outputs_and_grads(b, inputs)
    assert (out_a - out_b).abs().max().item() < 1e-5
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


class FixedMask(nn.Dropout):
    """Dropout with a mask that depends only on the input's shape: two calls, one mask (also across
    libraries: swapped in for HF PEFT's dropout and pefc's, both draw the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        g = torch.Generator().manual_seed(x.numel())
        keep = torch.rand(x.shape, generator=g) >= self.p
        return x * keep / (1 - self.p)


def make_method(name: str, **attrs: Any) -> pefc.Method:
    """A third-party method ``name`` (its config: the base keys only); ``attrs`` set its hooks."""
    config = pydantic.create_model(f"{name.title()}Config", __base__=pefc.AdapterConfig,
                                   method=(Literal[name], name))
    return type(f"{name.title()}Method", (pefc.Method,), {"name": name, "config": config, **attrs})()


class MethodsPlugin:
    """A pluggy plugin object providing ``methods`` (for ``build_registry(extra_plugins=...)``)."""

    def __init__(self, *methods: Any) -> None:
        self.methods = list(methods)

    @pefc.hookimpl
    def pefc_methods(self) -> list[Any]:
        return self.methods


@pytest.fixture(scope="session")
def registry():
    from pefc.registry import default_registry

    return default_registry()


class TwoLayerMLP(nn.Module):
    """A model with linears only: no attention, no embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class TinyLM(nn.Module):
    """A plain torch LM (learned positions, causal SDPA with no mask or an additive float mask).

    ``prefix=[(K_p, V_p)]`` per layer and ``inputs_embeds`` make it the eager reference of
    prefix and prompt tuning.
    """

    def __init__(self, float_mask: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.float_mask = float_mask
        self.embed, self.pos = nn.Embedding(50, 16), nn.Embedding(64, 16)
        self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids=None, attention_mask=None, prefix=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x.shape
        p = 0 if prefix is None else prefix[0][0].shape[-2]
        x = x + self.pos(torch.arange(s, device=x.device) + p)
        mask = None
        if self.float_mask or p:
            keep = torch.ones(s, s + p, dtype=torch.bool, device=x.device).tril(p)
            if attention_mask is not None:  # [B, p + s]
                keep = keep & attention_mask[:, None, None, :].bool()
            mask = keep if not self.float_mask else torch.zeros(keep.shape).masked_fill(~keep, -1e9)
        for layer, (qkv, out) in enumerate(zip(self.qkv, self.out, strict=True)):
            q, k, v = qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
            if prefix is not None:
                k, v = torch.cat([prefix[layer][0], k], 2), torch.cat([prefix[layer][1], v], 2)
            a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
            x = x + out(a.transpose(1, 2).reshape(b, s, 16))
        return self.head(x)
