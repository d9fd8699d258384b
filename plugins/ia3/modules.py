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

    def row_values(self) -> dict[str, str | float]:
        return {"l": "ia3_l"}

    def rowwise(self) -> nn.Module:
        from pefc_plugins.ia3.rowwise import IA3Rows

        return IA3Rows(output=True)


class IA3Input(pefc.SiteModule):
    """``x * l`` fed to the linear; ``l: [in]``, ones at init."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.to(x.dtype)

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return weight * self.ia3_l.to(weight.dtype)[None, :], bias

    def row_values(self) -> dict[str, str | float]:
        return {"l": "ia3_l"}

    def rowwise(self) -> nn.Module:
        from pefc_plugins.ia3.rowwise import IA3Rows

        return IA3Rows(output=False)

