"""Site discovery: typed views of the graph nodes a PEFT method can act on.

A site has a module path (from ``nn_module_stack``), a layer index (the first integer in
that path) and, where the dataflow shows it, a role. Roles come from the graph alone:

- ``attn.q`` / ``attn.k`` / ``attn.v``: the linear whose output reaches the queries, keys or
  values of an attention (``attn.qkv`` when one linear feeds all three, ``attn.kv`` when it
  feeds key and value), whether the attention is ``scaled_dot_product_attention`` or written
  out as matmul / softmax / matmul (:mod:`pefc.attention`);
- ``attn.o``: the first linear reached from the attention output;
- ``mlp.up`` / ``mlp.gate`` / ``mlp.down``: around an activation function, the linear
  after it (``down``) and the linears feeding it (``gate`` is the one through the activation
  when there are two, ``up`` the other or the only one);
- ``mlp.act``: the activation site itself; ``attn``: the attention itself; ``embed``: the token embedding (the lookup indexed by a
  graph input with the largest vocabulary).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from pefc.attention import Attention, Unread, find_attentions
from pefc.graphutil import (
    attr_value,
    consumers,
    get_arg,
    meta_shape,
    module_path,
    producers,
    search,
    static_dim,
    tensor_inputs,
)
from pefc.sequence import POSITIONS

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
EMBEDDING = aten.embedding.default
ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default,
               aten.sigmoid.default, aten.mish.default, aten.hardswish.default, aten.elu.default,
               aten.leaky_relu.default, aten.relu6.default if hasattr(aten, "relu6") else aten.relu.default}
TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}

ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.kv", "attn.o",
         "mlp.up", "mlp.gate", "mlp.down", "mlp.act", "attn", "embed")


@dataclass(eq=False)
class Site:
    """A place in the graph a method can act on."""

    kind: str = field(init=False, default="")
    path: str
    node: fx.Node
    role: str | None = None
    layer: int | None = None
    attention_kind: str | None = None  # attention sites and their projections: see pefc.selector

    def describe(self) -> str:
        return f"{self.path} ({self.kind}{', @' + self.role if self.role else ''})"


@dataclass(eq=False)
class LinearSite(Site):
    """``y = x W^T + b`` as ``aten.linear``, ``aten.addmm`` (GPT-2 Conv1D) or ``matmul`` + ``add``.

    ``weight_layout`` is ``"out_in"`` (nn.Linear) or ``"in_out"`` (Conv1D, ``x @ W``); the
    helpers :meth:`weight` and :meth:`set_weight` always speak ``[out, in]``.

    On a quantized base (:mod:`pefc.quant`) the weight operand is dequantized in the graph:
    ``quantized`` names the format (``nf4``, ``int8``), ``weight_name`` the buffer of its codes
    (the stored weight), and :meth:`weight` returns the dequantized values.
    """

    input: fx.Node = None  # type: ignore[assignment]
    output: fx.Node = None  # type: ignore[assignment]
    weight_name: str = ""
    bias_name: str | None = None
    weight_layout: str = "out_in"
    in_features: int = 0
    out_features: int = 0
    quantized: str | None = None

    def __post_init__(self) -> None:
        self.kind = "linear"

    def weight(self, graph_module: fx.GraphModule) -> torch.Tensor:
        if self.quantized:
            from pefc.quant import dequantize_site

            return dequantize_site(graph_module, self)
        value = attr_value(graph_module, self.weight_name)
        return value if self.weight_layout == "out_in" else value.t()

    def bias(self, graph_module: fx.GraphModule) -> torch.Tensor | None:
        return attr_value(graph_module, self.bias_name) if self.bias_name else None


@dataclass(eq=False)
class AttentionSite(Site):
    """An attention, ``scaled_dot_product_attention`` or written out (``softmax(q k^T ...) v``).

    ``node`` is the attention's output (the SDPA call, or the probabilities-times-values
    product); :attr:`query`, :attr:`key`, :attr:`value` and :attr:`mask` are the nodes the
    attention reads in either form, and :attr:`attention` the full
    :class:`pefc.attention.Attention` (where keys join, every mask or bias over the keys).
    """

    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    is_causal: bool = False
    has_mask: bool = False
    attention: Attention | None = None

    def __post_init__(self) -> None:
        self.kind = "attention"
        self.role = "attn"

    @property
    def form(self) -> str:
        """``"sdpa"`` or ``"eager"`` (written out in ATen ops)."""
        return self.attention.form if self.attention is not None else "sdpa"

    @property
    def query(self) -> fx.Node | None:
        return self.attention.query if self.attention is not None else None

    @property
    def key(self) -> fx.Node | None:
        return self.attention.key if self.attention is not None else None

    @property
    def value(self) -> fx.Node | None:
        return self.attention.value if self.attention is not None else None

    @property
    def mask(self) -> fx.Node | None:
        return self.attention.mask if self.attention is not None else None


@dataclass(eq=False)
class UnreadAttentionSite(Site):
    """A softmax whose probabilities meet values but whose scores pefc cannot read (``reason`` says why)."""

    reason: str = ""

    def __post_init__(self) -> None:
        self.kind = "unread attention"


@dataclass(eq=False)
class EmbeddingSite(Site):
    """An ``aten.embedding`` lookup of a parameter table."""

    weight_name: str = ""
    num_embeddings: int = 0
    embedding_dim: int = 0

    def __post_init__(self) -> None:
        self.kind = "embedding"


@dataclass(eq=False)
class ActivationSite(Site):
    """The activation function of a feed-forward block."""

    width: int = 0

    def __post_init__(self) -> None:
        self.kind = "activation"


@dataclass
class SiteMap:
    """All sites of a captured graph."""

    sites: list[Site]

    def of_kind(self, *kinds: str) -> list[Site]:
        return [s for s in self.sites if s.kind in kinds]

    def by_path(self) -> dict[str, Site]:
        return {s.path: s for s in self.sites}

    def __iter__(self) -> Any:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)


def find_sites(graph_module: fx.GraphModule) -> SiteMap:
    """Find linear, attention, embedding and activation sites and infer their roles."""
    params = {name for name, _ in graph_module.named_parameters(remove_duplicate=False)}
    linears = [s for n in graph_module.graph.nodes if (s := _linear_site(n, params)) is not None]
    _unique_paths(linears)
    by_output = {s.output: s for s in linears}
    by_node = {s.node: s for s in linears}
    found, unread = find_attentions(graph_module.graph)
    stops = {a.output for a in found}
    attentions = [_attention_site(a, by_output, by_node, stops) for a in found]
    unread_sites = [_unread_site(u) for u in unread]
    embeddings = _embedding_sites(graph_module, params)
    activations = _ffn_roles(graph_module, by_output, by_node, stops)
    _attention_kinds(attentions, by_output, by_node, stops)
    sites: list[Site] = [*embeddings, *attentions, *unread_sites, *linears, *activations]
    for site in sites:
        site.layer = layer_of(site.path)
    order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
    sites.sort(key=lambda s: order[s.node])
    return SiteMap(sites)


def layer_of(path: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


# --- linear sites -------------------------------------------------------------------------

def _param(node: Any, params: set[str]) -> fx.Node | None:
    """``node`` if it reads a parameter (a ``get_attr`` of a registered parameter)."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target in params:
        return node
    return None


