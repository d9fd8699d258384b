"""The graph-editing API a method's rewrite rule uses.

One mechanism serves every method: an adapter is an ``nn.Module`` registered under
``<adapter name>.<site path>`` and called from a ``call_module`` node placed at the site.
The :class:`RewriteContext` offers the placements the built-in methods need, and records
each one so that merging, reporting and saving work the same for every method. Sequence-level
placements (extra attention slots, virtual tokens, position offsets) build on
:mod:`pefc.sequence`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from pefc.config import AdapterConfig
from pefc.errors import PluginError
from pefc.sequence import first_computation, offset_positions, prepend_kv, prepend_sequence
from pefc.sites import AttentionSite, EmbeddingSite, LinearSite, Site

if TYPE_CHECKING:
    from pefc.selection import RowGroup, Selection


class SiteModule(nn.Module):
    """Base of modules placed at a linear site.

    Placed with :meth:`RewriteContext.wrap_output`, ``forward(x, y[, weight, bias])`` returns
    the new output; with :meth:`RewriteContext.wrap_input`, ``forward(x)`` returns the new
    input. A mergeable method implements :meth:`fold`.
    """

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the base ``(weight [out, in], bias)`` with this module folded in."""
        raise NotImplementedError(f"{type(self).__name__} cannot be folded")

    # -- per-row selection (pefc.selection): what a selectable method's module adds ------------

    def row_values(self) -> dict[str, str | float | int]:
        """What the core gathers per row when this module's adapter is selected per row: each name
        maps to one of the module's tensors (``"lora_A"``, ``"down.weight"``) or to a number."""
        raise NotImplementedError(f"{type(self).__name__} cannot be selected per row")

    def row_key(self) -> tuple[Any, ...]:
        """Modules of one site with equal keys share one row-wise call (their tensors are stacked)."""
        return (type(self).__qualname__,)

    def rowwise(self) -> nn.Module:
        """The module computing the site per row: ``forward(x, y[, weight, bias], index, *stacks)`` on the
        output side, ``forward(x, index, *stacks)`` on the input side, ``stacks`` in :meth:`row_values`
        order, each ``[members + 1, ...]`` (zero-padded; the last entry, all zeros, is for rows of no
        member) and ``index`` ``[batch]`` each row's entry."""
        raise NotImplementedError(f"{type(self).__name__} cannot be selected per row")


class BakeableModule(nn.Module):
    """Base of modules that hold a training-time parameterisation (e.g. prefix MLP).

    :meth:`bake` returns an equivalent module with plain parameters (same call signature,
    same outputs), used for inference and export; :meth:`pefc.CompiledModel.bake` swaps it in.
    """

    def bake(self) -> nn.Module:
        raise NotImplementedError


@dataclass
class Insertion:
    """One module placed in the graph by one adapter."""

    adapter: str
    method: str
    module: str
    node: str
    placement: str  # "output", "input" or "custom"
    site_path: str
    site_kind: str
    site_role: str | None
    weight_name: str | None = None
    bias_name: str | None = None
    weight_layout: str | None = None
    #: the adapter's index in the spec's ``select`` (None: on for every row); placement ``"rows"``: the module
    #: is computed in a row-wise call (see :mod:`pefc.selection`)
    slot: int | None = None


#: base dtypes whose adapters train in float32 unless the spec's ``adapter_dtype`` says otherwise
HALF_PRECISION = (torch.float16, torch.bfloat16)


def default_adapter_dtype(base: torch.dtype) -> torch.dtype:
    """float32 over a float16/bfloat16 base (half-precision adapters diverge under AdamW, as HF PEFT
    knows), else the base's dtype."""
    return torch.float32 if base in HALF_PRECISION else base


