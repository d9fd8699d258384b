"""Sites and roles come from dataflow, on Llama, GPT-2, BERT and a plain torch model."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import batch, build_hf
from torch import nn

from pefc.capture import capture
from pefc.sites import find_sites

DYN = {"input_ids": [0, 1], "attention_mask": [0, 1]}


def roles_of(model, inputs=None):
    graph_module = capture(model, inputs or batch(2, 8), DYN)
    return {(s.kind, s.path): s.role for s in find_sites(graph_module)}, find_sites(graph_module)


@functools.cache
def family_roles(family: str):
    """``roles_of`` the tiny ``family`` model, captured once per module (the tests only read it)."""
    return roles_of(build_hf(family))


def test_llama_roles():
    roles, sites = family_roles("llama")
    prefix = "model.layers.1"
    assert roles[("linear", f"{prefix}.self_attn.q_proj")] == "attn.q"
    assert roles[("linear", f"{prefix}.self_attn.k_proj")] == "attn.k"
    assert roles[("linear", f"{prefix}.self_attn.v_proj")] == "attn.v"
    assert roles[("linear", f"{prefix}.self_attn.o_proj")] == "attn.o"
    assert roles[("linear", f"{prefix}.mlp.gate_proj")] == "mlp.gate"
    assert roles[("linear", f"{prefix}.mlp.up_proj")] == "mlp.up"
    assert roles[("linear", f"{prefix}.mlp.down_proj")] == "mlp.down"
    assert roles[("embedding", "model.embed_tokens")] == "embed"
    assert roles[("attention", f"{prefix}.self_attn")] == "attn"
    attention = [s for s in sites if s.kind == "attention"]
    assert [(a.num_heads, a.num_kv_heads, a.head_dim, a.layer) for a in attention] == [(4, 2, 8, 0), (4, 2, 8, 1)]


def test_gpt2_fused_qkv_and_conv1d():
    roles, sites = family_roles("gpt2")
    assert roles[("linear", "transformer.h.0.attn.c_attn")] == "attn.qkv"
    assert roles[("linear", "transformer.h.0.attn.c_proj")] == "attn.o"
    assert roles[("linear", "transformer.h.0.mlp.c_fc")] == "mlp.up"
    assert roles[("linear", "transformer.h.0.mlp.c_proj")] == "mlp.down"
    assert roles[("embedding", "transformer.wte")] == "embed"
    assert roles[("embedding", "transformer.wpe")] is None
    c_attn = next(s for s in sites if s.path == "transformer.h.0.attn.c_attn")
    assert (c_attn.weight_layout, c_attn.in_features, c_attn.out_features) == ("in_out", 32, 96)


def test_bert_roles():
    roles, _ = family_roles("bert")
    base = "encoder.layer.0"
    assert roles[("linear", f"{base}.attention.self.query")] == "attn.q"
    assert roles[("linear", f"{base}.attention.output.dense")] == "attn.o"
    assert roles[("linear", f"{base}.intermediate.dense")] == "mlp.up"
    assert roles[("linear", f"{base}.output.dense")] == "mlp.down"
    assert roles[("linear", "pooler.dense")] is None
    assert roles[("embedding", "embeddings.word_embeddings")] == "embed"


class PlainBlock(nn.Module):
    """A hand-written transformer block, no transformers involved."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.emb = nn.Embedding(50, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        b, s, d = h.shape

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(split(self.wq(h)), split(self.wk(h)), split(self.wv(h)),
                                                       is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(b, s, d))
        return h + self.fc2(torch.relu(self.fc1(h)))


def test_plain_torch_model_roles():
    graph_module = capture(PlainBlock(), {"tokens": torch.randint(0, 50, (2, 6))}, {"tokens": [0, 1]})
    roles = {s.path: s.role for s in find_sites(graph_module)}
    assert roles == {"emb": "embed", "wq": "attn.q", "wk": "attn.k", "wv": "attn.v", "out": "attn.o",
                     "fc1": "mlp.up", "fc2": "mlp.down", "scaled_dot_product_attention": "attn",
                     "relu": "mlp.act"}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_every_layer_has_one_attention_and_its_projections(family):
    _, sites = family_roles(family)
    for layer in (0, 1):
        layer_roles = sorted(s.role for s in sites if s.layer == layer and s.role)
        assert layer_roles.count("attn") == 1
        assert "attn.o" in layer_roles and "mlp.down" in layer_roles
