"""Captures a model as an ATen-level ``fx.GraphModule`` with torch.export (non-strict).

The model is captured in training mode so that every dropout appears in the graph; the
:func:`bind_dropout_to_mode` pass then makes each one follow ``module.train()`` /
``module.eval()`` at run time, as in the original model.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx.experimental import proxy_tensor
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from pefc import fxsource
from pefc.errors import CaptureError
from pefc.graphutil import get_arg, set_arg
from pefc.simplify import simplify
from pefc.specialized import find_specialization

TRAINING_FLAG = "_pefc_training"
DROPOUT_OPS = (torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default,
               torch.ops.aten.alpha_dropout.default)
SDPA = torch.ops.aten.scaled_dot_product_attention.default


class TrainingFlag(nn.Module):
    """Returns ``self.training``: the graph's dropouts read it, so train()/eval() switch them."""

    def forward(self) -> bool:
        return self.training


def capture(model: nn.Module, inputs: dict[str, torch.Tensor], dynamic_dims: dict[str, list[int]],
            *, name: str | None = None) -> fx.GraphModule:
    """Export ``model(**inputs)`` with ``dynamic_dims[input] = [dim indices]`` dynamic
    (in every tensor of an input that is a tuple of tensors, e.g. a KV cache)."""
    name = name or type(model).__name__
    sources = fxsource.mark()
    dynamic_shapes = {key: _dynamic(inputs[key], dynamic_dims.get(key, [])) for key in inputs}
    with _capture_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        def export() -> torch.export.ExportedProgram:
            return torch.export.export(model, (), dict(inputs), dynamic_shapes=dynamic_shapes, strict=False)
        try:
            program = export()
        except Exception as exc:
            hint = _capture_hint(exc)
            if _specialized(exc):
                hint = _specialized_hint(export) or hint
            elif hint == _GENERIC_HINT and (eager := _eager_failure(model, inputs)) is not None:
                hint = (f"the model fails without torch.export too, called on the example inputs ({eager}): "
                        "its code or config is wrong, not the capture")
            _release_export_state()
            fxsource.forget_since(sources)
            raise CaptureError(f"cannot capture model {name} with torch.export: {_reason(exc)}", hint=hint) from exc
    exported = program.module()
    graph_module = fx.GraphModule(exported, exported.graph, class_name=name)
    del program, exported
    _release_export_state(graph_module)
    drop_metadata_asserts(graph_module)
    bind_dropout_to_mode(graph_module)
    simplify(graph_module, _device_of(model, inputs))
    fxsource.forget_since(sources, keep=graph_module)  # code of the modules export made on the way
    return graph_module


def _dynamic(value: Any, dims: list[int]) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_dynamic(v, dims) for v in value)
    return {i: Dim.DYNAMIC for i in dims} or None


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter (else buffer); None for a module without tensors."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else None


