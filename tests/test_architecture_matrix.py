"""Roles from dataflow on every architecture of PEFT's default LoRA table that transformers builds offline.

One row per architecture (a tiny config: hidden <= 64, 2 layers): PEFT's default targets for
the model type, mapped to pefc roles, pick exactly the modules PEFT picks; and a PEFT LoRA
checkpoint with non-zero A and B loads through ``pefc.interop.peft.load`` with the
``PeftModel``'s outputs on shapes other than the capture's (float32, atol 1e-4).

The matrix is a table: add a row to ``ROWS`` (name, transformers class, config). Each row
captures once: the loaded checkpoint and the role selectors compile the same base module with
the same inputs, so the second compile reuses the capture (``PEFC_CAPTURE_CACHE``, see conftest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from arch_models import BART, DEBERTA, T5, VIT, random_peft
from torch import nn

import pefc
from pefc.interop import peft as interop
from pefc.source import build_model
from pefc.spec import ModelSpec, parse_spec

peft = pytest.importorskip("peft")
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS  # noqa: E402

SHAPES = [(3, 5), (1, 7)]  # the capture uses the spec's default sizes
ATOL = 1e-4
VOCAB = 100

# PEFT's module names -> the role pefc reads from the dataflow
ROLE_OF = {"q_proj": "attn.q", "v_proj": "attn.v", "k_proj": "attn.k", "o_proj": "attn.o",
           "q": "attn.q", "v": "attn.v", "query": "attn.q", "value": "attn.v",
           "query_proj": "attn.q", "value_proj": "attn.v",
           "c_attn": "attn.qkv", "query_key_value": "attn.qkv", "qkv_proj": "attn.qkv", "Wqkv": "attn.qkv",
           "in_proj": "attn.qkv", "fc1": "mlp.up", "fc2": "mlp.down"}

DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1,
           "eos_token_id": 2}
ENCODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0}
GQA = {**DECODER, "num_key_value_heads": 2}


@dataclass(frozen=True)
class Row:
    """One architecture: ``model_type`` is the key of PEFT's default table."""

    name: str
    cls: str
    config: dict[str, Any]
    model_type: str
    attn: str | None = None  # model.hf.attn_implementation (None: pefc's default)
    extra: dict[str, Any] = field(default_factory=dict)

    def model_spec(self) -> dict[str, Any]:
        hf: dict[str, Any] = {"class": self.cls, "config": self.config}
        if self.attn:
            hf["attn_implementation"] = self.attn
        return {"hf": hf}


