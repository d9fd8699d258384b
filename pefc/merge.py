"""Folding mergeable adapters into the base weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from pefc.graphutil import attr_value
from pefc.rewrite import Insertion, SiteModule

if TYPE_CHECKING:
    from pefc.compiled import CompiledModel


def merge_model(model: CompiledModel, *, skip_methods: set[str] | frozenset[str] = frozenset(),
                quantize: bool = False) -> CompiledModel:
    """Copy ``model`` and fold every insertion of a mergeable method (not in ``skip_methods``).

    Adapters selected per row (``select``) are never folded, nor the others at their sites.
    Output-side modules fold innermost first (graph order), then input-side modules outermost
    first, which keeps the result exact when several adapters share a site.

    Over a quantized base every quantized weight becomes a float parameter first (exact); with
    ``quantize=True`` only the folded ones do, and are quantized again afterwards, the measured
    error going to ``extras["quantization_error"]`` (:mod:`pefc.quant_merge`).
    """
    from pefc import quant_merge
    from pefc.quant import base_format

    merged = model.clone()
    state = merged.pefc
    selected_sites = {ins.site_path for ins in state.insertions if ins.placement == "rows"}  # kept exact: unfolded
    foldable = [ins for ins in state.insertions if state.mergeable.get(ins.method)
                and ins.method not in skip_methods and ins.placement in ("output", "input")
                and ins.site_path not in selected_sites]
    stored = quant_merge.quantized_sites(merged) if base_format(merged) else {}
    folded = {ins.weight_name for ins in foldable}
    targets = [s for name, s in stored.items() if name in folded or not quantize]
    chains = quant_merge.dequantize_sites(merged, targets, keep=quantize)
    renamed = {s.weight_name: quant_merge.float_weight_name(s) for s in targets}
    for ins in state.insertions:
        if ins.weight_name in renamed:
            ins.weight_name, ins.weight_layout = renamed[ins.weight_name], "out_in"
    nodes = {n.name: n for n in merged.graph.nodes}
    order = {n: i for i, n in enumerate(merged.graph.nodes)}
    outputs = sorted((i for i in foldable if i.placement == "output"), key=lambda i: order[nodes[i.node]])
    inputs = sorted((i for i in foldable if i.placement == "input"), key=lambda i: -order[nodes[i.node]])
    for ins in [*outputs, *inputs]:
        _fold_one(merged, ins, nodes[ins.node])
    _drop_unused_attrs(merged.graph)
    if quantize and targets:
        config = state.spec.model.quantize
        errors = quant_merge.requantize_sites(merged, targets, chains, config, quant_merge.compute_dtype(state.spec))
        merged.graph.lint()
        merged.recompile()
        state.extras = {**state.extras, "quantization_error": quant_merge.measure_error(
            model, merged, config.method, errors).to_dict()}
    elif not quantize:
        quant_merge.drop_stored(merged, targets)
    merged.graph.lint()
    merged.recompile()
    state.insertions = [i for i in state.insertions if i not in foldable]
    state.extras = {**state.extras, "merged": sorted({i.adapter for i in foldable})}
    for name in {i.adapter for i in foldable}:
        if not any(i.adapter == name for i in state.insertions) and hasattr(merged, name):
            delattr(merged, name)
    return merged


@torch.no_grad()
def _fold_one(model: fx.GraphModule, ins: Insertion, node: fx.Node) -> None:
    module = model.get_submodule(ins.module)
    if not isinstance(module, SiteModule):
        raise TypeError(f"{ins.module} ({type(module).__name__}) is not a SiteModule and cannot be folded")
    weight_param = attr_value(model, ins.weight_name)
    bias_param = attr_value(model, ins.bias_name) if ins.bias_name else None
    weight = weight_param if ins.weight_layout == "out_in" else weight_param.t()
    new_weight, new_bias = module.fold(weight.detach(), bias_param.detach() if bias_param is not None else None)
    if (new_bias is None) != (bias_param is None):
        raise ValueError(f"{ins.module}: fold must keep the site's bias presence")
    weight_param.data = (new_weight if ins.weight_layout == "out_in" else new_weight.t()).to(
        weight_param.dtype).contiguous()
    if bias_param is not None and new_bias is not None:
        bias_param.data = new_bias.to(bias_param.dtype).contiguous()
    replacement = node.args[1] if ins.placement == "output" else node.args[0]
    node.replace_all_uses_with(replacement)
    model.graph.erase_node(node)
    parent, _, leaf = ins.module.rpartition(".")
    delattr(model.get_submodule(parent), leaf)


def _drop_unused_attrs(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and node.meta.get("pefc_inserted"):
            graph.erase_node(node)
