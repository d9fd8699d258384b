"""KV-cached decoding: the base model captured with its cache as graph inputs and outputs.

A :class:`CompiledModel`'s own graph has no cache (it is the training graph). For generation
the base causal LM is captured a second time, as
``(input_ids, attention_mask, position_ids, past_key_values) -> (logits, present)``: the past is
a flat tuple ``(key_0, value_0, key_1, ...)`` of ``[batch, kv_heads, past, head_dim]`` tensors,
``attention_mask`` covers past and new tokens, and every size is dynamic (an empty past is
valid, which is the prefill). The same adapter rewrite then runs on that graph, through the
same :class:`pefc.RewriteContext`, and its adapter modules and base tensors are replaced by
the compiled model's own: one set of parameters serves training, prefill and decode.

- LoRA, DoRA, (IA)^3, adapters: site modules act on every token, in prefill and decode.
- Prefix tuning: :meth:`~pefc.RewriteContext.prepend_kv` puts the slots in front of each
  attention's ``[past; new]`` keys and values (the cache holds real tokens only; the slots are
  parameters, never recomputed), positions shift by ``P`` as in the training graph.
- Prompt tuning: the *prefill* graph prepends the virtual tokens, so the cache starts with
  their keys and values; the *decode* graph is rewritten with ``decode=True``, where
  :meth:`~pefc.RewriteContext.prepend_sequence` only shifts positions. Specs without a
  sequence prepend use one graph for both.
- Merged models: insertions folded into the weights are bypassed in the cached graph.

``position_ids`` count real tokens from 0 (the graph adds what adapters shift them by).
"""

from __future__ import annotations

import copy
import json
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pefc.capture import capture
from pefc.errors import PefcError
from pefc.sequence import POSITIONS
from pefc.simplify import flatten_nested_cats

CACHE_INPUTS = ("input_ids", "attention_mask", "position_ids", "past_key_values")
_EXAMPLE = {"batch": 2, "seq": 3, "past": 5}


