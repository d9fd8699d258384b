"""Prefix tuning (Li & Liang 2021): trainable keys and values in front of every attention.

At each attention site (``scaled_dot_product_attention``), ``K = [K_p; K]`` and
``V = [V_p; V]`` along the sequence, with ``P = num_virtual_tokens`` prefix slots sized by
the key/value heads (``d_kv = num_kv_heads * head_dim``; repeated per head like the
model's own ``repeat_kv`` when the graph repeats heads before the attention). As in HF PEFT:
prefix keys are not rotated (they join after RoPE), every query sees every prefix slot
(the mask is widened), and the real tokens sit at positions ``P .. P+S-1``.

Parameters, without ``projection``: ``<adapter>.<site>.prefix_key`` and ``.prefix_value``,
each ``[P, d_kv]`` (heads major, like PEFT's per-layer slice), N(0, 1) at init. With
``projection: {hidden: h}`` the prefixes are PEFT's MLP reparameterisation, one module
shared by all sites: ``<adapter>.prefix_encoder.embedding.weight [P, d_kv]`` ->
``transform.0`` ``Linear(d_kv, h)`` -> tanh -> ``transform.2`` ``Linear(h, n_sites*2*d_kv)``;
site ``i`` reads columns ``[2 i d_kv, 2 (i+1) d_kv)`` (its keys, then its values).
:meth:`pefc.CompiledModel.bake` replaces the MLP by its output table
(``prefix_encoder.prompt_embeddings [P, n_sites*2*d_kv]``, PEFT's saved layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

import pefc

ENCODER = "prefix_encoder"


class Projection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: PositiveInt = Field(default=512, description="hidden width of the reparameterisation MLP")


class PrefixConfig(pefc.AdapterConfig):
    method: Literal["prefix"] = "prefix"
    default_target = ("@attn",)

    num_virtual_tokens: PositiveInt = Field(default=20, le=65536, description="prefix length P")
    projection: Projection | None = Field(
        default=None, description="MLP reparameterisation shared by all layers (training only; baked for export)")


def _kv_width(site: pefc.AttentionSite) -> int:
    return site.num_kv_heads * site.head_dim


class Prefix(pefc.Method):
    name = "prefix"
    config = PrefixConfig
    site_kinds = ("attention",)
    mergeable = False
    selectable = True
    identity_at_init = False  # random prefixes / prompts, as in HF PEFT
    description = "Trainable key/value prefixes in every attention (Li & Liang 2021)"

    def validate_sites(self, config: PrefixConfig, sites: Sequence[pefc.Site]) -> None:
        for site in sites:
            assert isinstance(site, pefc.AttentionSite)
            if not (site.num_kv_heads and site.head_dim):
                raise pefc.TargetError(f"adapter {config.name!r} (prefix): cannot tell the key/value heads of "
                                       f"attention {site.path!r} from the graph")
        widths = {_kv_width(s) for s in sites}  # type: ignore[arg-type]
        if config.projection is not None and len(widths) > 1:
            raise pefc.TargetError(f"adapter {config.name!r} (prefix): `projection` needs one key/value width "
                                   f"at every site, found {sorted(widths)}")

    def rewrite(self, ctx: pefc.RewriteContext, config: PrefixConfig, sites: Sequence[pefc.Site]) -> None:
        from pefc_plugins.prefix.modules import PrefixEncoder, PrefixKV

        length = config.num_virtual_tokens
        ctx.offset_positions(length, sites)  # type: ignore[arg-type]
        table = None
        if config.projection is not None:
            width = _kv_width(sites[0])  # type: ignore[arg-type]
            table = ctx.shared_module(ENCODER, PrefixEncoder(length, width, config.projection.hidden, len(sites)))
        for index, site in enumerate(sites):
            assert isinstance(site, pefc.AttentionSite)
            module = PrefixKV(length, site.num_kv_heads, _kv_width(site), index if table is not None else None)
            ctx.prepend_kv(site, module, (table,) if table is not None else ())

    def report_extras(self, config: PrefixConfig, sites: Sequence[pefc.Site]) -> dict[str, int]:
        return {"extra_attention_length": config.num_virtual_tokens}

    def param_count(self, config: PrefixConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.AttentionSite)
        return 0 if config.projection is not None else config.num_virtual_tokens * 2 * _kv_width(site)

    def shared_param_count(self, config: PrefixConfig, sites: Sequence[pefc.Site]) -> int:
        if config.projection is None or not sites:
            return 0
        width, hidden, out = _kv_width(sites[0]), config.projection.hidden, len(sites) * 2 * _kv_width(sites[0])  # type: ignore[arg-type]
        return config.num_virtual_tokens * width + (width + 1) * hidden + (hidden + 1) * out


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Prefix()]

