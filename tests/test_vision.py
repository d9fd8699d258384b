"""Vision (ViT, ``pixel_values`` [batch, 3, H, W]): roles from the dataflow, and a PEFT LoRA
checkpoint on q/v loading with PEFT's logits."""

from __future__ import annotations

from arch_models import PEFT_TARGETS, build, max_diff, peft_checkpoint, spec

import pefc
from pefc.interop import peft as interop
from pefc.spec import parse_spec

ATOL = 1e-4


def test_vit_compiles_with_attention_and_mlp_roles():
    data = spec("vit", [{"name": "l", "method": "lora", "target": ["@attn.q", "@attn.v", "@mlp.down"], "r": 2}])
    model = pefc.compile(parse_spec(data))
    roles = {(i.site_path, i.site_role) for i in model.pefc.insertions}
    assert roles == {(f"vit.layers.{n}.{leaf}", role) for n in (0, 1) for leaf, role in
                     (("attention.q_proj", "attn.q"), ("attention.v_proj", "attn.v"), ("mlp.fc2", "mlp.down"))}
    base = build("vit")
    peft_default = {path for path, _ in base.named_modules() if path.rsplit(".", 1)[-1] in PEFT_TARGETS["vit"]}
    assert {p for p, role in roles if role != "mlp.down"} == peft_default


def test_peft_lora_on_vit_loads_with_peft_logits(tmp_path):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS["vit"])
    base, reference = peft_checkpoint("vit", config, tmp_path)
    model = interop.load(tmp_path, base)
    assert model.pefc.spec.inputs["pixel_values"].shape == ["batch", 3, 16, 16]
    assert max_diff("vit", reference, model) <= ATOL
    assert max_diff("vit", base, model) > 1e-3