ROWS = [
    Row("llama", "LlamaForCausalLM", GQA, "llama"),
    Row("llama-eager", "LlamaForCausalLM", GQA, "llama", attn="eager"),
    Row("mistral", "MistralForCausalLM", {**GQA, "sliding_window": None}, "mistral"),
    Row("qwen2", "Qwen2ForCausalLM", GQA, "qwen2"),
    Row("qwen3", "Qwen3ForCausalLM", {**GQA, "head_dim": 8}, "qwen3"),
    Row("gemma", "GemmaForCausalLM", {**GQA, "head_dim": 8}, "gemma"),
    Row("gemma2", "Gemma2ForCausalLM", {**GQA, "head_dim": 8}, "gemma2"),
    Row("gemma3_text", "Gemma3ForCausalLM", {**GQA, "head_dim": 8, "sliding_window": 16}, "gemma3_text"),
    Row("phi", "PhiForCausalLM", DECODER, "phi"),
    Row("stablelm", "StableLmForCausalLM", GQA, "stablelm"),  # partial rotary (25 % of each head)
    # PEFT 0.21's default targets for mixtral match nothing in transformers 5 (NoMatchingPeftModuleError): the
    # attention projections by name; its experts are 3D parameters (gate_up_proj, down_proj), no linear modules
    Row("mixtral", "MixtralForCausalLM", {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2,
                                          "sliding_window": None}, "mixtral",
        extra={"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    Row("gpt2", "GPT2LMHeadModel", {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
        "gpt2"),
    Row("gpt_bigcode", "GPTBigCodeForCausalLM", {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                                 "n_positions": 64}, "gpt_bigcode"),
    Row("gpt_neo", "GPTNeoForCausalLM", {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                         "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 64,
                                         "window_size": 16, "bos_token_id": 1, "eos_token_id": 2}, "gpt_neo"),
    Row("gpt_neox", "GPTNeoXForCausalLM", DECODER, "gpt_neox"),
    Row("gptj", "GPTJForCausalLM", {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                                    "rotary_dim": 4, "bos_token_id": 1, "eos_token_id": 2}, "gptj"),
    Row("codegen", "CodeGenForCausalLM", {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                          "n_positions": 64, "n_ctx": 64, "rotary_dim": 4, "bos_token_id": 1,
                                          "eos_token_id": 2}, "codegen"),
    Row("bloom", "BloomForCausalLM", {"vocab_size": VOCAB, "hidden_size": 32, "n_layer": 2, "n_head": 4}, "bloom"),
    Row("falcon", "FalconForCausalLM", {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "bos_token_id": 1, "eos_token_id": 2}, "falcon"),
    Row("opt", "OPTForCausalLM", {"vocab_size": VOCAB, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "max_position_embeddings": 64, "word_embed_proj_dim": 32,
                                  "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "opt"),
    Row("mpt", "MptForCausalLM", {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                  "max_seq_len": 64}, "mpt"),
    Row("bert", "BertModel", ENCODER, "bert"),
    Row("bert-eager", "BertModel", ENCODER, "bert", attn="eager"),
    Row("roberta", "RobertaModel", {**ENCODER, "pad_token_id": 1}, "roberta"),
    Row("xlm-roberta", "XLMRobertaModel", {**ENCODER, "pad_token_id": 1}, "xlm-roberta"),
    Row("electra", "ElectraModel", {**ENCODER, "embedding_size": 32}, "electra"),
    Row("layoutlm", "LayoutLMModel", ENCODER, "layoutlm"),
    Row("deberta", "DebertaModel", ENCODER, "deberta"),
    Row("deberta-v2", DEBERTA["class"], DEBERTA["config"], "deberta-v2"),  # with disentangled attention
    Row("t5", T5["class"], T5["config"], "t5"),
    Row("bart", BART["class"], BART["config"], "bart"),
    Row("vit", VIT["class"], VIT["config"], "vit", extra={"targets": ["q_proj", "v_proj"]}),
]


def peft_reference(base: nn.Module, targets: Any, seed: int = 3) -> Any:
    """A PeftModel with LoRA (r=2) on ``targets`` (None: PEFT's default table), A and B non-zero."""
    return random_peft(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0), seed)


def lora_modules(reference: Any) -> set[str]:
    prefix = "base_model.model."
    return {name[len(prefix):] for name, module in reference.named_modules()
            if hasattr(module, "lora_A") and name.startswith(prefix)}


def main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def inputs_of(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1:
        mask[0, :2] = 0  # left padding on the first row
    return {"input_ids": torch.randint(3, VOCAB, (b, s), generator=generator), "attention_mask": mask}


def seq2seq_inputs(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    return {**inputs_of(b, s, seed), "decoder_input_ids": torch.randint(3, VOCAB, (b, s + 2), generator=generator)}


def pixel_inputs(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


def max_diff(reference: nn.Module, model: nn.Module, inputs=inputs_of) -> float:
    worst = 0.0
    for shape in SHAPES:
        batch = inputs(*shape)
        with torch.no_grad():
            worst = max(worst, (main_output(reference(**batch)) - main_output(model(**batch))).abs().max().item())
    return worst


HF_INPUTS = {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": VOCAB},
             "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2, "optional": True}}
RESULTS: dict[str, tuple[bool, float]] = {}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_roles_and_peft_lora(row: Row, tmp_path):
    model_spec = row.model_spec()
    base = build_model(ModelSpec.model_validate(model_spec)).eval()
    reference = peft_reference(base, row.extra.get("targets"))  # ViT, mixtral: PEFT's table fails, by name
    reference.save_pretrained(tmp_path)
    loaded = interop.load(tmp_path, base)
    inputs = {name: entry.model_dump(mode="json") for name, entry in loaded.pefc.spec.inputs.items()}
    batches = {"pixel_values": pixel_inputs, "decoder_input_ids": seq2seq_inputs}
    batch_of = next((f for key, f in batches.items() if key in inputs), inputs_of)
    diff = max_diff(reference, loaded, batch_of)
    roles = sorted({ROLE_OF[name] for name in row.extra.get("targets") or PEFT_TARGETS[row.model_type]})
    spec = parse_spec({"version": 1, "inputs": inputs,  # the loaded model's: its capture of `base` is reused
                       "adapters": [{"name": "roles", "method": "lora", "r": 2, "target": ["@" + r for r in roles]}]})
    picked = {i.site_path for i in pefc.compile(spec, model=base).pefc.insertions}
    RESULTS[row.name] = (picked == lora_modules(reference), diff)
    print(f"matrix row {row.name}: roles ok {picked == lora_modules(reference)}, max |diff| {diff:.1e}")
    assert picked == lora_modules(reference), f"{row.name}: roles {roles} pick {sorted(picked)}"
    assert diff < ATOL, f"{row.name}: max |diff| {diff}"
    assert max_diff(base, loaded, batch_of) > 1e-3  # the adapter does something


# --- a plain nn.Module with hand-written attention ------------------------------------------------

class HandWritten(nn.Module):
    """``softmax(q @ k.transpose(-2, -1) * scale + mask) @ v``, as research code writes it."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d),
                                                   "o": nn.Linear(d, d), "up": nn.Linear(d, 2 * d),
                                                   "down": nn.Linear(2 * d, d)}) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        b, s, d = x.shape
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        for blk in self.blocks:
            q, k, v = (blk[n](x).view(b, s, self.heads, -1).transpose(1, 2) for n in "qkv")
            scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5) + mask
            a = torch.softmax(scores, dim=-1) @ v
            x = x + blk["o"](a.transpose(1, 2).reshape(b, s, d))
            x = x + blk["down"](torch.relu(blk["up"](x)))
        return self.head(x)


def test_hand_written_attention_roles_and_peft_lora(tmp_path):
    base = HandWritten().eval()
    example = inputs_of(2, 8)
    spec = parse_spec({"version": 1, "inputs": HF_INPUTS,
                       "adapters": [{"name": "qv", "method": "lora", "r": 2, "target": ["@attn.q", "@attn.v"]}]})
    compiled = pefc.compile(spec, model=base, example_inputs=example)
    picked = {i.site_path for i in compiled.pefc.insertions}
    reference = peft_reference(base, ["q", "v"])
    assert picked == lora_modules(reference)
    reference.save_pretrained(tmp_path)
    loaded = interop.load(tmp_path, base, inputs=HF_INPUTS, example_inputs=example)
    diff = max_diff(reference, loaded)
    RESULTS["hand-written"] = (True, diff)
    print(f"matrix row hand-written: roles ok True, max |diff| {diff:.1e}")
    assert diff < ATOL
