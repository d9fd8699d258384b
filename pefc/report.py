"""Parameter reports: per adapter, site and method, as a table or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SiteReport:
    path: str
    role: str | None
    kind: str
    params: int
    layer: int | None = None


@dataclass
class AdapterReport:
    name: str
    method: str
    params: int
    mergeable: bool
    sites: list[SiteReport] = field(default_factory=list)
    shared_params: int = 0
    formula_params: int | None = None  # the method's paper formula, for checking
    extra: dict[str, Any] = field(default_factory=dict)


def dtype_name(dtypes: set[Any]) -> str | None:
    """``"float32"`` for one torch dtype, ``"mixed (bfloat16, float32)"`` for several, None for none."""
    names = sorted(str(d).removeprefix("torch.") for d in dtypes)
    return None if not names else names[0] if len(names) == 1 else f"mixed ({', '.join(names)})"


@dataclass
class ParameterReport:
    base_params: int
    trainable_params: int
    adapters: list[AdapterReport]
    base_dtype: str | None = None
    adapter_dtype: str | None = None  # "mixed (...)" when the adapters differ
    #: bytes of the base's parameters and buffers as stored (quantized weights: their codes and scales)
    base_bytes: int | None = None
    #: the base's weight storage format when quantized (``nf4``, ``int8``), else None
    quantized: str | None = None

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.trainable_params / self.base_params if self.base_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["percent_of_base"] = round(self.percent_of_base, 6)
        for adapter in data["adapters"]:
            adapter["percent_of_base"] = round(100.0 * adapter["params"] / self.base_params, 6) \
                if self.base_params else 0.0
            extra = adapter.pop("extra")
            adapter.update(extra)
        return data

    def table(self, *, sites: bool = True) -> str:
        """A plain-text table: one line per adapter, then (optionally) one per site."""
        lines = [f"base params:      {self.base_params:,}",
                 *([f"base stored:      {self.base_bytes / 1e9:.3f} GB"
                    + (f" ({self.quantized} weights)" if self.quantized else "")] if self.base_bytes is not None else []),
                 f"trainable params: {self.trainable_params:,} ({self.percent_of_base:.4f}% of base)"]
        if self.adapter_dtype:
            lines.append(f"dtypes:           base {self.base_dtype}, adapters {self.adapter_dtype}" + (
                " (float32 adapters by default over a half-precision base; spec key adapter_dtype sets them)"
                if self.adapter_dtype != self.base_dtype else ""))
        lines.append("")
        header = f"{'adapter':<16} {'method':<9} {'sites':>5} {'params':>14} {'% base':>9}  mergeable"
        lines += [header, "-" * len(header)]
        for a in self.adapters:
            pct = 100.0 * a.params / self.base_params if self.base_params else 0.0
            lines.append(f"{a.name:<16} {a.method:<9} {len(a.sites):>5} {a.params:>14,} {pct:>8.4f}%  "
                         f"{'yes' if a.mergeable else 'no'}")
            lines += [f"{'':<4}{k}: {v}" for k, v in a.extra.items()]
        if sites:
            lines += ["", f"{'adapter':<16} {'site':<48} {'role':<10} {'params':>12}"]
            for a in self.adapters:
                for s in a.sites:
                    lines.append(f"{a.name:<16} {s.path:<48} {('@' + s.role) if s.role else '-':<10} {s.params:>12,}")
                if a.shared_params:
                    lines.append(f"{a.name:<16} {'(shared by all sites)':<48} {'':<10} {a.shared_params:>12,}")
        return "\n".join(lines)
