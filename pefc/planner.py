"""Plans a spec at scale: its parameter report without capturing every decoder layer.

``torch.export`` traces every decoder layer again, so capturing a 70B model costs about
80 times one layer, for a report that needs only one layer's sites. :func:`plan` builds the
model on the meta device (no weight is allocated), finds its *layer stacks* — a
``ModuleList`` of distinct modules of one class with the same parameter and buffer names,
shapes and dtypes — and captures a copy of the model cut to the first two layers of each
stack, with static sizes (sites do not depend on them, and symbolic sizes cost three
quarters of a capture). The two layers must show the same sites (the second is the last in
the cut, so a first- or last-layer special case shows up); the first layer's sites are then
replicated across the stack with the layer index changed in their paths and parameter
names. Target matching, the methods' site validation and their parameter formulas run on
that full list of sites exactly as :func:`pefc.compile` runs them on a full capture
(``tests/test_planning.py`` proves the reports equal).

It falls back to a full capture on the meta device, and says why in :attr:`Plan.reason`,
when the model has no such stack, the cut model does not capture, the two layers differ,
the stack's sites are interleaved with others, or a method gives no parameter formula.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch
from torch import nn

from pefc.compiler import base_info, capture_with_spec_inputs, compile_graph, formula_params, select_sites
from pefc.errors import CaptureError, SpecError
from pefc.hfcheck import raise_hf_issues
from pefc.quant import QuantizedLinear, base_format, quantize_spec_model, stored_bytes
from pefc.registry import Registry, default_registry
from pefc.report import AdapterReport, ParameterReport, SiteReport, dtype_name
from pefc.rewrite import default_adapter_dtype
from pefc.schema import SpecBase
from pefc.sites import Site, find_sites, layer_of
from pefc.source import build_model, torch_dtype

#: Layers of each stack that the cut model keeps (the second checks the first).
CUT_DEPTH = 2


@dataclass
class Plan:
    """What ``pefc inspect --meta`` reports: matched sites and exact parameter counts."""

    report: ParameterReport
    #: every site of the full model, in graph order (replicated ones hold the cut graph's nodes)
    sites: list[Site]
    #: ``"replicated"`` (cut model, sites replicated) or ``"full"`` (full capture on meta)
    strategy: str
    #: each replicated stack's module path and its number of layers
    stacks: dict[str, int] = field(default_factory=dict)
    #: why the plan took a full capture (None when it replicated)
    reason: str | None = None
    seconds: float = 0.0

    def parameter_report(self) -> ParameterReport:
        return self.report

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON form (as ``pefc inspect --json``) plus a ``plan`` entry."""
        data = self.report.to_dict()
        data["plan"] = {"strategy": self.strategy, "stacks": dict(self.stacks), "reason": self.reason,
                        "seconds": round(self.seconds, 3)}
        return data


class _CannotReplicate(Exception):
    """The model's layers cannot be planned from a cut copy; the message says why."""


def plan(spec: SpecBase, *, registry: Registry | None = None, replicate: bool = True,
         trust_code: bool = False) -> Plan:
    """Plan ``spec`` on the meta device: the parameter report of :func:`pefc.compile`, fast.

    ``replicate=False`` captures the whole model (as ``pefc.compile(spec, device="meta")``).
    ``trust_code=True`` consents to import and call the spec's ``model.python`` (:mod:`pefc.trust`).
    """
    registry = registry or default_registry()
    started = time.perf_counter()
    if spec.model is None:
        raise SpecError("the spec has no model to plan; planning builds the model from its `model` section")
    raise_hf_issues(spec)
    model = quantize_spec_model(spec, build_model(spec.model, device="meta", trust_code=trust_code))
    reason = "replication turned off"
    if replicate:
        try:
            stacks = layer_stacks(model)
            sites = _replicated_sites(spec, model, stacks, registry)
            report = _report(spec, model, sites, registry)
        except _CannotReplicate as exc:
            reason = str(exc)
        else:
            return Plan(report, sites, "replicated", {path: len(stack) for path, stack in stacks.items()},
                        seconds=time.perf_counter() - started)
    return _full_plan(spec, model, registry, reason, started)


def _full_plan(spec: SpecBase, model: nn.Module, registry: Registry, reason: str, started: float) -> Plan:
    """What ``pefc.compile(spec, device="meta")`` reports, with the sites it found."""
    graph_module = capture_with_spec_inputs(spec, model)
    compiled, sites = compile_graph(spec, graph_module, base_info(model), model.training, registry,
                                    started=started)
    return Plan(compiled.parameter_report(), sites, "full", reason=reason, seconds=time.perf_counter() - started)


# -- layer stacks -----------------------------------------------------------------------------

def layer_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The outermost ``ModuleList``s of more than :data:`CUT_DEPTH` distinct, identically shaped modules."""
    stacks: dict[str, nn.ModuleList] = {}
    for path, module in model.named_modules():
        if any(path.startswith(stack + ".") for stack in stacks):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > CUT_DEPTH and _identical_layers(module):
            stacks[path] = module
    if not stacks:
        raise _CannotReplicate("the model has no stack of identical layers")
    return stacks


def _identical_layers(layers: nn.ModuleList) -> bool:
    """Distinct modules (no shared parameters) with one structure."""
    first = _structure(layers[0])
    owners: set[int] = set()
    for layer in layers:
        tensors = {id(t) for t in (*layer.parameters(), *layer.buffers())}
        if tensors & owners or _structure(layer) != first:
            return False
        owners |= tensors
    return True


def _structure(module: nn.Module) -> tuple[Any, ...]:
    modules = tuple((name, type(m)) for name, m in module.named_modules())
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters(remove_duplicate=False))
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers(remove_duplicate=False))
    return modules, params, buffers


@contextmanager
def _cut(model: nn.Module, stacks: dict[str, nn.ModuleList]) -> Iterator[None]:
    """Temporarily keep only the first :data:`CUT_DEPTH` layers of each stack."""
    for path, stack in stacks.items():
        _set_submodule(model, path, nn.ModuleList(list(stack)[:CUT_DEPTH]))
    try:
        yield
    finally:
        for path, stack in stacks.items():
            _set_submodule(model, path, stack)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# -- sites ------------------------------------------------------------------------------------

def _replicated_sites(spec: SpecBase, model: nn.Module, stacks: dict[str, nn.ModuleList],
                      registry: Registry) -> list[Site]:
    """The full model's sites, from a capture of the cut model."""
    with _cut(model, stacks):
        try:
            graph_module = capture_with_spec_inputs(spec, model, dynamic=False)
        except CaptureError as exc:
            raise _CannotReplicate(f"the model cut to {CUT_DEPTH} layers per stack does not capture "
                                   f"({exc.message})") from None
    cut_sites = find_sites(graph_module).sites
    sites: list[Site] = []
    for run, stack in _runs(cut_sites, stacks):
        if stack is None:
            sites.extend(run)
            continue
        template = _check_layers_alike(run, stack)
        for index in range(len(stacks[stack])):
            sites.extend(_moved(site, f"{stack}.0", f"{stack}.{index}") for site in template)
    registry.hook.pefc_before_rewrite(graph_module=graph_module, sites=sites, spec=spec)
    return sites


def _runs(sites: Sequence[Site], stacks: dict[str, Any]) -> Iterator[tuple[list[Site], str | None]]:
    """Consecutive sites grouped by the stack they lie in (None: outside every stack)."""
    runs: list[tuple[list[Site], str | None]] = []
    for site in sites:
        stack = next((s for s in stacks if _under(site.path, s)), None)
        if runs and runs[-1][1] == stack:
            runs[-1][0].append(site)
        else:
            runs.append(([site], stack))
    seen = [stack for _, stack in runs if stack is not None]
    if len(seen) != len(set(seen)):
        raise _CannotReplicate("the sites of a layer stack are interleaved with other sites")
    yield from runs


def _check_layers_alike(run: list[Site], stack: str) -> list[Site]:
    """The first layer's sites, after checking that every cut layer has the same ones."""
    layers = [[s for s in run if _under(s.path, f"{stack}.{i}")] for i in range(CUT_DEPTH)]
    first = layers[0]
    for index, layer in enumerate(layers[1:], start=1):
        moved = [_moved(site, f"{stack}.0", f"{stack}.{index}") for site in first]
        if [_signature(s) for s in moved] != [_signature(s) for s in layer]:
            raise _CannotReplicate(f"layers 0 and {index} of {stack} show different sites")
    if run != [site for layer in layers for site in layer]:
        raise _CannotReplicate(f"the layers of {stack} do not run one after the other, in order")
    return first


def _moved(site: Site, old: str, new: str) -> Site:
    """``site`` with the module prefix ``old`` replaced by ``new`` in its path and tensor names."""
    changes = {f.name: _swap(getattr(site, f.name), old, new) for f in fields(site)
               if f.init and isinstance(getattr(site, f.name), str)}
    moved = replace(site, **changes)
    moved.layer = layer_of(moved.path)
    return moved


def _swap(value: str, old: str, new: str) -> str:
    return new + value[len(old):] if _under(value, old) else value


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _signature(site: Site) -> tuple[Any, ...]:
    """What identifies a site apart from its graph nodes."""
    return _graph_free(site)


def _graph_free(value: Any) -> Any:
    """``value`` with every graph node left out (a dataclass as its fields, a list as its items)."""
    if is_dataclass(value) and not isinstance(value, type):
        return tuple((f.name, _graph_free(getattr(value, f.name))) for f in fields(value)
                     if not isinstance(getattr(value, f.name), torch.fx.Node))
    if isinstance(value, (list, tuple)):
        return tuple(_graph_free(v) for v in value if not isinstance(v, torch.fx.Node))
    return value


# -- report -----------------------------------------------------------------------------------

def _report(spec: SpecBase, model: nn.Module, sites: list[Site], registry: Registry) -> ParameterReport:
    """The report :meth:`CompiledModel.parameter_report` gives, from the methods' formulas."""
    taken = {name for name, _ in model.named_children()}
    adapters = []
    for config in spec.adapters:
        method, matched = select_sites(config, sites, registry, taken)
        if formula_params(method, config, matched) is None:
            raise _CannotReplicate(f"method {config.method!r} gives no parameter formula (param_count)")
        per_site = [SiteReport(s.path, s.role, s.kind, method.param_count(config, s), s.layer) for s in matched]
        shared = method.shared_param_count(config, matched)
        total = sum(s.params for s in per_site) + shared
        adapters.append(AdapterReport(config.name, config.method, total, method.mergeable, per_site,
                                      shared_params=shared, formula_params=total,
                                      extra=dict(method.report_extras(config, matched))))
        taken.add(config.name)
    base = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    base_dtype = torch_dtype(spec.model.dtype) if spec.model else torch.float32
    adapter_dtype = torch_dtype(spec.adapter_dtype) if spec.adapter_dtype else default_adapter_dtype(base_dtype)
    return ParameterReport(base, sum(a.params for a in adapters), adapters, base_dtype=dtype_name({base_dtype}),
                           adapter_dtype=dtype_name({adapter_dtype}) if adapters else None,
                           base_bytes=stored_bytes(model), quantized=base_format(model))
