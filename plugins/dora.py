"""DoRA (Liu et al. 2024): W' = m * (W0 + s B A) / ||W0 + s B A||_row, the norm detached (as HF PEFT)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pefc_plugins.lora import Lora, LoraConfig, LoraUpdate
from torch import nn

import pefc


class DoraConfig(LoraConfig):
    method: Literal["dora"] = "dora"  # type: ignore[assignment]


class DoraUpdate(LoraUpdate):
    """``y' = g * (W0 x + s B A drop(x)) + b`` with ``g = m / ||W0 + s B A||_row`` (no gradient to the norm).

    ``g`` is computed in float32 (the norm and ``m``) and applied in the output's dtype.

    ``weight`` arrives in the site's stored layout (``out_in`` or ``in_out``). The norm is
    factored so ``W0 + s B A`` is never formed:
    ``n² = ||W0||² + 2 s rowsum(W0 Aᵀ ⊙ B) + s² rowsum(B (A Aᵀ) ⊙ B)``; ``||W0||²`` is cached
    per weight storage and version (W0 is frozen; a load or a move recomputes it).
    """

    def __init__(self, weight: torch.Tensor, config: DoraConfig, layout: str) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, config)
        self.layout = layout
        self.lora_magnitude_vector = nn.Parameter(torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32))
        self._sq_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        g = (self.lora_magnitude_vector / self.weight_norm(weight)).to(y.dtype)
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)  # as peft: the dropped input feeds the base term of the correction too
            base = self._base(x.to(weight.dtype), weight)
        else:
            base = y - bias if bias is not None else y
        return y + (g - 1) * base + g * self.low_rank(x).to(y.dtype)

    def _base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if self.layout == "in_out" else F.linear(x, weight)

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Row norms ``[out]`` of ``W0 + s B A`` in float32 whatever the dtypes (a low-precision W0 is
        upcast for ``W0 Aᵀ``; float64 stays float64); an all-zero row gets 1 (its output is 0 at any scale)."""
        dtype = _at_least_float32(weight.dtype, self.lora_A.dtype)
        a, b, s = self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling
        w = weight.to(dtype)
        w0_at = (a @ w).t() if self.layout == "in_out" else w @ a.t()  # [out, r]
        cross = (w0_at * b).sum(1)
        low = ((b @ (a @ a.t())) * b).sum(1)
        sq = self.weight_sq_norm(weight).to(dtype) + (2 * s) * cross + (s * s) * low
        return _nonzero(sq.clamp_min(0).sqrt())

    def weight_sq_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W0_i||²`` in float32 (or wider), cached while the weight's storage and version stay the same."""
        dim = 0 if self.layout == "in_out" else 1
        if _tracing(weight):
            return _sq_row_norm(weight, dim)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        if self._sq_cache is None or self._sq_cache[0] != key:
            with torch.inference_mode(False):
                self._sq_cache = (key, _sq_row_norm(weight, dim))
        return self._sq_cache[1]

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged = weight + self.delta_weight().to(weight.dtype)
        norm = _nonzero(torch.linalg.vector_norm(merged, dim=1))
        return (self.lora_magnitude_vector.to(merged.dtype) / norm)[:, None] * merged, bias


def _sq_row_norm(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.linalg.vector_norm(weight, dim=dim, dtype=_at_least_float32(weight.dtype)).square()


def _at_least_float32(*dtypes: torch.dtype) -> torch.dtype:
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _nonzero(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def _tracing(weight: torch.Tensor) -> bool:
    """Under torch.compile / torch.export (fake tensors) no cache is kept."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or type(weight) not in (torch.Tensor, nn.Parameter))


class Dora(Lora):
    name = "dora"
    config = DoraConfig
    description = "Weight-decomposed low-rank adaptation: magnitude x LoRA-updated direction (Liu et al. 2024)"

    def rewrite(self, ctx: pefc.RewriteContext, config: DoraConfig, sites: Sequence[pefc.Site]) -> None:
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
