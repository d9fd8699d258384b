"""The compile driver: spec -> model -> capture -> sites -> plugin rewrites -> CompiledModel."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pefc import capture_cache, fxsource
from pefc.call import loss_inputs, split_loss
from pefc.capture import capture, module_device
from pefc.compiled import CompiledModel, CompileState
from pefc.config import AdapterConfig
from pefc.errors import PefcError, PluginError, SpecError, TargetError
from pefc.examples import normalize_examples
from pefc.hfcheck import raise_hf_issues
from pefc.method import Method
from pefc.quant import quantize_spec_model, quantized_params
from pefc.registry import Registry, default_registry
from pefc.rewrite import Insertion, RewriteContext
from pefc.schema import SpecBase
from pefc.sites import Site, SiteMap, find_sites
from pefc.source import build_model, example_inputs, torch_dtype
from pefc.targets import match_sites
from pefc.trainable import saved_parameters
from pefc.trust import require_consent

if TYPE_CHECKING:
    from pefc.selection import Selection


def compile(spec: SpecBase, model: nn.Module | None = None, example_inputs: dict[str, Any] | None = None,
            *, device: str | None = None, registry: Registry | None = None,
            trust_code: bool = False) -> CompiledModel:
    """Compile ``spec`` into a trainable :class:`CompiledModel`.

    With ``model`` (and optionally ``example_inputs``) the given module is used instead of
    ``spec.model``; the spec's ``inputs`` name the dynamic dims of the example tensors (a
    ``model.quantize`` in the spec quantizes the given module's linears in place).
    ``device="meta"`` plans without allocating weights. ``trust_code=True`` consents to import and
    call the spec's ``model.python`` (:mod:`pefc.trust`); a ``model`` given here needs no consent.
    """
    registry = registry or default_registry()
    started = time.perf_counter()
    if model is None:
        graph_module, info, training = _capture_spec_model(spec, device, trust_code)
    else:
        graph_module, info, training = _capture_given_model(spec, model, example_inputs)
    return compile_graph(spec, graph_module, info, training, registry, started=started)[0]


def compile_built(spec: SpecBase, model: nn.Module, *, registry: Registry | None = None) -> CompiledModel:
    """:func:`compile` with ``model``, a fresh, unchanged build of ``spec.model`` (what :func:`compile`
    would build): a capture of ``spec.model`` in :mod:`pefc.capture_cache` is reused, else ``model``
    is captured (and cached) instead of building the model again."""
    started = time.perf_counter()
    graph_module, info, training = _capture_spec_model(spec, None, built=model)
    return compile_graph(spec, graph_module, info, training, registry or default_registry(), started=started)[0]


def compile_graph(spec: SpecBase, graph_module: Any, info: dict[str, Any], training: bool, registry: Registry,
                  *, started: float) -> tuple[CompiledModel, list[Site]]:
    """Rewrite a captured ``graph_module`` into a :class:`CompiledModel`; also return the base
    model's sites (as found before any adapter was inserted). ``started``: when compiling began."""
    capture_seconds = time.perf_counter() - started
    base_params = sum(p.numel() for p in graph_module.parameters())
    loss_head = split_loss(graph_module, loss_inputs(spec))  # labels: the loss runs apart, when given
    saved = saved_parameters(graph_module, getattr(spec, "modules_to_save", []))
    base_node_count = len(graph_module.graph.nodes)
    sites = find_sites(graph_module)
    base_params += quantized_params(sites.sites)  # quantized weights are buffers, not parameters
    registry.hook.pefc_before_rewrite(graph_module=graph_module, sites=sites.sites, spec=spec)
    formula: dict[str, int | None] = {}
    extras: dict[str, dict[str, Any]] = {}
    with torch.random.fork_rng(devices=[]):  # adapter init depends on the spec's seed only
        torch.manual_seed(spec.model.seed if spec.model else 0)
        insertions = _rewrite_all(spec, graph_module, sites, registry, formula, extras)
    graph_module.graph.lint()
    graph_module.recompile()
    fxsource.track(graph_module)  # forget its generated source when it is dropped
    state = CompileState(spec=spec, insertions=insertions, base_params=base_params,
                         mergeable={name: m.mergeable for name, m in registry.methods.items()},
                         base_node_count=base_node_count, formula_params=formula,
                         base_info=info, extras={"report": extras}, saved_params=saved)
    compiled = CompiledModel.create(graph_module, state)
    if loss_head is not None:
        compiled.attach_loss_head(loss_head)
    _freeze_base(compiled, spec.adapters, saved)
    compiled.train(training)
    if getattr(spec, "gradient_checkpointing", False):
        compiled.gradient_checkpointing_enable()
    registry.hook.pefc_after_rewrite(model=compiled, spec=spec)
    state.extras["timings"] = {"capture_s": capture_seconds, "compile_s": time.perf_counter() - started}
    return compiled, sites.sites


def _capture_spec_model(spec: SpecBase, device: str | None, trust_code: bool = False,
                        *, built: nn.Module | None = None) -> tuple[Any, dict[str, Any], bool]:
    """Build ``spec.model`` (unless ``built`` is that build) and capture it, or reuse a capture
    from :mod:`pefc.capture_cache`."""
    if spec.model is None:
        raise SpecError("the spec has no `model`; give one or pass model= to pefc.compile")
    if built is None:
        require_consent(spec.model, trust_code)  # a cached capture of a python model needs consent too
    cached = capture_cache.lookup(spec, device)
    if cached is not None:
        return cached
    if built is None:
        raise_hf_issues(spec)
        built = build_model(spec.model, device=device, trust_code=trust_code)
    model = quantize_spec_model(spec, built)
    graph_module = capture_with_spec_inputs(spec, model)
    info, training = base_info(model), model.training
    capture_cache.store(spec, device, graph_module, info, training)
    return graph_module, info, training


def _capture_given_model(spec: SpecBase, model: nn.Module,
                         given: dict[str, Any] | None) -> tuple[Any, dict[str, Any], bool]:
    """Capture the module passed to :func:`compile` (or reuse the capture of it, unchanged, from
    :mod:`pefc.capture_cache`)."""
    model = quantize_spec_model(spec, model)
    cached = capture_cache.lookup_given(spec, model, given)
    if cached is not None:
        return cached
    graph_module = capture_with_spec_inputs(spec, model, given)
    info, training = base_info(model), model.training
    capture_cache.store_given(spec, model, given, graph_module, info, training)
    return graph_module, info, training


def base_info(model: nn.Module) -> dict[str, Any]:
    """The base model's class and, for transformers models, its name, vocabulary size and special tokens."""
    info: dict[str, Any] = {"class": type(model).__name__}
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(generation, key, None) if key != "vocab_size" else None
        value = value if value is not None else getattr(config, key, None)
        if value is not None:
            info[key] = value
    name = getattr(config, "_name_or_path", None)
    if name:
        info["name_or_path"] = str(name)
    if callable(getattr(config, "to_dict", None)) and getattr(config, "model_type", None):
        info["hf_config"] = config.to_dict()  # rebuilds the architecture for KV-cached decoding
    return info


def capture_with_spec_inputs(spec: SpecBase, model: nn.Module, given: dict[str, Any] | None = None,
                             *, dynamic: bool = True) -> Any:
    """Capture ``model`` on ``given`` inputs (default: the spec's, on the model's device), the
    spec's named dims dynamic (or every size static with ``dynamic=False``). Given inputs are
    normalised first (:func:`pefc.examples.normalize_examples`)."""
    inputs = _example_inputs(spec, model, given)
    if given is not None:  # views, slices, size-1 dims, other devices: see pefc.examples
        inputs = normalize_examples(spec, inputs, module_device(model), dynamic=dynamic)
    return capture(model, inputs, _dynamic_dims(spec, inputs) if dynamic else {}, name=type(model).__name__)


def _example_inputs(spec: SpecBase, model: nn.Module, given: dict[str, Any] | None) -> dict[str, Any]:
    if given is not None:
        return dict(given)
    return example_inputs(spec, device=module_device(model) or torch.device("cpu"))


def _dynamic_dims(spec: SpecBase, inputs: dict[str, Any]) -> dict[str, list[int]]:
    dims: dict[str, list[int]] = {}
    for name in inputs:
        entry = spec.inputs.get(name)
        if entry is not None:
            dims[name] = [i for i, d in enumerate(entry.shape) if isinstance(d, str)]
    return dims


def _rewrite_all(spec: SpecBase, graph_module: Any, sites: SiteMap, registry: Registry,
                 formula: dict[str, int | None], extras: dict[str, dict[str, Any]],
                 *, decode: bool = False) -> list[Insertion]:
    """Run every adapter's rewrite; ``formula`` and ``extras`` receive each adapter's formula
    parameter count and report extras."""
    insertions: list[Insertion] = []
    taken = {name for name, _ in graph_module.named_children()}
    adapter_dtype = getattr(spec, "adapter_dtype", None) or ("float32" if quantized_params(sites.sites) else None)
    selection = _selection(spec, graph_module, registry)
    for config in spec.adapters:
        method, matched = select_sites(config, sites.sites, registry, taken)
        formula[config.name] = formula_params(method, config, matched)
        extras[config.name] = method.report_extras(config, matched)
        ctx = RewriteContext(graph_module, config, insertions,
                             adapter_dtype=torch_dtype(adapter_dtype) if adapter_dtype else None, decode=decode,
                             selection=selection)
        try:
            method.rewrite(ctx, config, matched)
        except PefcError:
            raise
        except Exception as exc:
            source = registry.method_sources.get(config.method)
            origin = f"plugin {source.name!r}" + (f" from {source.distribution}" if source and source.distribution
                                                  else "") if source else "its plugin"
            raise PluginError(f"method {config.method!r} ({origin}) failed while inserting adapter "
                              f"{config.name!r}: {type(exc).__name__}: {exc}") from exc
        taken.add(config.name)
    return insertions


def _selection(spec: SpecBase, graph_module: Any, registry: Registry) -> Selection | None:
    """The spec's per-row selection (its input added to the graph), or None; refuses unselectable methods."""
    select = getattr(spec, "select", None)
    if select is None:
        return None
    from pefc.selection import Selection
    from pefc.selection_spec import unselectable

    refused = unselectable(spec, registry)
    if refused:
        raise SpecError(f"select.adapters.{refused[0][0][-1]}: {refused[0][1]}")
    return Selection(graph_module, select)


def select_sites(config: AdapterConfig, sites: Sequence[Site], registry: Registry,
                 taken: set[str]) -> tuple[Method, list[Site]]:
    """The adapter's method and the sites its targets select, validated by the method.

    ``taken`` holds the names already used at the model's top level (base submodules and
    earlier adapters); an adapter named like one of them is refused.
    """
    if config.name in taken:
        raise TargetError(f"adapter name {config.name!r} clashes with the base model's submodule "
                          f"{config.name!r}; choose another name")
    method = registry.method(config.method)
    matched = match_sites(config, sites, method.site_kinds)
    method.validate_sites(config, matched)
    return method, matched


def formula_params(method: Method, config: AdapterConfig, sites: Sequence[Site]) -> int | None:
    """The method's own parameter formula over ``sites`` (None if the plugin gives none)."""
    try:
        return sum(method.param_count(config, s) for s in sites) + method.shared_param_count(config, sites)
    except NotImplementedError:
        return None


def _freeze_base(model: CompiledModel, adapters: list[Any], saved: dict[str, str]) -> None:
    names = {a.name for a in adapters}
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in names)
    for name in saved:
        model.get_parameter(name).requires_grad_(True)