@dataclass
class Decoder:
    """The cached graphs of one compiled model and the shape of its cache."""

    prefill: fx.GraphModule
    step: fx.GraphModule
    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None
    key: tuple[Any, ...]

    def empty_past(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """An empty cache (past length 0) for ``batch`` rows, in ``like``'s dtype and device."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return tuple(like.new_zeros(shape) for _ in range(2 * self.layers))

    def run(self, graph: fx.GraphModule, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            position_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(logits [batch, seq, vocab], present)`` of one cached call."""
        logits, present = graph(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past)
        return logits, tuple(present)


_DECODERS: weakref.WeakKeyDictionary[Any, Decoder] = weakref.WeakKeyDictionary()


def decoder(model: Any) -> Decoder:
    """The cached graphs of ``model`` (built once per model, placement and set of insertions)."""
    key = (_placement(model), tuple(i.module for i in model.pefc.insertions))
    found = _DECODERS.get(model)
    if found is None or found.key != key:
        found = build_decoder(model, key)
        _DECODERS[model] = found
    found.prefill.train(model.training)
    found.step.train(model.training)
    return found


def build_decoder(model: Any, key: tuple[Any, ...] = ()) -> Decoder:
    """Capture the base causal LM with its cache, rewrite it with ``model``'s adapters, share tensors."""
    with torch.random.fork_rng(devices=[]):  # rebuilding and rewriting must not move the user's RNG
        base, (layers, kv_heads, head_dim) = _base_capture(model)
        prepends = any(i.site_kind == "embedding" and i.placement == "custom" for i in model.pefc.insertions)
        graphs = [_cached_graph(model, _copy(base), decode=False)]
        if prepends:
            graphs.append(_cached_graph(model, _copy(base), decode=True))
    return Decoder(graphs[0], graphs[-1], layers, kv_heads, head_dim, _max_positions(model), key)


_BASE_CAPTURES: OrderedDict[str, tuple[fx.GraphModule, tuple[int, int, int]]] = OrderedDict()
_KEEP = 4  # base captures kept per process (models of the same architecture share one)


def _base_capture(model: Any) -> tuple[fx.GraphModule, tuple[int, int, int]]:
    """The cached capture of ``model``'s base architecture and its cache shape (captured once)."""
    info = model.pefc.base_info
    device, dtype = _placement(model)
    key = json.dumps([info.get("class"), info.get("hf_config"), str(device), str(dtype)], sort_keys=True, default=str)
    found = _BASE_CAPTURES.get(key)
    if found is None:
        base = rebuild_base(model)
        shape = _cache_shape(base, model)
        found = (_capture(model, base, *shape), shape)
        del base
        _BASE_CAPTURES[key] = found
        while len(_BASE_CAPTURES) > _KEEP:
            _BASE_CAPTURES.popitem(last=False)
    _BASE_CAPTURES.move_to_end(key)
    return found


def _copy(graph: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(graph)


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensor = next(p for p in model.parameters() if p.is_floating_point())
    return tensor.device, tensor.dtype


def rebuild_base(model: Any) -> nn.Module:
    """A fresh instance of the base architecture (its weights are replaced by ``model``'s)."""
    info = model.pefc.base_info
    config = info.get("hf_config")
    if config is None:
        raise PefcError(f"generate with a KV cache needs a causal LM returning logits; {info.get('class')} is not "
                        "a transformers causal LM",
                        hint="pass use_cache=False to recompute the full sequence each step")
    import transformers

    cls = getattr(transformers, str(info.get("class")), None)
    if cls is None or not callable(getattr(cls, "can_generate", None)) or not cls.can_generate():
        raise PefcError(f"generate needs a causal LM returning logits; {info.get('class')} is not a transformers "
                        "causal LM")
    values = dict(config)
    built = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    device, dtype = _placement(model)
    with torch.device(device):
        base = cls(built)
    return base.to(dtype=dtype).eval()


def _cache_shape(base: nn.Module, model: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` read from one eager step of ``base``."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=_placement(model)[0])
    try:
        with torch.no_grad():
            out = base(input_ids=ids, use_cache=True)
        layers = list(out.past_key_values.layers)
        shape = layers[0].keys.shape
    except Exception as exc:
        raise PefcError(f"{model.pefc.base_info.get('class')} is not a causal LM with a KV cache "
                        f"({type(exc).__name__}: {exc})") from exc
    if any(layer.keys.shape != shape for layer in layers):
        raise PefcError(f"{model.pefc.base_info.get('class')}: the KV cache's layers differ in shape "
                        "(sliding or shared layers are not supported by cached generate)")
    return len(layers), int(shape[1]), int(shape[3])


def _cached_forward(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, past_key_values: tuple[torch.Tensor, ...]) -> Any:
    pairs = list(zip(past_key_values[0::2], past_key_values[1::2], strict=True))
    out = type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=_cache_of(self.config, pairs), use_cache=True)
    present = tuple(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    return out.logits, present


def _cache_of(config: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``DynamicCache`` holding ``pairs`` as they are.

    ``DynamicCache(ddp_cache_data=...)`` concatenates each past onto an empty tensor, which the
    capture keeps: one copy of the whole cache per layer and step on top of the append's own.
    Plain layers take the tensors directly; any other kind of layer gets its own ``update``.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=config)
    for layer, (key, value) in zip(cache.layers, pairs, strict=True):
        if type(layer) is DynamicLayer:
            layer.keys, layer.values, layer.device, layer.is_initialized = key, value, key.device, True
        else:
            layer.update(key, value)
    return cache


def _cached_graph(model: Any, graph: fx.GraphModule, *, decode: bool) -> fx.GraphModule:
    from pefc.compiler import _rewrite_all
    from pefc.registry import default_registry
    from pefc.sites import find_sites

    spec = model.pefc.spec
    insertions = _rewrite_all(spec, graph, find_sites(graph), default_registry(), {}, {}, decode=decode)
    _share(model, graph, insertions)
    flatten_nested_cats(graph.graph)  # prefix slots: [slots; past; new] in one copy, the cache a view of it
    graph.graph.lint()
    graph.recompile()
    return graph


def _capture(model: Any, base: nn.Module, layers: int, kv_heads: int, head_dim: int) -> fx.GraphModule:
    device, dtype = _placement(model)
    b, s, p = _EXAMPLE["batch"], _EXAMPLE["seq"], _EXAMPLE["past"]
    past = tuple(torch.randn(b, kv_heads, p, head_dim, device=device, dtype=dtype) for _ in range(2 * layers))
    inputs = {"input_ids": torch.randint(0, 2, (b, s), device=device),
              "attention_mask": torch.ones(b, p + s, dtype=torch.long, device=device),
              "position_ids": torch.arange(p, p + s, device=device).expand(b, s).contiguous(),
              "past_key_values": past}
    dims = {"input_ids": [0, 1], "attention_mask": [0, 1], "position_ids": [0, 1], "past_key_values": [0, 2]}
    base.forward = types.MethodType(_cached_forward, base)  # type: ignore[method-assign]
    graph = capture(base, inputs, dims, name=f"{type(base).__name__}Cached")
    _drop_guards(graph)
    for node in graph.graph.nodes:
        if node.op == "placeholder" and node.target == "position_ids":
            node.meta[POSITIONS] = True
    return graph


def _drop_guards(graph: fx.GraphModule) -> None:
    """Remove export's input guards: they pin sizes to the example's ranges (e.g. a past of >= 2)."""
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            graph.graph.erase_node(node)
    if hasattr(graph, "_guards_fn"):
        delattr(graph, "_guards_fn")


def _share(model: Any, graph: fx.GraphModule, insertions: list[Any]) -> None:
    """Make ``graph`` use ``model``'s adapter modules and base tensors; bypass folded insertions."""
    kept = {i.module for i in model.pefc.insertions}
    nodes = {n.name: n for n in graph.graph.nodes}
    for ins in insertions:
        if ins.module not in kept:  # folded into the base weights by merge()
            _bypass(graph, nodes[ins.node], ins)
    for name in model.pefc.adapter_names:
        if hasattr(graph, name):
            delattr(graph, name)
        if hasattr(model, name):
            setattr(graph, name, getattr(model, name))
    names = set(model.pefc.adapter_names)
    for path, owner in list(graph.named_modules()):
        if path.split(".", 1)[0] in names:
            continue
        for table in (owner._parameters, owner._buffers):
            for leaf, tensor in list(table.items()):
                full = f"{path}.{leaf}" if path else leaf
                own = _find_tensor(model, full)
                if own is None or tensor is None:
                    continue
                if own.shape != tensor.shape:
                    raise PefcError(f"the cached decoder's tensor {full!r} is {list(tensor.shape)} but the "
                                    f"model's is {list(own.shape)}")
                table[leaf] = own


def _bypass(graph: fx.GraphModule, node: fx.Node, ins: Any) -> None:
    """Drop a site module whose effect is in the weights: its users read the value it was given."""
    if ins.placement not in ("output", "input"):
        raise PefcError(f"cannot drop {ins.module!r} ({ins.method}) from the cached decoder: it is not folded")
    node.replace_all_uses_with(node.args[1] if ins.placement == "output" else node.args[0])  # type: ignore[arg-type]
    graph.graph.erase_node(node)


def _find_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    return module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)


def _max_positions(model: Any) -> int | None:
    config = model.pefc.base_info.get("hf_config") or {}
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None
