"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024), as a pefc plugin.

    y = W x + diag(b) B diag(d) A x

``A [r, d_in]`` and ``B [d_out, r]`` are frozen random matrices shared by every site of the
adapter (drawn once from ``projection_seed`` at the largest widths, each site uses a slice);
only the vectors ``d [r]`` (init ``d_initial``) and ``b [d_out]`` (init 0, so a fresh adapter
is the identity) are trained. Mergeable: ``W' = W + diag(b) B diag(d) A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, PositiveInt

import pefc


class VeraConfig(pefc.AdapterConfig):
    method: Literal["vera"] = "vera"
    r: PositiveInt = Field(default=256, le=65536, description="rank of the shared random projections")
    d_initial: float = Field(default=0.1, description="initial value of the scaling vector d")
    projection_seed: int = Field(default=0, ge=0, description="seed of the frozen shared A and B")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class Vera(pefc.Method):
    name = "vera"
    config = VeraConfig
    site_kinds = ("linear",)
    mergeable = True
    description = "Shared frozen random projections, trained scaling vectors (Kopiczko et al. 2024, VeRA)"

    def rewrite(self, ctx: pefc.RewriteContext, config: VeraConfig, sites: Sequence[pefc.Site]) -> None:
        from pefc_vera.modules import VeraUpdate, shared_projections  # torch: only when compiling

        linears = [s for s in sites if isinstance(s, pefc.LinearSite)]
        a, b = shared_projections(config, max(s.in_features for s in linears), max(s.out_features for s in linears))
        for site in linears:
            ctx.wrap_output(site, VeraUpdate(a[:, : site.in_features], b[: site.out_features], config))

    def param_count(self, config: VeraConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        return config.r + site.out_features


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Vera()]
