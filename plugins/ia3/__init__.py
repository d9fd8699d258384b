"""(IA)^3 (Liu et al. 2022): learned scale vectors on a linear's output, or on its input for FFN sites."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field, field_validator

import pefc


class IA3Config(pefc.AdapterConfig):
    method: Literal["ia3"] = "ia3"
    default_target: ClassVar[tuple[str, ...]] = ("@attn.k", "@attn.v", "@mlp.down")
    feedforward: list[str] = Field(
        default_factory=lambda: ["@mlp.down"],
        description="Targets scaled on the input side (roles or path globs); the others scale the output.")

    @field_validator("feedforward")
    @classmethod
    def _selectors_not_blank(cls, value: list[str]) -> list[str]:
        if any(not item.strip() or item.strip() == "@" for item in value):
            raise ValueError("a feedforward selector must be a role like '@mlp.down' or a module-path glob")
        return value

    def is_feedforward(self, site: pefc.Site) -> bool:
        return any(pefc.selector_matches(selector, site) for selector in self.feedforward)


class IA3(pefc.Method):
    name = "ia3"
    config = IA3Config
    site_kinds = ("linear",)
    mergeable = True
    selectable = True
    description = "Learned rescaling of attention k/v outputs and FFN inputs (Liu et al. 2022, (IA)^3)"

    def rewrite(self, ctx: pefc.RewriteContext, config: IA3Config, sites: Sequence[pefc.Site]) -> None:
        from pefc_plugins.ia3.modules import IA3Input, IA3Output

        for site in sites:
            assert isinstance(site, pefc.LinearSite)
            if config.is_feedforward(site):
                ctx.wrap_input(site, IA3Input(site.in_features))
            else:
                ctx.wrap_output(site, IA3Output(site.out_features))

    def param_count(self, config: IA3Config, site: pefc.Site) -> int:
        assert isinstance(site, pefc.LinearSite)
        return site.in_features if config.is_feedforward(site) else site.out_features


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [IA3()]