def _linear_site(node: fx.Node, params: set[str]) -> LinearSite | None:
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = _param(node.args[1], params)
        stored = _quantized_weight(node.args[1]) if weight is None else None
        site = _make_linear(node, node.args[0], node, weight or (node.args[1] if stored else None),
                            _param(bias, params) or _param(_cast_source(bias), params), "out_in")
        if site is not None and stored is not None:
            site.weight_name, site.quantized = stored
        return site
    if node.target is aten.addmm.default:
        return _make_linear(node, node.args[1], node, _param(node.args[2], params),
                            _param(node.args[0], params), "in_out")
    if node.target in (aten.matmul.default, aten.mm.default):
        weight, layout = node.args[1], "in_out"
        if isinstance(weight, fx.Node) and weight.target in TRANSPOSES:
            weight, layout = weight.args[0], "out_in"
        output, bias = node, None
        users = list(node.users)
        if len(users) == 1 and users[0].target is aten.add.Tensor:
            other = [a for a in users[0].args if a is not node]
            bias = _param(other[0], params) if other else None
            output = users[0] if bias is not None else node
        return _make_linear(node, node.args[0], output, _param(weight, params), bias, layout)
    return None


def _quantized_weight(node: Any) -> tuple[str, str] | None:
    """``(codes buffer, format)`` when ``node`` dequantizes a weight stored by :mod:`pefc.quant`."""
    from pefc.quant import format_of_buffer

    if not isinstance(node, fx.Node) or node.op == "get_attr":
        return None
    hits = search([node], tensor_inputs, lambda n: n.op in ("get_attr", "placeholder"), limit=64)
    for hit in hits:
        found = format_of_buffer(str(hit.target)) if hit.op == "get_attr" else None
        if found is not None:
            return str(hit.target), found[0].name
    return None


