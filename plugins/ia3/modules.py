"""(IA)^3's modules: output-side and input-side scale vectors, with their folds."""

from __future__ import annotations

import torch
from torch import nn

import pefc


class IA3Output(pefc.SiteModule):
    """``y * l`` (the bias is scaled too, as in HF PEFT); ``l: [out]``, ones at init."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.ia3_l.to(y.dtype)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = self.ia3_l.to(weight.dtype)
        return weight * scale[:, None], bias * scale if bias is not None else None


class IA3Input(pefc.SiteModule):
    """``x * l`` fed to the linear; ``l: [in]``, ones at init."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.to(x.dtype)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight * self.ia3_l.to(weight.dtype)[None, :], bias

