"""Attention written out in ATen ops is an AttentionSite like SDPA: roles, prefix tuning, clear errors."""

from __future__ import annotations

import arch_models
import pytest
import torch
from conftest import batch, make_spec
from torch import nn

import pefc
from pefc.source import build_model
from pefc.spec import ModelSpec, parse_spec

peft = pytest.importorskip("peft")

# one decoder layer: an eager attention is all these tests need (half the capture of two)
LLAMA_EAGER = {"hf": {"class": "LlamaForCausalLM", "attn_implementation": "eager", "config": {
    "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0}}}
INPUTS = {"x": {"shape": ["batch", "seq", 16], "dtype": "float32"}}


@pytest.fixture(scope="module")
def llama_eager():
    return build_model(ModelSpec.model_validate(LLAMA_EAGER)).eval()


def test_prefix_on_eager_llama_matches_peft(llama_eager):
    from test_prefix_matches_peft import compile_prefix, copy_from_peft, peft_prefix

    assert llama_eager.config._attn_implementation == "eager"
    reference = peft_prefix(llama_eager, "llama", projection=False)
    compiled = compile_prefix(llama_eager).eval()
    copy_from_peft(compiled, reference)
    for shape in [(3, 5), (1, 11)]:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            want, got, plain = reference(**inputs).logits, compiled(**inputs).logits, llama_eager(**inputs).logits
        assert (want - got).abs().max() < 1e-5
        assert (plain - got).abs().max() > 1e-2


class Scores(nn.Module):
    """One attention layer whose scores take a form given by ``kind``; ``prefix=(k, v)`` is the eager reference."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(2, 1, 1))  # per-head slope (ALiBi-like)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        p = 0 if prefix is None else prefix[0].shape[-2]
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], -2), torch.cat([prefix[1], v], -2)
        rel = torch.arange(s, device=x.device)[None, :] - torch.arange(s, device=x.device)[:, None]
        rel = nn.functional.pad(rel.float(), (p, 0))  # zero bias at the prefix: ALiBi's reshape spells out S
        if self.kind == "t5":  # the prefix at positions 0 .. p-1, the queries after it (as HF PEFT on T5)
            rel = (torch.arange(s + p)[None, :] - (torch.arange(s) + p)[:, None]).float()
        causal = nn.functional.pad(torch.ones(s, s, dtype=torch.bool).tril(), (p, 0), value=True)
        if self.kind == "t5":  # no scaling, relative position bias
            scores = torch.matmul(q, k.transpose(3, 2)) + self.bias * rel
        elif self.kind == "alibi":  # baddbmm over [B*H, S, D]
            bias = (self.bias * rel).expand(b, 2, s, s + p).reshape(b * 2, s, s + p)
            scores = torch.baddbmm(bias, q.reshape(b * 2, s, 8), k.reshape(b * 2, s + p, 8).transpose(1, 2),
                                   beta=1.0, alpha=8 ** -0.5).view(b, 2, s, -1)
        elif self.kind == "softcap":  # scaled queries, causal where(), tanh softcapping
            scores = torch.where(causal, torch.tanh((q * 8 ** -0.5) @ k.transpose(-1, -2) / 5.0) * 5.0, -1e9)
        elif self.kind == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k).masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        a = torch.matmul(nn.functional.dropout(probs, 0.0, self.training), v)
        return self.o(a.transpose(1, 2).reshape(b, s, 16))


KINDS = ["t5", "alibi", "softcap", "einsum"]


@pytest.mark.parametrize("kind", KINDS)
def test_eager_forms_are_attention_sites_and_take_prefixes(kind):
    model = Scores(kind).eval()
    spec = parse_spec({"version": 1, "inputs": INPUTS, "adapters": [
        {"name": "pfx", "method": "prefix", "num_virtual_tokens": 3},
        {"name": "qv", "method": "lora", "r": 2, "target": ["@attn.q", "@attn.k", "@attn.v", "@attn.o"]}]})
    compiled = pefc.compile(spec, model=model, example_inputs={"x": torch.randn(2, 6, 16)}).eval()
    roles = {i.site_path: i.site_role for i in compiled.pefc.insertions if i.adapter == "qv"}
    assert roles == {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o"}
    assert [i.site_role for i in compiled.pefc.insertions if i.adapter == "pfx"] == ["attn"]
    slots = next(compiled.get_submodule(i.module) for i in compiled.pefc.insertions if i.adapter == "pfx")
    pk, pv = (t.view(3, 2, 8).transpose(0, 1)[None] for t in (slots.prefix_key, slots.prefix_value))
    with torch.no_grad():
        for b, s in [(3, 5), (1, 1)]:
            x = torch.randn(b, s, 16)
            want = model(x, prefix=(pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)))
            assert (compiled(x=x) - want).abs().max() < 1e-5, f"{kind} {(b, s)}"


class Unreadable(nn.Module):
    """Scores as a broadcast product and a sum: no matmul pefc could read."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)
        return torch.softmax(scores, dim=-1) @ v


def test_unreadable_attention_names_the_module():
    spec = parse_spec({"version": 1, "inputs": INPUTS, "adapters": [{"name": "pfx", "method": "prefix"}]})
    with pytest.raises(pefc.TargetError, match=r"'@attn' covers module .*attention pefc cannot read: the scores"):
        pefc.compile(spec, model=Unreadable(), example_inputs={"x": torch.randn(2, 6, 16)})


def test_selector_matching_nothing_on_eager_model_lists_every_role(llama_eager):
    spec = parse_spec(make_spec([{"name": "x", "method": "lora", "target": ["@attn.qq"]}], family=None))
    with pytest.raises(pefc.TargetError) as info:  # the prefix test's inputs: its capture is reused
        pefc.compile(spec, model=llama_eager, example_inputs=batch(2, 8))
    message = str(info.value)
    for role in ("@attn.q", "@attn.k", "@attn.v", "@attn.o", "@mlp.up", "@mlp.gate", "@mlp.down"):
        assert role in message


# --- DeBERTa-v2: a reshape spelling out the key length, disentangled position terms ---------------

DEBERTA = {"hf": arch_models.DEBERTA}
DEBERTA_INPUTS = {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": 100},
                  "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2, "optional": True}}


def deberta_with_prefix(attention: nn.Module, prefix: tuple[torch.Tensor, torch.Tensor]):
    """DeBERTa-v2's DisentangledSelfAttention.forward with prefix keys/values ``[H, P, D]`` joined: they take
    part in the content-to-content scores; the position terms (c2p, p2c) and the mask give them 0 / visible."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import scaled_size_sqrt

    def forward(hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                rel_embeddings=None):
        heads, factor = attention.num_attention_heads, 1 + len(attention.pos_att_type)
        q, k, v = (attention.transpose_for_scores(f(hidden_states), heads)
                   for f in (attention.query_proj, attention.key_proj, attention.value_proj))
        rel = (attention.disentangled_attention_bias(q, k, relative_pos, attention.pos_dropout(rel_embeddings), factor)
               if attention.relative_attention else torch.zeros(q.shape[0], q.shape[1], k.shape[1]))
        pk, pv = (t.repeat(q.shape[0] // heads, 1, 1) for t in prefix)
        p = pk.shape[1]
        scores = torch.bmm(q, torch.cat([pk, k], 1).transpose(-1, -2) / scaled_size_sqrt(q, factor))
        scores = (scores + nn.functional.pad(rel, (p, 0))).view(-1, heads, q.shape[1], p + k.shape[1])
        mask = nn.functional.pad(attention_mask.bool(), (p, 0), value=True)
        probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(q.dtype).min), dim=-1)
        out = torch.bmm(probs.view(-1, q.shape[1], p + k.shape[1]), torch.cat([pv, v], 1))
        out = out.view(-1, heads, q.shape[1], out.shape[-1]).permute(0, 2, 1, 3).contiguous()
        return out.view(*out.shape[:2], -1), None

    return forward


def test_prefix_on_deberta_v2_joins_its_reshaped_scores():
    """HF PEFT cannot prefix DeBERTa-v2 (the model reads no cache); pefc's prefix equals an eager reference."""
    spec = parse_spec({"version": 1, "model": DEBERTA, "inputs": DEBERTA_INPUTS,
                       "adapters": [{"name": "pfx", "method": "prefix", "num_virtual_tokens": 3}]})
    compiled = pefc.compile(spec).eval()
    reference = build_model(ModelSpec.model_validate(DEBERTA)).eval()
    for i, layer in enumerate(reference.encoder.layer):
        slots = compiled.get_submodule(compiled.pefc.insertions[i].module)
        prefix = tuple(t.view(3, 4, 8).transpose(0, 1) for t in (slots.prefix_key, slots.prefix_value))
        layer.attention.self.forward = deberta_with_prefix(layer.attention.self, prefix)
    for shape in [(3, 5), (1, 7)]:
        inputs = batch(*shape, pad=True)
        positions = torch.arange(3, 3 + shape[1])[None]  # the real tokens after the prefix, as on every model
        with torch.no_grad():
            got = compiled(**inputs).last_hidden_state
            assert (got - reference(**inputs, position_ids=positions).last_hidden_state).abs().max() < 1e-5, shape
            assert (got - build_model(ModelSpec.model_validate(DEBERTA))(**inputs).last_hidden_state).abs().max() > 1e-3


class KeysFolded(nn.Module):
    """Scores reshaped through ``[B, H, S*S]``: the key axis is folded into another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2)).reshape(b, 2, s * s).reshape(b, 2, s, s)
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, 16)


def test_reshape_folding_the_key_axis_is_refused_naming_its_line():
    spec = parse_spec({"version": 1, "inputs": INPUTS, "adapters": [{"name": "pfx", "method": "prefix"}]})
    with pytest.raises(pefc.PluginError, match=r"reshape '\w+' \(test_eager_attention.py:\d+: `scores = .*spells out "
                                                r"the key length and moves the key axis"):
        pefc.compile(spec, model=KeysFolded(), example_inputs={"x": torch.randn(2, 6, 16)})
