"""Encoder-decoders (T5, BART): roles in encoder, decoder and cross-attention, the kind selector,
and PEFT prefix checkpoints on T5 and BART loading with PEFT's logits. (PEFT's default LoRA targets
and LoRA checkpoints on T5, BART and ViT: rows of tests/test_architecture_matrix.py.)"""

from __future__ import annotations

import fnmatch

import pytest
from arch_models import MODELS, max_diff, peft_checkpoint, spec
from conftest import make_spec

import pefc
from pefc.interop import peft as interop
from pefc.spec import parse_spec

ATOL = 1e-4


def lora_paths(name: str, target: list[str]) -> set[str]:
    """Module paths a LoRA on ``target`` adapts (the capture of each model is shared: pefc's capture cache)."""
    model = pefc.compile(parse_spec(spec(name, [{"name": "l", "method": "lora", "target": target, "r": 2}])))
    return {i.site_path for i in model.pefc.insertions}


def kind_paths(name: str) -> dict[str, str]:
    """Every q projection of the model and the kind of attention it belongs to, by its path."""
    if name == "t5":
        return {"encoder.block.*.SelfAttention.q": "encoder", "decoder.block.*.SelfAttention.q": "decoder",
                "decoder.block.*.EncDecAttention.q": "cross"}
    return {"model.encoder.layers.*.self_attn.q_proj": "encoder", "model.decoder.layers.*.self_attn.q_proj": "decoder",
            "model.decoder.layers.*.encoder_attn.q_proj": "cross"}


def of_kind(name: str, paths: set[str], *kinds: str) -> set[str]:
    globs = [g for g, kind in kind_paths(name).items() if kind in kinds]
    return {p for p in paths if any(fnmatch.fnmatchcase(p, g) for g in globs)}


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_kind_selector_picks_one_kind_of_attention(name):
    every_q = lora_paths(name, ["@attn.q"])
    assert len(every_q) == 6  # 2 encoder, 2 decoder self, 2 cross
    for kind in ("encoder", "decoder", "cross"):
        picked = lora_paths(name, [f"@attn.q[{kind}]"])
        assert picked == of_kind(name, every_q, kind) and len(picked) == 2
    assert lora_paths(name, ["@attn.q[self]"]) == of_kind(name, every_q, "encoder", "decoder")
    cross_kv = lora_paths(name, ["@attn.k[cross]", "@attn.v[cross]"])
    assert len(cross_kv) == 4 and all(("EncDec" in p) or ("encoder_attn" in p) for p in cross_kv)


def test_unknown_kind_is_refused_when_the_spec_is_read():
    with pytest.raises(pefc.SpecError, match="unknown attention kind 'crosss'"):
        parse_spec(spec("bart", [{"name": "l", "method": "lora", "target": ["@attn.q[crosss]"]}]))


def test_a_kind_the_model_lacks_names_the_kinds_it_has():
    data = make_spec([{"name": "l", "method": "lora", "target": ["@attn.q[cross]"]}])
    with pytest.raises(pefc.TargetError, match=r"@attn.q is found in attentions of kind: self"):
        pefc.compile(parse_spec(data))


DECODER_SELF = {"bart": "model.decoder.layers.{}.self_attn", "t5": "decoder.block.{}.layer.0.SelfAttention"}


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_peft_prefix_on_encoder_decoder_equals_peft(name, tmp_path):
    """PEFT prefixes the decoder's self-attention only: its positions (BART) and the queries' relative
    positions (T5's position bias, prefix keys at 0 .. P-1) start after the prefix."""
    import peft

    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    base, reference = peft_checkpoint(name, config, tmp_path)
    model = interop.load(tmp_path, model_spec={"hf": MODELS[name]})  # the spec-built base: a shared capture
    assert {i.site_path for i in model.pefc.insertions} == {DECODER_SELF[name].format(i) for i in (0, 1)}
    assert max_diff(name, reference, model) <= ATOL
    assert max_diff(name, base, model) > 1e-3
