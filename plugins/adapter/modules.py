"""The bottleneck adapter module."""

from __future__ import annotations

import torch
from pefc_plugins.adapter import BottleneckConfig
from torch import nn

import pefc

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU,
                                           "tanh": nn.Tanh}


class Bottleneck(pefc.SiteModule):
    """``y + s * up(f(down(h)))`` with ``h = y`` (sequential) or ``h = x`` (parallel)."""

    def __init__(self, d_in: int, size: int, d_out: int, config: BottleneckConfig) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, size)  # kaiming-uniform, as nn.Linear
        self.act = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(size, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.parallel = config.placement == "parallel"
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (x if self.parallel else y).to(self.down.weight.dtype)
        return y + (self.up(self.act(self.down(h))) * self.scaling).to(y.dtype)

    def row_values(self) -> dict[str, str | float]:
        return {"down": "down.weight", "down_bias": "down.bias", "up": "up.weight", "up_bias": "up.bias",
                "scaling": self.scaling}

    def row_key(self) -> tuple[object, ...]:
        return ("bottleneck", self.parallel, type(self.act).__name__)

    def rowwise(self) -> nn.Module:
        from pefc_plugins.adapter.rowwise import BottleneckRows

        return BottleneckRows(type(self.act)(), self.parallel)

