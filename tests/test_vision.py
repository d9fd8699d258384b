"""Vision (ViT, ``pixel_values`` [batch, 3, H, W]): roles from the dataflow. (A PEFT LoRA
checkpoint on q/v loading with PEFT's logits: the ``vit`` row of tests/test_architecture_matrix.py.)"""

from __future__ import annotations

from arch_models import PEFT_TARGETS, build, spec

import pefc
from pefc.spec import parse_spec


def test_vit_compiles_with_attention_and_mlp_roles():
    data = spec("vit", [{"name": "l", "method": "lora", "target": ["@attn.q", "@attn.v", "@mlp.down"], "r": 2}])
    model = pefc.compile(parse_spec(data))
    roles = {(i.site_path, i.site_role) for i in model.pefc.insertions}
    assert roles == {(f"vit.layers.{n}.{leaf}", role) for n in (0, 1) for leaf, role in
                     (("attention.q_proj", "attn.q"), ("attention.v_proj", "attn.v"), ("mlp.fc2", "mlp.down"))}
    base = build("vit")
    peft_default = {path for path, _ in base.named_modules() if path.rsplit(".", 1)[-1] in PEFT_TARGETS["vit"]}
    assert {p for p, role in roles if role != "mlp.down"} == peft_default