def _device_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.device:
    """Where the captured graph will run: the model's device, else its inputs', else the CPU."""
    device = module_device(model)
    if device is None:
        device = next((t.device for t in inputs.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    return device


def _release_export_state(graph_module: fx.GraphModule | None = None) -> None:
    """Drop what torch.export keeps alive after a capture (without this, every call leaks ~1 MB).

    - class-level caches: FakeTensorMode's dispatch cache, the per-method ``lru_cache`` of ShapeEnv
      (keyed by ``self``) and proxy_tensor's fake-tensor-to-proxy map;
    - the capture's ShapeEnv: its ``tracked_fakes`` hold the input FakeTensors, whose C++ sizes
      hold SymNodes that point back at the ShapeEnv. The gc cannot see the C++ edge, so that
      cycle is never collected; dropping the list (only used while exporting) breaks it.
    """
    FakeTensorMode.cache_clear()
    _clear_method_caches(ShapeEnv)
    proxy_map = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(proxy_map, dict):
        proxy_map.clear()
    for env in _shape_envs(graph_module) if graph_module is not None else []:
        env.tracked_fakes = None
        cache = getattr(env, "fake_tensor_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def _shape_envs(graph_module: fx.GraphModule) -> list[ShapeEnv]:
    """The ShapeEnvs behind the fake values in ``graph_module``'s node metadata."""
    envs: dict[int, ShapeEnv] = {}
    for node in graph_module.graph.nodes:
        val = node.meta.get("val")
        mode = getattr(val, "fake_mode", None)
        env = getattr(mode, "shape_env", None) or getattr(getattr(val, "node", None), "shape_env", None)
        if isinstance(env, ShapeEnv):
            envs[id(env)] = env
    return list(envs.values())


def _clear_method_caches(cls: type) -> None:
    """Clear the class-level ``lru_cache`` of every method of ``cls``.

    ``ShapeEnv`` memoises methods with ``functools.lru_cache`` on the class, keyed by ``self``,
    so each cache keeps up to 256 finished ShapeEnvs (and their fake-tensor caches) alive.
    """
    for value in vars(cls).values():
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()


def drop_metadata_asserts(graph_module: fx.GraphModule) -> None:
    """Remove ``aten._assert_tensor_metadata`` checks: they pin the capture's dtype and device."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph_module.graph.erase_node(node)  # capture()'s last pass (simplify) recompiles


@contextmanager
def _capture_mode(model: nn.Module) -> Iterator[None]:
    """Training mode (dropouts visible) and, for transformers models, no KV cache outputs.

    ``use_cache`` is switched off in every config of the model: encoder-decoders (T5) give
    their stacks copies of the config, which the stacks read.
    """
    was_training = model.training
    config = getattr(model, "config", None)
    saved = {key: getattr(config, key) for key in ("return_dict",) if hasattr(config, key)}
    caches = {id(c): (c, c.use_cache) for c in _configs(model) if hasattr(c, "use_cache")}
    model.train()
    if config is not None and "return_dict" in saved:
        config.return_dict = True
    for sub, _ in caches.values():
        sub.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        for key, value in saved.items():
            setattr(config, key, value)
        for sub, value in caches.values():
            sub.use_cache = value


def _configs(model: nn.Module) -> list[Any]:
    """The ``config`` objects of ``model`` and its submodules (transformers models)."""
    return [m.config for m in model.modules() if getattr(m, "config", None) is not None]


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head = lines[0] if lines else ""
    detail = next((line for line in lines[1:] if "user code" not in line.lower() and len(line) > 10), "")
    reason = f"{type(exc).__name__}: {head}"
    if detail and len(reason) < 200:
        reason += f" ({detail})"
    return reason[:600]


def _specialized(exc: BaseException) -> bool:
    text = str(exc)
    return "Constraints violated" in text or "specialized" in text


def _specialized_hint(export: Any) -> str | None:
    """Name the model line that fixed a dynamic dim (see :mod:`pefc.specialized`)."""
    where = find_specialization(export)
    if where is None:
        return None
    return (f"{where}; that dim cannot be dynamic for this model: make it a fixed integer in `inputs`, "
            "or change that line so it does not depend on the size")


def _capture_hint(exc: BaseException) -> str:
    text = str(exc)
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        return "the model branches on tensor values; make the branch static or use torch.cond"
    if "Constraints violated" in text or "specialized" in text:
        return "a named dim of `inputs` cannot be dynamic for this model; make it a fixed integer"
    return _GENERIC_HINT


_GENERIC_HINT = "check that the model runs eagerly on the spec's example inputs and uses no Python-side state"


def _eager_failure(model: nn.Module, inputs: dict[str, torch.Tensor]) -> str | None:
    """Why ``model(**inputs)`` fails when simply called (no export), or None when it runs."""
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:  # noqa: BLE001 (the failure is what is reported)
        return _reason(exc)
    return None


def bind_dropout_to_mode(graph_module: fx.GraphModule) -> None:
    """Make every dropout (and SDPA's ``dropout_p``) depend on the module's training flag."""
    graph = graph_module.graph
    targets = [n for n in graph.nodes if n.op == "call_function" and
               (n.target in DROPOUT_OPS or (n.target is SDPA and _float(get_arg(n, "dropout_p")) > 0))]
    if not targets:
        return
    graph_module.add_submodule(TRAINING_FLAG, TrainingFlag())
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        flag = graph.call_module(TRAINING_FLAG, ())
    for node in targets:
        if node.target is SDPA:
            with graph.inserting_before(node):
                p = graph.call_function(operator.mul, (_float(get_arg(node, "dropout_p")), flag))
            set_arg(node, "dropout_p", p)
        else:
            set_arg(node, "train", flag)
    graph_module.recompile()


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0
