"""DoRA (Liu et al. 2024): W' = m * (W0 + s B A) / ||W0 + s B A||_row, the norm detached (as HF PEFT).

Dropout (training only) has two scopes, equal when ``dropout`` is 0 and in eval:

- ``low_rank`` (default): only ``B A`` reads it, as in LoRA: ``y = g * (W0 x + s B A drop(x))``.
  No second product with ``W0``: a DoRA step then costs about what a LoRA step costs.
- ``update`` (HF PEFT and the DoRA authors' code): the whole update ``W' - W0`` reads the
  dropped input, ``y = W0 x + (W' - W0) drop(x)``. ``W0 drop(x)`` is one more product with the
  frozen weight per site, forward and backward (twice the base's arithmetic at every site).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pefc_plugins.lora import Lora, LoraConfig
from pydantic import Field

import pefc


class DoraConfig(LoraConfig):
    method: Literal["dora"] = "dora"  # type: ignore[assignment]
    runtime_keys: ClassVar[tuple[str, ...]] = ("dropout", "dropout_scope", "dropout_masks")
    dropout_scope: Literal["update", "low_rank"] = Field(
        default="low_rank", description="what reads the dropped input while training: only B A (as LoRA; "
        "the default) or the whole update W' - W0 (HF PEFT; one more product with W0 per site)")


class Dora(Lora):
    name = "dora"
    config = DoraConfig
    description = "Weight-decomposed low-rank adaptation: magnitude x LoRA-updated direction (Liu et al. 2024)"

    def rewrite(self, ctx: pefc.RewriteContext, config: DoraConfig, sites: Sequence[pefc.Site]) -> None:
        from pefc_plugins.dora.modules import DoraUpdate

        for site in sites:
            assert isinstance(site, pefc.LinearSite)
            update = DoraUpdate(ctx.weight(site), config.for_site(site), site.weight_layout)
            ctx.wrap_output(site, update, pass_weight=True)

    def param_count(self, config: DoraConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        return super().param_count(config, site) + site.out_features


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Dora()]

