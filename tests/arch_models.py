"""Tiny encoder-decoder and vision models (d_model 32, 2 layers), their spec inputs and PEFT oracles."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

T5 = {"class": "T5ForConditionalGeneration",
      "config": {"vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                 "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}}
BART = {"class": "BartForConditionalGeneration",
        "config": {"vocab_size": 100, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                   "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
                   "decoder_ffn_dim": 64, "max_position_embeddings": 64}}
VIT = {"class": "ViTForImageClassification",
       "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                  "image_size": 16, "patch_size": 4, "num_labels": 3}}
# DeBERTa-v3's disentangled attention (content-to-position and position-to-content terms; the config's
# defaults have none)
DEBERTA = {"class": "DebertaV2Model",
           "config": {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0,
                      "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 16}}
MODELS = {"t5": T5, "bart": BART, "vit": VIT}
# PEFT's default LoRA targets (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING;
# ViT's attention projections are q_proj / v_proj in transformers 5)
PEFT_TARGETS = {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"], "vit": ["q_proj", "v_proj"]}

SEQ2SEQ_INPUTS = {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": 100},
                  "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2, "optional": True},
                  "decoder_input_ids": {"shape": ["batch", "target"], "dtype": "int64", "high": 100}}
VISION_INPUTS = {"pixel_values": {"shape": ["batch", 3, 16, 16], "dtype": "float32"}}
# (batch, source length, target length): none is the capture's (2, 8, 3)
SHAPES = [(1, 5, 1), (7, 3, 9)]


def spec(name: str, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    inputs = VISION_INPUTS if name == "vit" else SEQ2SEQ_INPUTS
    return {"version": 1, "model": {"hf": copy.deepcopy(MODELS[name])}, "inputs": copy.deepcopy(inputs),
            "adapters": adapters}


def build(name: str) -> torch.nn.Module:
    """The model ``spec(name, ...)`` builds (same seed, same weights), in eval mode."""
    from pefc.source import build_model
    from pefc.spec import ModelSpec

    return build_model(ModelSpec.model_validate({"hf": MODELS[name]})).eval()


def inputs(name: str, b: int, s: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(b, 3, 16, 16, generator=g)}
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 1:] = 0 if s > 1 else 1  # one padded source position
    return {"input_ids": torch.randint(3, 100, (b, s), generator=g), "attention_mask": mask,
            "decoder_input_ids": torch.randint(3, 100, (b, t), generator=g)}


def max_diff(name: str, a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest |logits difference| over :data:`SHAPES`."""
    worst = 0.0
    for i, shape in enumerate(SHAPES):
        x = inputs(name, *shape, seed=i)
        with torch.no_grad():
            worst = max(worst, (a(**x).logits - b(**x).logits).abs().max().item())
    return worst


def random_peft(base: torch.nn.Module, config: Any, seed: int = 3) -> Any:
    """A PeftModel on a copy of ``base`` whose adapter tensors are random and non-zero (eval mode)."""
    import peft

    reference = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return reference.eval()


def peft_checkpoint(name: str, config: Any, directory: Path, seed: int = 3) -> tuple[torch.nn.Module, Any]:
    """The base model and a :func:`random_peft` model on it, saved to ``directory``."""
    base = build(name)
    reference = random_peft(base, config, seed)
    reference.save_pretrained(directory)
    return base, reference
