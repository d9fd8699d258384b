"""An opt-in, in-process cache of captures.

Capturing dominates compile time on small models (about 1.5 s for a tiny Llama, against
about 10 ms to copy the captured graph). Compiling the same ``spec.model`` / ``inputs`` again
can reuse the capture: enable it with :func:`enable` or ``PEFC_CAPTURE_CACHE=N``. It is off by
default because every entry of a spec-built model holds a copy of the base weights (meta-device
plans hold none).

A module passed to ``pefc.compile`` is cached too, while it is alive and unchanged: the entry
is keyed by the module's identity and a fingerprint of its state (module tree, every
parameter's and buffer's storage and in-place version counter, plain attributes, a
transformers config), the spec's inputs and the example tensors. A hit shares the module's own
tensors, as a fresh capture does, so such an entry holds no copy of the weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pefc.schema import SpecBase

_entries: OrderedDict[str, tuple[fx.GraphModule, dict[str, Any], bool]] = OrderedDict()
_given: OrderedDict[str, tuple[weakref.ref, fx.GraphModule, dict[str, Any], bool]] = OrderedDict()
_MAX_HASHED_ELEMENTS = 1 << 20  # example tensors beyond this are not fingerprinted (no caching)
_maxsize = int(os.environ.get("PEFC_CAPTURE_CACHE", "0") or 0)


def enable(maxsize: int = 8) -> None:
    """Keep up to ``maxsize`` captures (0 disables and clears the cache)."""
    global _maxsize
    _maxsize = maxsize
    _trim()


def clear() -> None:
    _entries.clear()
    _given.clear()


def _key(spec: SpecBase, device: str | None) -> str:
    parts = [spec.model.model_dump_json() if spec.model else "", device or "",
             *(f"{k}={v.model_dump_json()}" for k, v in sorted(spec.inputs.items())),
             spec.capture.model_dump_json()]
    return "\n".join(parts)


def lookup(spec: SpecBase, device: str | None) -> tuple[fx.GraphModule, dict[str, Any], bool] | None:
    """A private copy of the cached capture (graph module, base info, training flag), if any."""
    entry = _entries.get(_key(spec, device)) if _maxsize else None
    if entry is None:
        return None
    _entries.move_to_end(_key(spec, device))
    return _copy(entry[0]), dict(entry[1]), entry[2]


def store(spec: SpecBase, device: str | None, graph_module: fx.GraphModule, info: dict[str, Any],
          training: bool) -> None:
    if not _maxsize:
        return
    _entries[_key(spec, device)] = (_copy(graph_module), dict(info), training)
    _trim()


def lookup_given(spec: SpecBase, model: nn.Module, examples: dict[str, Any] | None
                 ) -> tuple[fx.GraphModule, dict[str, Any], bool] | None:
    """The cached capture of the live, unchanged ``model`` (a graph copy sharing its tensors), if any."""
    key = _given_key(spec, model, examples) if _maxsize else None
    entry = _given.get(key) if key else None
    if entry is None or entry[0]() is not model:
        return None
    _given.move_to_end(key)
    return _copy(entry[1], share_tensors=True), dict(entry[2]), entry[3]


def store_given(spec: SpecBase, model: nn.Module, examples: dict[str, Any] | None, graph_module: fx.GraphModule,
                info: dict[str, Any], training: bool) -> None:
    key = _given_key(spec, model, examples) if _maxsize else None
    if key is None:
        return
    _given[key] = (weakref.ref(model), _copy(graph_module, share_tensors=True), dict(info), training)
    _trim()


def _given_key(spec: SpecBase, model: nn.Module, examples: dict[str, Any] | None) -> str | None:
    """A digest of ``model``'s identity and state, the spec's inputs and the example tensors (None: uncacheable)."""
    try:
        example_part, state = _examples_digest(examples), _module_state(model)
    except (RuntimeError, TypeError):  # tensor subclasses without storage: not cached
        return None
    if example_part is None:
        return None
    digest = hashlib.sha256()
    for part in (str(id(model)), repr(state), example_part, _key(spec, None)):
        digest.update(part.encode())
    return digest.hexdigest()


def _module_state(model: nn.Module) -> tuple[Any, ...]:
    """What a capture of ``model`` depends on, short of its code: its tree, tensors and settings."""
    tensors = tuple((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))
                    for name, t in [*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)])
    modules = tuple((name, type(m).__qualname__, _plain_attributes(m)) for name, m in model.named_modules())
    config = getattr(model, "config", None)
    config_part = ""
    if callable(getattr(config, "to_dict", None)):
        config_part = json.dumps(config.to_dict(), sort_keys=True, default=str)
        config_part += repr(getattr(config, "_attn_implementation", None))
    return tensors, modules, config_part


def _plain_attributes(module: nn.Module) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in vars(module).items()
                        if isinstance(v, (bool, int, float, str, type(None))) and not k.startswith("__")))


def _examples_digest(examples: dict[str, Any] | None) -> str | None:
    if examples is None:
        return "spec"
    digest = hashlib.sha256()
    for name, value in sorted(examples.items()):
        tensors = value if isinstance(value, (tuple, list)) else [value]
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.numel() > _MAX_HASHED_ELEMENTS or t.device.type == "meta":
                return None
            digest.update(f"{name}|{tuple(t.shape)}|{t.stride()}|{t.dtype}|{t.device}|".encode())
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _copy(graph_module: fx.GraphModule, *, share_tensors: bool = False) -> fx.GraphModule:
    memo: dict[int, Any] = {}
    if share_tensors:  # the graph is copied, the given module's parameters and buffers are not
        memo = {id(t): t for t in [*graph_module.parameters(), *graph_module.buffers()]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph_module, memo)


def _trim() -> None:
    for entries in (_entries, _given):
        while len(entries) > max(_maxsize, 0):
            entries.popitem(last=False)