class RewriteContext:
    """Edits the graph on behalf of one adapter entry of the spec."""

    def __init__(self, graph_module: fx.GraphModule, config: AdapterConfig, insertions: list[Insertion],
                 *, adapter_dtype: torch.dtype | None = None, decode: bool = False,
                 selection: Selection | None = None) -> None:
        self.graph_module = graph_module
        #: the spec's per-row selection, if any (see :mod:`pefc.selection`)
        self.selection = selection
        #: the graph is a KV-cached decode step: sequence prepends are already in the cache
        self.decode = decode
        self.config = config
        self._insertions = insertions
        self._adapter_dtype = adapter_dtype
        self._widened_masks: dict[Any, fx.Node] = {}

    @property
    def slot(self) -> int | None:
        """This adapter's index in the spec's ``select`` (its rows pick it), or None (on for every row)."""
        return self.selection.slot(self.config.name) if self.selection is not None else None

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    # -- tensors of the base model -----------------------------------------------------

    def weight(self, site: LinearSite) -> torch.Tensor:
        """The site's frozen base weight as ``[out, in]`` (a view; do not modify)."""
        return site.weight(self.graph_module).detach()

    def bias(self, site: LinearSite) -> torch.Tensor | None:
        bias = site.bias(self.graph_module)
        return bias.detach() if bias is not None else None

    def param(self, name: str) -> torch.Tensor:
        """A base parameter or buffer by its qualified name."""
        value: Any = self.graph_module
        for part in name.split("."):
            value = getattr(value, part)
        return value

    @property
    def device(self) -> torch.device:
        return next(self.graph_module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype for new adapter parameters: the spec's ``adapter_dtype``, else :func:`default_adapter_dtype`."""
        if self._adapter_dtype is not None:
            return self._adapter_dtype
        return default_adapter_dtype(next(p for p in self.graph_module.parameters() if p.is_floating_point()).dtype)

    # -- placements -------------------------------------------------------------------------

    def module_name(self, site: Site) -> str:
        return f"{self.config.name}.{site.path}"

    def add_module(self, site: Site, module: nn.Module) -> str:
        """Register ``module`` as ``<adapter>.<site path>`` on the adapter's device and dtype."""
        name = self.module_name(site)
        self._register(name, module, f"placed two modules at site {site.path!r}")
        return name

    def _register(self, name: str, module: nn.Module, clash: str) -> None:
        """Add ``module`` at ``name`` on the adapter's device and dtype; ``clash`` explains a duplicate."""
        try:
            self.graph_module.get_submodule(name)
        except AttributeError:
            pass
        else:
            raise PluginError(f"adapter {self.config.name!r} {clash}")
        module = module.to(device=self.device)
        if self.dtype.is_floating_point:
            module = module.to(dtype=self.dtype)
        self.graph_module.add_submodule(name, module)

    def wrap_output(self, site: LinearSite, module: SiteModule, *, pass_weight: bool = False) -> fx.Node:
        """Replace the site's output ``y`` by ``module(x, y)`` (or ``module(x, y, W, b)``).

        ``x`` is the input the linear sees now (after earlier input-side adapters). A selected
        adapter's module is computed per row by its :meth:`SiteModule.rowwise` module instead.
        """
        if self.slot is not None:
            return self._wrap_rows(site, module, "output", pass_weight)
        name = self.add_module(site, module)
        output = site.output
        args: tuple[Any, ...] = (_current_input(site), output)
        with self.graph.inserting_after(output):
            if pass_weight:
                args += (self._weight_node(site), self._bias_node(site))
            node = self.graph.call_module(name, args)
        output.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        site.output = node  # a later adapter on this site wraps this one: spec order
        self._record(site, name, node, "output")
        return node

    def wrap_input(self, site: LinearSite, module: SiteModule) -> fx.Node:
        """Feed the linear ``module(x)`` instead of its input ``x`` (per row for a selected adapter)."""
        if self.slot is not None:
            return self._wrap_rows(site, module, "input", False)
        name = self.add_module(site, module)
        x = _current_input(site)
        with self.graph.inserting_before(site.node):
            node = self.graph.call_module(name, (x,))
        site.node.replace_input_with(x, node)
        self._record(site, name, node, "input")
        return node

    def call_module(self, site: Site, module: nn.Module, args: Sequence[Any], *,
                    before: fx.Node) -> fx.Node:
        """Insert ``module(*args)`` before ``before``; the caller rewires its users."""
        self._refuse_rows("call_module")
        name = self.add_module(site, module)
        with self.graph.inserting_before(before):
            node = self.graph.call_module(name, tuple(args))
        self._record(site, name, node, "custom")
        return node

    def shared_module(self, name: str, module: nn.Module, args: Sequence[Any] = (), *,
                      before: fx.Node | None = None) -> fx.Node:
        """Register ``module`` as ``<adapter>.<name>``, shared by the adapter's sites, and call it once.

        The call ``module(*args)`` goes before ``before`` (default: the graph's first
        computation after the inputs); its parameters count as the adapter's shared parameters in reports.
        """
        full = f"{self.config.name}.{name}"
        self._register(full, module, f"registered shared module {name!r} twice")
        before = before or first_computation(self.graph)
        with self.graph.inserting_before(before):
            return self.graph.call_module(full, tuple(args))

    def prepend_kv(self, site: AttentionSite, module: nn.Module, args: Sequence[Any] = ()) -> fx.Node:
        """Prepend slots to the attention's keys and values (prefix tuning).

        ``module(key, value, *args)`` returns ``(k_slots, v_slots)`` shaped like the key and
        value the attention sees (after RoPE and any head repetition) as ``[..., H, S, D]``
        with the slot count in dim -2, whichever form the attention has. Every mask or bias
        over the keys is widened so every query sees every slot (bool, additive float, causal,
        ALiBi or relative position bias); see :func:`pefc.sequence.prepend_kv`. For a selected
        adapter only the rows that select it see the slots (SDPA attentions).
        """
        name = self.add_module(site, module)
        if site.attention is None:
            raise PluginError(f"adapter {self.config.name!r}: attention site {site.path!r} has no graph pattern")
        visible = None
        if self.slot is not None:
            if site.attention.form != "sdpa":
                raise PluginError(f"adapter {self.config.name!r}: attention {site.path!r} is written out, not "
                                  "SDPA; its prefix cannot be selected per row (use attn_implementation: sdpa)")
            assert self.selection is not None
            visible = self.selection.mask(self.slot, site.attention.output)

        def make_slots(key: fx.Node, value: fx.Node) -> fx.Node:
            return self.graph.call_module(name, (key, value, *args))

        cache = self._widened_masks if visible is None else {}  # a selected adapter's mask is its own
        node = prepend_kv(self.graph, site.attention, make_slots, cache, visible=visible)
        self._record(site, name, node, "custom")
        return node

    def offset_positions(self, offset: int, sites: Sequence[AttentionSite] | None = None) -> int:
        """Shift the positions of the real tokens by ``offset`` (RoPE, position embeddings); with
        ``sites``, only the positions those attentions see (a decoder's, not its encoder's).

        Returns the number of places shifted (0 for a model without positions); see
        :func:`pefc.sequence.position_edges`. For a selected adapter only its rows are shifted.
        """
        if self.slot is not None:
            return self._offset_rows(offset, sites)
        return offset_positions(self.graph_module, offset, None if sites is None else {s.node for s in sites})

    def prepend_sequence(self, site: EmbeddingSite, module: nn.Module, length: int) -> fx.Node:
        """Replace the embedding output ``e`` by ``module(e)``, which prepends ``length`` items in dim -2.

        The rest of the graph then runs on ``S + length`` positions: sizes, positions, masks
        and sequence-carrying inputs are widened and sequence-shaped outputs sliced back to
        the real tokens; see :func:`pefc.sequence.prepend_sequence`. In a decode step
        (:attr:`decode`) the items are in the KV cache already: only positions shift by ``length``.
        """
        self._refuse_rows("prepend_sequence")
        name = self.add_module(site, module)
        if self.decode:  # the cache holds the prepended items; the new tokens sit after them
            offset_positions(self.graph_module, length)
            self._record(site, name, site.node, "custom")
            return site.node
        with self.graph.inserting_after(site.node):
            node = self.graph.call_module(name, (site.node,))
        prepend_sequence(self.graph_module, site.node, node, length)
        self._record(site, name, node, "custom")
        return node

    # -- per-row selection -------------------------------------------------------------------

    def _wrap_rows(self, site: LinearSite, module: SiteModule, placement: str, pass_weight: bool) -> fx.Node:
        """Register ``module`` (its parameters keep their names) and gather its row values into the
        site's row-wise call (see :mod:`pefc.selection`)."""
        assert self.selection is not None and self.slot is not None
        name = self.add_module(site, module)
        try:
            values = module.row_values()
            key = (site.path, placement, pass_weight, *module.row_key())
        except NotImplementedError as exc:
            raise PluginError(f"adapter {self.config.name!r} ({self.config.method}): {exc}") from None
        current = site.output if placement == "output" else _current_input(site)
        group = self.selection.group(key, current)
        if group is None:
            group = self._row_call(site, module, placement, pass_weight, len(values))
            self.selection.groups[key] = group
            self._rewire(site, placement, current, group.node)
        self.selection.join(group, self.slot, [self._attr_node(f"{name}.{v}") if isinstance(v, str) else v
                                               for v in values.values()])
        self._record(site, name, group.node, "rows")
        return group.node

    def _row_call(self, site: LinearSite, module: SiteModule, placement: str, pass_weight: bool,
                  count: int) -> RowGroup:
        """Insert a new group's helpers and its call of ``module.rowwise()`` at ``site``."""
        from pefc.selection import RowGroup

        assert self.selection is not None
        rows_name = self.selection.module_name()
        self._register(rows_name, module.rowwise(), f"placed row-wise module {rows_name!r} twice")
        args: tuple[Any, ...] = (_current_input(site),)
        if placement == "output":
            args += (site.output, *((self._weight_node(site), self._bias_node(site)) if pass_weight else ()))
        with self.graph.inserting_before(site.node if placement == "input" else site.output.next):
            index, stacks = self.selection.helpers(count)
            node = self.graph.call_module(rows_name, (*args, index, *stacks))
        return RowGroup(node, index, stacks)

    def _rewire(self, site: LinearSite, placement: str, current: fx.Node, node: fx.Node) -> None:
        """Make the new row-wise call ``node`` take the place of ``current`` at ``site``."""
        if placement == "output":
            current.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            site.output = node
        else:
            site.node.replace_input_with(current, node)

    def _offset_rows(self, offset: int, sites: Sequence[AttentionSite] | None) -> int:
        from pefc.selection import shift_rows
        from pefc.sequence import position_edges

        assert self.selection is not None and self.slot is not None
        edges = position_edges(self.graph_module, None if sites is None else {s.node for s in sites})
        fixed = [user for _, user in edges if user.target in _FIXED_BATCH_INDEXING]
        if fixed:  # per-row positions are [batch, ...]; these index a buffer expanded to the capture's batch
            raise PluginError(f"adapter {self.config.name!r} ({self.config.method}) is selected per row, but the "
                              f"model indexes a buffer by position ({fixed[0].name}), so its positions cannot "
                              "shift per row; keep it out of `select`")
        shifted: dict[fx.Node, fx.Node] = {}
        for node, user in edges:
            if node not in shifted:
                mask = self.selection.mask(self.slot, node.next)
                with self.graph.inserting_after(mask):
                    shifted[node] = self.graph.call_function(shift_rows, (node, mask, offset))
            user.replace_input_with(node, shifted[node])
        return len(edges)

    def _refuse_rows(self, placement: str) -> None:
        if self.slot is not None:
            raise PluginError(f"adapter {self.config.name!r} ({self.config.method}) is selected per row, but "
                              f"{placement} has no per-row form; keep it out of `select`")

    # -- internals -------------------------------------------------------------------------

    def _weight_node(self, site: LinearSite) -> fx.Node:
        if site.quantized:  # the dequantized weight the linear reads
            return site.node.args[1]  # type: ignore[return-value]
        return self._attr_node(site.weight_name)

    def _bias_node(self, site: LinearSite) -> fx.Node | None:
        return self._attr_node(site.bias_name) if site.bias_name else None

    def _attr_node(self, target: str) -> fx.Node:
        for node in self.graph.nodes:
            if node.op == "get_attr" and node.target == target:
                return node
        first = next(iter(self.graph.nodes))
        with self.graph.inserting_before(first):
            node = self.graph.get_attr(target)
        node.meta["pefc_inserted"] = True
        return node

    def _record(self, site: Site, name: str, node: fx.Node, placement: str) -> None:
        linear = site if isinstance(site, LinearSite) else None
        self._insertions.append(Insertion(
            adapter=self.config.name, method=self.config.method, module=name, node=node.name,
            placement=placement, site_path=site.path, site_kind=site.kind, site_role=site.role,
            weight_name=linear.weight_name if linear else None,
            bias_name=linear.bias_name if linear else None,
            weight_layout=linear.weight_layout if linear else None,
            slot=self.slot))


#: ops reading positions as indices into a tensor sized by the capture's batch (BERT's token types)
_FIXED_BATCH_INDEXING = (torch.ops.aten.gather.default,)


def _current_input(site: LinearSite) -> fx.Node:
    node = site.node
    if node.target is torch.ops.aten.addmm.default:
        return node.args[1]  # type: ignore[return-value]
    return node.args[0]  # type: ignore[return-value]