def _cast_source(node: Any) -> Any:
    """The tensor a dtype cast (``_to_copy``) reads, else None."""
    if isinstance(node, fx.Node) and node.target is aten._to_copy.default:
        return node.args[0]
    return None


def _make_linear(node: fx.Node, x: Any, output: fx.Node, weight: fx.Node | None, bias: fx.Node | None,
                 layout: str) -> LinearSite | None:
    shape = meta_shape(weight)
    if weight is None or not isinstance(x, fx.Node) or shape is None or len(shape) != 2:
        return None
    out_f, in_f = shape if layout == "out_in" else shape[::-1]
    name = str(weight.target)
    path = module_path(node) or name.rsplit(".", 1)[0]
    return LinearSite(path=path, node=node, input=x, output=output, weight_name=name,
                      bias_name=str(bias.target) if bias is not None else None,
                      weight_layout=layout, in_features=int(in_f), out_features=int(out_f))


def _unique_paths(linears: list[LinearSite]) -> None:
    """Two linears inside one module (functional calls) get their weight's name as path."""
    counts: dict[str, int] = {}
    for site in linears:
        counts[site.path] = counts.get(site.path, 0) + 1
    for site in linears:
        if counts[site.path] > 1:
            site.path = site.weight_name.rsplit(".", 1)[0] if site.weight_name.endswith(".weight") \
                else site.weight_name
    seen: dict[str, int] = {}
    for site in linears:
        if site.path in seen:
            seen[site.path] += 1
            site.path = f"{site.path}#{seen[site.path]}"
        else:
            seen[site.path] = 0


def _linears_before(start: Iterable[fx.Node], by_output: dict[fx.Node, LinearSite],
                    stops: set[fx.Node] = frozenset()) -> list[LinearSite]:  # type: ignore[assignment]
    """First linear sites on each backward path (stopping at attention outputs and embeddings)."""
    hits = search(start, producers, lambda n: n in by_output or n in stops or n.target in (SDPA, EMBEDDING),
                  limit=256)
    return [by_output[n] for n in hits if n in by_output]


def _linears_after(start: fx.Node, by_node: dict[fx.Node, LinearSite],
                   stops: set[fx.Node] = frozenset()) -> list[LinearSite]:  # type: ignore[assignment]
    """First linear sites on each forward path from ``start`` (through its input edge)."""
    def stop(n: fx.Node) -> bool:
        return n in by_node or n in stops or n.target is SDPA
    hits = search(consumers(start), consumers, stop, limit=256)
    return [by_node[n] for n in hits if n in by_node]


# --- attention sites ----------------------------------------------------------------------

def _attention_site(attention: Attention, by_output: dict[fx.Node, LinearSite],
                    by_node: dict[fx.Node, LinearSite], stops: set[fx.Node]) -> AttentionSite:
    node, q, k, v = attention.output, attention.query, attention.key, attention.value
    feeds: dict[LinearSite, set[str]] = {}
    for name, arg in (("q", q), ("k", k), ("v", v)):
        for site in _linears_before([arg], by_output, stops - {node}):
            feeds.setdefault(site, set()).add(name)
    for site, names in feeds.items():
        if names == {"q", "k", "v"}:
            site.role = "attn.qkv"
        elif names == {"k", "v"}:
            site.role = "attn.kv"
        elif len(names) == 1:
            site.role = "attn." + next(iter(names))
    for site in _linears_after(node, by_node, stops - {node}):
        site.role = site.role or "attn.o"
    heads = attention.heads
    head_dim = static_dim(q, -1) or 0
    kv_heads = _kv_heads(feeds, heads, head_dim) or attention.key_heads or heads
    path = module_path(node) or node.name
    sdpa = attention.form == "sdpa"
    return AttentionSite(path=path, node=node, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         is_causal=sdpa and bool(get_arg(node, "is_causal")), has_mask=attention.mask is not None,
                         attention=attention)


def _unread_site(unread: Unread) -> UnreadAttentionSite:
    return UnreadAttentionSite(path=unread.path, node=unread.node, reason=unread.reason)


def _kv_heads(feeds: dict[LinearSite, set[str]], heads: int, head_dim: int) -> int | None:
    if not head_dim:
        return None
    for site, names in feeds.items():
        width = site.out_features // head_dim
        if names == {"k"} or names == {"v"}:
            return width
        if names == {"k", "v"}:
            return width // 2
        if names == {"q", "k", "v"} and width > heads:
            return (width - heads) // 2
    return None


