"""LoRA's module: the low-rank update placed at each linear site."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pefc_plugins.lora import LoraConfig
from pefc_plugins.lora.dropout import MaskDropout
from torch import nn

import pefc


class LoraUpdate(pefc.SiteModule):
    """``y + s * B A dropout(x)``; ``A: [r, in]``, ``B: [out, r]``."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = MaskDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling()
        self.shared_mask = config.dropout_masks == "shared"
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B A x`` (no dropout), in the adapter's dtype."""
        return self._scaled_down(x) @ self.lora_B.t()

    def add_scaled(self, y: torch.Tensor, h: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``y + scale * h Bᵀ`` for a rank-``r`` activation ``h``. Where the dtypes agree the scale
        and the sum are fused into the last product (``addmm``'s ``alpha``): no extra pass over the
        ``[tokens, out]`` output nor over ``h``. Exported graphs keep product and sum apart and scale
        ``h`` (runtimes fuse them; onnxruntime's Gemm refuses the rank-0 LoRA inputs of
        ``export_onnx(lora_inputs=True)``)."""
        if h.dtype != y.dtype or torch.compiler.is_exporting():
            h = h * scale if scale != 1.0 else h
            return y + (h @ self.lora_B.t()).to(y.dtype)
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=scale)
        return flat.view(y.shape)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` in the adapter's dtype."""
        return F.linear(x.to(self.lora_A.dtype), self.lora_A)

    def _scaled_down(self, x: torch.Tensor) -> torch.Tensor:
        return self._down(x) * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor, down: torch.Tensor | None = None) -> torch.Tensor:
        """``down`` (fused, :mod:`pefc.fusion`): ``x`` is dropped already and ``down = x Aᵀ``.
        Dropout runs only while training (in eval it is the identity: no call per token)."""
        if down is None:
            down = self._down(self.dropout(x) if self.training else x)
        return self.add_scaled(y, down, self.scaling)

    # -- pefc.fusion.SharedInputFusable: sites reading the same input share one A product --------

    fusion_weight = "lora_A"

    @property
    def fusion_dropout(self) -> str | None:
        return "dropout" if isinstance(self.dropout, nn.Dropout) else None

    def fusion_key(self) -> tuple[object, ...] | None:
        """Sites with the same dropout fuse (with dropout, only if the adapter shares masks)."""
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return None if p > 0 and not self.shared_mask else (type(self).__name__, p, self.lora_A.dtype)

    # -- pefc.fusion.BaseFusable: the base product and this update as one node ---------------

    fusion_up = "lora_B"

    @property
    def fusion_scale(self) -> float:
        return self.scaling

    def fuses_base(self) -> bool:
        return True

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The output from ``acc = y + s B A x``: itself."""
        return acc

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight + self.delta_weight().to(weight.dtype), bias


    # -- per-row selection (the rows compute in pefc_plugins.lora.rowwise) --

    def row_values(self) -> dict[str, str | float]:
        return {"a": "lora_A", "b": "lora_B", "scaling": self.scaling}

    def row_key(self) -> tuple[object, ...]:
        return ("lora", _dropout_p(self.dropout))

    def rowwise(self) -> nn.Module:
        from pefc_plugins.lora.rowwise import LoraRows

        return LoraRows(_dropout_p(self.dropout))


def _dropout_p(dropout: nn.Module) -> float:
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0
