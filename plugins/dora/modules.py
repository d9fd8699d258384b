"""DoRA's module: the magnitude-scaled LoRA update, its factored row norm and its fold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pefc_plugins.dora import DoraConfig
from pefc_plugins.lora.modules import LoraUpdate
from torch import nn


class DoraUpdate(LoraUpdate):
    """``y' = g * (W0 x + s B A x) + b`` with ``g = m / ||W0 + s B A||_row`` (no gradient to the norm).

    ``g`` is computed in float32 (the norm and ``m``) and applied in the output's dtype.
    While training with dropout, ``drop(x)`` replaces ``x`` as ``dropout_scope`` says (see the module).

    ``weight`` arrives in the site's stored layout (``out_in`` or ``in_out``). The norm is
    factored so ``W0 + s B A`` is never formed:
    ``n² = ||W0||² + 2 s rowsum(W0 Aᵀ ⊙ B) + s² rowsum(B (A Aᵀ) ⊙ B)``. ``||W0||²`` is cached
    per weight storage and version (W0 is frozen; a load or a move recomputes it), the norm
    per version of ``W0``, ``A`` and ``B``: once per optimizer step while training (a
    checkpointed layer's second forward reuses it), once in all for inference.
    """

    def __init__(self, weight: torch.Tensor, config: DoraConfig, layout: str) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, config)
        self.layout = layout
        self.dropout_scope = config.dropout_scope
        self.lora_magnitude_vector = nn.Parameter(torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32))
        self._sq_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._norm_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, down: torch.Tensor | None = None) -> torch.Tensor:
        """``down`` (fused, :mod:`pefc.fusion`): ``x`` is dropped already and ``down = x Aᵀ``."""
        g = self._magnitude_scale(weight, y.dtype)
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if dropping and down is None:
            x = self.dropout(x)
        h = self._scaled_down(x) if down is None else down * self.scaling
        if dropping and self.dropout_scope == "update":
            base = self._base(x.to(weight.dtype), weight)  # as HF PEFT: W0 drop(x) in the correction too
            return y + (g - 1) * base + g * (h @ self.lora_B.t()).to(y.dtype)
        scaled = g * self.add_scaled(y - bias if bias is not None else y, h)  # g (W0 x + s B A x)
        return scaled + bias if bias is not None else scaled

    def fuses_base(self) -> bool:
        """The fused form is ``g (W0 x + s B A d(x))``: not HF PEFT's ``dropout_scope: update`` in training."""
        return not (self.training and isinstance(self.dropout, nn.Dropout) and self.dropout_scope == "update")

    def finish(self, acc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The output from ``acc = W0 x + b + s B A d(x)``."""
        g = self._magnitude_scale(weight, acc.dtype)
        return g * acc if bias is None else g * (acc - bias) + bias

    def _magnitude_scale(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``g = m / ||W0 + s B A||_row`` in ``dtype``."""
        return (self.lora_magnitude_vector / self.weight_norm(weight)).to(dtype)

    def _base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if self.layout == "in_out" else F.linear(x, weight)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Row norms ``[out]`` of ``W0 + s B A`` in float32 whatever the dtypes (a low-precision W0 is
        upcast for ``W0 Aᵀ``; float64 stays float64); an all-zero row gets 1 (its output is 0 at any scale).
        No gradient flows to it."""
        return self._cached("_norm_cache", (weight, self.lora_A, self.lora_B),
                            lambda: self._factored_norm(weight, self.weight_sq_norm(weight)))

    def _factored_norm(self, weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
        dtype = _at_least_float32(weight.dtype, self.lora_A.dtype)
        a, b, s = self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling
        w = weight.to(dtype)
        w0_at = (a @ w).t() if self.layout == "in_out" else w @ a.t()  # [out, r]
        both = torch.addmm(w0_at, b, a @ a.t(), beta=2 * s, alpha=s * s)  # 2s W0 Aᵀ + s² B A Aᵀ
        sq = sq_norm.to(dtype) + torch.linalg.vecdot(both, b)
        return torch.where(sq > 0, sq, 1.0).sqrt()  # a zero (or rounded below zero) row: 1

    @property
    def _row_dim(self) -> int:
        return 0 if self.layout == "in_out" else 1

    def weight_sq_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W0_i||²`` in float32 (or wider), cached while the weight's storage and version stay the same."""
        return self._cached("_sq_cache", (weight,), lambda: _sq_row_norm(weight, self._row_dim))

    def _cached(self, slot: str, tensors: tuple[torch.Tensor, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()`` without gradient, kept in ``self.<slot>`` while ``tensors`` (and the scaling) are
        unchanged (see :func:`_version_key`); computed afresh on every call while tracing."""
        if _tracing(*tensors):
            with torch.no_grad():
                return compute()
        key = (*(_version_key(t) for t in tensors), self.scaling)
        cached = getattr(self, slot)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # this order: inference_mode(False) enables grad
                cached = (key, compute())
            setattr(self, slot, cached)
        return cached[1]

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged = weight + self.delta_weight().to(weight.dtype)
        norm = _nonzero(torch.linalg.vector_norm(merged, dim=1))
        return (self.lora_magnitude_vector.to(merged.dtype) / norm)[:, None] * merged, bias

    # -- per-row selection (the rows compute in pefc_plugins.dora.rowwise) --

    def row_values(self) -> dict[str, str | float]:
        return {**super().row_values(), "magnitude": "lora_magnitude_vector"}

    def row_key(self) -> tuple[Any, ...]:
        return ("dora", *super().row_key()[1:], self.dropout_scope, self.layout)

    def rowwise(self) -> nn.Module:
        from pefc_plugins.dora.rowwise import DoraRows

        return DoraRows(super().row_key()[1], self.dropout_scope, self.layout)


def _version_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Changes whenever ``tensor``'s values may have: another storage, an in-place update, a cast or a move."""
    return tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device, tuple(tensor.shape)


def _sq_row_norm(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.linalg.vector_norm(weight, dim=dim, dtype=_at_least_float32(weight.dtype)).square()


def _at_least_float32(*dtypes: torch.dtype) -> torch.dtype:
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _nonzero(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def _tracing(*tensors: torch.Tensor) -> bool:
    """Under torch.compile / torch.export (fake tensors) or with tensor subclasses (DTensor) no cache is kept."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or any(type(t) not in (torch.Tensor, nn.Parameter) for t in tensors))