# --- embeddings ---------------------------------------------------------------------------

def _embedding_sites(graph_module: fx.GraphModule, params: set[str]) -> list[EmbeddingSite]:
    sites = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is not EMBEDDING:
            continue
        weight = _param(node.args[0], params)
        shape = meta_shape(weight)
        if weight is None or shape is None:
            continue
        path = module_path(node) or str(weight.target).rsplit(".", 1)[0]
        sites.append(EmbeddingSite(path=path, node=node, weight_name=str(weight.target),
                                   num_embeddings=int(shape[0]), embedding_dim=int(shape[1])))
    token = [s for s in sites if _indexed_by_input(s.node)]
    if token:
        max(token, key=lambda s: s.num_embeddings).role = "embed"
    return sites


def _indexed_by_input(node: fx.Node) -> bool:
    hits = search([node.args[1]], tensor_inputs, lambda n: n.op in ("placeholder", "get_attr"),
                  limit=32)
    return any(n.op == "placeholder" and not n.meta.get(POSITIONS) for n in hits)  # token ids, not positions


# --- feed-forward blocks --------------------------------------------------------------------

def _ffn_roles(graph_module: fx.GraphModule, by_output: dict[fx.Node, LinearSite],
               by_node: dict[fx.Node, LinearSite], stops: set[fx.Node]) -> list[ActivationSite]:
    """Activations followed by one down-projection (not through an attention: a softcap ``tanh`` is none)."""
    sites = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in ACTIVATIONS:
            continue
        downs = [d for d in _linears_after(node, by_node, stops) if d.role is None or d.role == "mlp.down"]
        if len(downs) != 1:
            continue
        down = downs[0]
        ups = [u for u in _linears_before([down.node.args[0] if down.input is None else down.input], by_output)
               if not (u.role or "").startswith("attn") and u.out_features == down.in_features]
        through_act = set(_linears_before([node], by_output))
        if not ups or not through_act & set(ups) or any(u.in_features != down.out_features for u in ups):
            continue
        down.role = "mlp.down"
        for up in ups:
            up.role = "mlp.gate" if len(ups) > 1 and up in through_act else "mlp.up"
        path = module_path(node) or node.name
        sites.append(ActivationSite(path=path, node=node, role="mlp.act", width=down.in_features))
    return sites


# --- attention kinds ------------------------------------------------------------------------

def _attention_kinds(attentions: list[AttentionSite], by_output: dict[fx.Node, LinearSite],
                     by_node: dict[fx.Node, LinearSite], stops: set[fx.Node]) -> None:
    """Mark each attention (and its q/k/v/o linears) ``self`` or ``cross``; in a model with
    cross-attention, its self-attentions ``encoder`` or ``decoder`` (see :mod:`pefc.selector`)."""
    for site in attentions:
        site.attention_kind = _self_or_cross(site, by_output, stops - {site.node})
    crosses = [s for s in attentions if s.attention_kind == "cross"]
    if crosses:
        feeding = _ancestors([a for s in crosses for a in (s.key, s.value) if a is not None])
        for site in attentions:
            if site.attention_kind == "self":
                site.attention_kind = "encoder" if site.node in feeding else "decoder"
    for site in attentions:
        others = stops - {site.node}
        for linear in {*_linears_before(_qkv(site), by_output, others), *_linears_after(site.node, by_node, others)}:
            linear.attention_kind = linear.attention_kind or site.attention_kind


def _qkv(site: AttentionSite) -> list[fx.Node]:
    return [n for n in (site.query, site.key, site.value) if n is not None]


def _self_or_cross(site: AttentionSite, by_output: dict[fx.Node, LinearSite], stops: set[fx.Node]) -> str:
    """``cross`` when the key projection reads another tensor than the query projection (else,
    without projections, when the key length differs from the query length)."""
    q, k = site.query, site.key
    if q is None or k is None:
        return "self"
    q_in = {s.input for s in _linears_before([q], by_output, stops)}
    k_in = {s.input for s in _linears_before([k], by_output, stops)}
    if q_in and k_in:
        return "self" if q_in & k_in else "cross"
    q_shape, k_shape = meta_shape(q), meta_shape(k)
    if q_shape and k_shape and str(q_shape[-2]) != str(k_shape[-2]):
        return "cross"
    return "self"


def _ancestors(start: list[fx.Node]) -> set[fx.Node]:
    """Every node ``start`` depends on."""
    seen: set[fx.Node] = set()
    stack = [n for n in start if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen
