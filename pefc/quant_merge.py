"""Merging over a quantized base: dequantize, fold, and (optionally) quantize again with a measured error.

:func:`dequantize_sites` turns quantized linears into float parameters ``<site>.weight`` in the
compute dtype so the methods' fold rules run on plain weights (the merged model then equals the
unmerged one to float rounding). With ``quantize=True``, :func:`requantize_sites` stores the
folded weights back in the base's format and :func:`measure_error` records what that costs:
max and mean |Δ| of the outputs against the unmerged model on the capture's inputs, and the
error of each re-quantized weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from pefc.errors import PefcError
from pefc.quant import dequantize_site, format_of_buffer, quantize_weight, stored_buffers
from pefc.sites import LinearSite, find_sites

if TYPE_CHECKING:
    from pefc.compiled import CompiledModel


@dataclass
class QuantizationError:
    """What re-quantizing the merged weights changed, measured against the unmerged model."""

    method: str
    max_abs_logits: float
    mean_abs_logits: float
    #: per re-quantized site: max and mean |W_folded - dequantize(quantize(W_folded))|
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    #: what re-quantized the weights, for an ONNX export (e.g. ``onnxruntime MatMulBnb4Quantizer (NF4), block 64``)
    tool: str | None = None

    def worst_sites(self, n: int = 3) -> list[str]:
        return sorted(self.sites, key=lambda s: -self.sites[s]["max_abs"])[:n]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantized_sites(model: fx.GraphModule) -> dict[str, LinearSite]:
    """The quantized linear sites of ``model``, by the name of their codes buffer."""
    return {s.weight_name: s for s in find_sites(model).of_kind("linear")
            if isinstance(s, LinearSite) and s.quantized}


def float_weight_name(site: LinearSite) -> str:
    return site.weight_name.rpartition(".")[0] + ".weight"


@torch.no_grad()
def dequantize_sites(model: fx.GraphModule, sites: list[LinearSite], *, keep: bool = False) -> dict[str, fx.Node]:
    """Make each site read a float parameter ``<site>.weight`` (its dequantized weight) instead.

    Returns each site's dequantization node by site path; ``keep`` keeps those nodes (unused) in
    the graph for :func:`requantize_sites`, else they are erased.
    """
    chains: dict[str, fx.Node] = {}
    for site in sites:
        name = float_weight_name(site)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_parameter(
            leaf, nn.Parameter(dequantize_site(model, site).clone(), requires_grad=False))
        dequantized = site.node.args[1]
        assert isinstance(dequantized, fx.Node)
        with model.graph.inserting_before(site.node):
            attr = model.graph.get_attr(name)
        dequantized.replace_all_uses_with(attr)
        chains[site.path] = dequantized
        if not keep:
            _erase_unused(model.graph, dequantized)
    return chains


@torch.no_grad()
def drop_stored(model: fx.GraphModule, sites: list[LinearSite]) -> None:
    """Remove the buffers that stored the sites' quantized weights (no node reads them any more)."""
    for site in sites:
        fmt, prefix = _format(site)
        owner = model.get_submodule(prefix)
        for buffer in fmt.buffers:
            if hasattr(owner, buffer):
                delattr(owner, buffer)


@torch.no_grad()
def requantize_sites(model: fx.GraphModule, sites: list[LinearSite], chains: dict[str, fx.Node], config: Any,
                     compute_dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Store each site's float ``<site>.weight`` in the site's format again; return per-site weight errors.

    The quantized buffers get the new values (same shapes), the graph reads them through the
    dequantization nodes kept by :func:`dequantize_sites`, and the float parameter is removed.
    """
    errors: dict[str, dict[str, float]] = {}
    for site in sites:
        fmt, prefix = _format(site)
        name = float_weight_name(site)
        owner = model.get_submodule(prefix)
        folded = owner.weight.detach()
        buffers = quantize_weight(folded, config, compute_dtype)
        for key, value in buffers.items():
            getattr(owner, key).copy_(value)
        restored = fmt.dequantize(stored_buffers(model, site), (site.out_features, site.in_features))
        diff = (restored.float() - folded.float()).abs()
        errors[site.path] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
        attr = next(n for n in model.graph.nodes if n.op == "get_attr" and n.target == name)
        attr.replace_all_uses_with(chains[site.path])
        model.graph.erase_node(attr)
        delattr(owner, "weight")
    return errors


@torch.no_grad()
def measure_error(unmerged: CompiledModel, merged: CompiledModel, method: str,
                  sites: dict[str, dict[str, float]]) -> QuantizationError:
    """Max and mean |Δ outputs| of ``merged`` against ``unmerged`` on the capture's inputs (eval mode)."""
    from pefc.capture import module_device
    from pefc.source import example_inputs

    device = module_device(unmerged) or torch.device("cpu")
    if device.type == "meta":
        raise PefcError("cannot measure the error of a re-quantized merge planned on the meta device (no values)",
                        hint="compile without --meta / device='meta'")
    inputs = example_inputs(unmerged.pefc.spec, device=device)
    modes = unmerged.training, merged.training
    unmerged.eval()
    merged.eval()
    try:
        want = [t for t in pytree.tree_leaves(unmerged(**inputs)) if _floating(t)]
        got = [t for t in pytree.tree_leaves(merged(**inputs)) if _floating(t)]
    finally:
        unmerged.train(modes[0])
        merged.train(modes[1])
    diffs = torch.cat([(w.float() - g.float()).abs().flatten() for w, g in zip(want, got, strict=True)])
    return QuantizationError(method, float(diffs.max()), float(diffs.mean()), sites)


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _format(site: LinearSite) -> Any:
    found = format_of_buffer(site.weight_name)
    assert found is not None
    return found


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and, recursively, the inputs that no other node uses."""
    if node.users or node.op in ("placeholder", "output"):
        return
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    for parent in inputs:
        _erase_unused(graph, parent)


def compute_dtype(spec: Any) -> torch.dtype:
    from pefc.quant import compute_dtype_of

    return compute_dtype_of(spec)


def describe_error(error: dict[str, Any], threshold: float, observed: float = 0.0) -> str:
    """One line on a re-quantized merge's measured error, and a warning naming the worst sites when it, or
    ``observed`` (e.g. the error ``--verify`` found on other shapes), exceeds ``threshold``."""
    measured = QuantizationError(**error)
    what = f"re-quantized export ({measured.method}, {measured.tool})" if measured.tool else \
        f"re-quantized merge ({measured.method})"
    line = (f"{what}: vs unmerged on the capture's inputs, max |delta logits| = "
            f"{measured.max_abs_logits:.3g}, mean = {measured.mean_abs_logits:.3g} ({len(measured.sites)} sites)")
    if max(measured.max_abs_logits, observed) > threshold:
        worst = ", ".join(f"{s} (max |delta W| {measured.sites[s]['max_abs']:.3g})" for s in measured.worst_sites())
        line += (f"\nwarning: the re-quantized model differs from the unmerged one by more than {threshold:g}; "
                 f"worst sites: {worst}. Export without --quantize for an exact float model.")
    return line
