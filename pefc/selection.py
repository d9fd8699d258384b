"""Per-row adapter selection (the spec's ``select``): one graph serves rows of different adapters.

The compiler adds the graph input ``select.input`` (int64 ``[batch]``; ``-1`` = none) and a
:class:`Selection` to every :class:`pefc.RewriteContext`. A selected adapter's placements then
act per row, through the same context calls as always:

- ``wrap_output`` / ``wrap_input`` (LoRA, DoRA, (IA)^3, bottleneck adapters): the module is
  registered as usual (``<adapter>.<site path>``, so its parameters keep their names) but not
  called. The core *gathers*: for the consecutive selected modules of one site sharing a
  :meth:`~pefc.SiteModule.row_key`, it stacks the tensors each names in
  :meth:`~pefc.SiteModule.row_values` (zero-padded to one shape, plus a zero entry for rows of
  no member) and calls their :meth:`~pefc.SiteModule.rowwise` module once, with the stacks and
  each row's entry (:func:`row_index`): batched products over gathered weights (BGMV).
- ``prepend_kv`` (prefix tuning): the adapter's slots join every row's keys and values and the
  widened mask hides them from rows that did not select the adapter.
- ``offset_positions``: the shift applies to the selecting rows only.

Each slot can be cleared (its rows run as ``-1``) and loaded again without recompiling
(:func:`clear_slot`, :func:`load_slot`), through the buffer ``_pefc_rows.enabled``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from pefc.checkpoint import check_tensor_fits
from pefc.errors import CheckpointError, PefcError

ROWS = "_pefc_rows"  # the top-level module holding the row-wise modules and the enabled-slots buffer
ENABLED = f"{ROWS}.enabled"


# --- runtime helpers (called from the graph) ------------------------------------------------

def row_index(ids: torch.Tensor, enabled: torch.Tensor, slots: tuple[int, ...]) -> torch.Tensor:
    """Each row's entry among a group's members: ``j`` where ``ids == slots[j]`` (and that slot is
    enabled), else ``len(slots)`` (the zero entry)."""
    index = torch.full_like(ids, len(slots))
    for j, slot in enumerate(slots):
        index = torch.where((ids == slot) & enabled[slot], j, index)
    return index


def row_mask(ids: torch.Tensor, enabled: torch.Tensor, slot: int) -> torch.Tensor:
    """``[batch]`` bool: the rows running the adapter of ``slot``."""
    return (ids == slot) & enabled[slot]


def stack_rows(values: tuple[Any, ...], like: torch.Tensor) -> torch.Tensor:
    """``[members + 1, ...]``: ``values`` (tensors zero-padded to one shape, or numbers) and a zero entry."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        dtype = torch.int64 if all(isinstance(v, int) for v in values) else torch.float32
        return torch.tensor([*values, 0], dtype=dtype, device=like.device)
    shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
    padded = [_pad_to(v, shape) for v in values]
    return torch.stack([*padded, torch.zeros_like(padded[0])])


def _pad_to(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    pad: list[int] = []
    for dim in reversed(range(tensor.dim())):
        pad += [0, shape[dim] - tensor.shape[dim]]
    return F.pad(tensor, pad) if any(pad) else tensor


def by_row(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` (``[batch, ..., d]`` or ``[batch * tokens, d]``, batch-major) as ``[batch, tokens, d]``."""
    return x.reshape(rows, -1, x.shape[-1])


def shift_rows(positions: torch.Tensor, mask: torch.Tensor, offset: int) -> torch.Tensor:
    """``positions`` shifted by ``offset`` in the rows of ``mask`` (dim 0 is the batch, or absent)."""
    shift = mask.to(positions.dtype) * offset
    if positions.dim() <= 1:
        return positions.unsqueeze(0) + shift[:, None]
    return positions + shift.view(-1, *([1] * (positions.dim() - 1)))


# --- the graph side ----------------------------------------------------------------------------

@dataclass
class RowGroup:
    """Consecutive selected modules of one site computed by one row-wise call."""

    node: fx.Node
    index: fx.Node
    stacks: list[fx.Node]
    slots: list[int] = field(default_factory=list)


class Selection:
    """The selection input of one graph and the row groups placed so far."""

    def __init__(self, graph_module: fx.GraphModule, select: Any) -> None:
        self.graph_module = graph_module
        self.slots = {name: i for i, name in enumerate(select.adapters)}
        self.ids = add_input(graph_module, select.input)
        self.groups: dict[tuple[Any, ...], RowGroup] = {}
        holder = nn.Module()
        holder.register_buffer("enabled", torch.ones(len(select.adapters), dtype=torch.bool), persistent=False)
        graph_module.add_submodule(ROWS, holder)
        with graph_module.graph.inserting_after(self.ids):
            self.enabled = graph_module.graph.get_attr(ENABLED)
        self._count = 0

    def slot(self, adapter: str) -> int | None:
        return self.slots.get(adapter)

    def module_name(self) -> str:
        self._count += 1
        return f"{ROWS}.m{self._count}"

    def mask(self, slot: int, before: fx.Node) -> fx.Node:
        """A ``[batch]`` bool node: the rows of ``slot``."""
        with self.graph_module.graph.inserting_before(before):
            return self.graph_module.graph.call_function(row_mask, (self.ids, self.enabled, slot))

    def group(self, key: tuple[Any, ...], current: fx.Node) -> RowGroup | None:
        """The group ``key`` if its call is ``current`` (nothing was placed after it at its site)."""
        group = self.groups.get(key)
        return group if group is not None and group.node is current else None

    def helpers(self, count: int) -> tuple[fx.Node, list[fx.Node]]:
        """A new group's ``row_index`` node and ``count`` ``stack_rows`` nodes (at the insertion point);
        :meth:`join` fills them."""
        graph = self.graph_module.graph
        index = graph.call_function(row_index, (self.ids, self.enabled, ()))
        return index, [graph.call_function(stack_rows, ((), self.ids)) for _ in range(count)]

    def join(self, group: RowGroup, slot: int, values: list[Any]) -> None:
        """Add the member of ``slot`` whose row values (get_attr nodes or numbers) are ``values``."""
        group.slots.append(slot)
        group.index.args = (self.ids, self.enabled, tuple(group.slots))
        for stack, value in zip(group.stacks, values, strict=True):
            stack.args = ((*stack.args[0], value), self.ids)


def add_input(graph_module: fx.GraphModule, name: str) -> fx.Node:
    """Append the keyword input ``name`` to the graph (and to its pytree signature)."""
    graph = graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(n.target == name for n in placeholders):
        raise PefcError(f"select.input: the model already has an input named {name!r}; choose another name")
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None):
        node = graph.placeholder(name)
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None:
        names = [*info.orig_args, name]
        graph._codegen.pytree_info = info._replace(orig_args=names,
                                                   in_spec=pytree.tree_structure(((), dict.fromkeys(names, 0))))
    return node


# --- calls: checking adapter_ids ---------------------------------------------------------------

def check_ids(model: Any, inputs: dict[str, Any]) -> None:
    """Refuse ``adapter_ids`` that are not int64 ``[batch]`` in ``[-1, len(select.adapters))``."""
    select = model.pefc.spec.select
    ids = inputs.get(select.input)
    name, count = select.input, len(select.adapters)
    if not isinstance(ids, torch.Tensor):
        raise PefcError(f"{name} must be an int64 tensor [batch] (one adapter index per row), "
                        f"got {type(ids).__name__}")
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise PefcError(f"{name} must be int64 [batch], got {str(ids.dtype).removeprefix('torch.')} "
                        f"{list(ids.shape)}")
    batch = _batch_size(model, inputs)
    if batch is not None and ids.shape[0] != batch:
        raise PefcError(f"{name} has {ids.shape[0]} entries but the batch has {batch} rows")
    if torch.compiler.is_exporting() or ids.numel() == 0 or ids.device.type == "meta":
        return
    low, high = int(ids.min()), int(ids.max())
    if low < -1 or high >= count:
        bad = low if low < -1 else high
        raise PefcError(f"{name} holds {bad}, out of range: -1 (none) or 0..{count - 1} "
                        f"({', '.join(select.adapters)})")


def _batch_size(model: Any, inputs: dict[str, Any]) -> int | None:
    """The size of the first dim of the spec's first input, which ``select.input`` shares."""
    for key, entry in model.pefc.spec.inputs.items():
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and entry.shape and value.dim() == len(entry.shape):
            return int(value.shape[0])
    return None


def example_ids(spec: Any, batch: int, *, seed: int = 0, device: Any = "cpu") -> torch.Tensor:
    """Random ``adapter_ids`` ``[batch]`` in ``-1 .. n-1`` (every value once where the batch allows)."""
    count = len(spec.select.adapters)
    values = torch.arange(-1, count).repeat(batch // (count + 1) + 1)[:batch]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    return values[order].to(device)


def with_example_ids(spec: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` and example ``adapter_ids`` for their batch (export and ONNX verification)."""
    first = next((v for k, v in inputs.items() if k in spec.inputs and isinstance(v, torch.Tensor) and v.dim()), None)
    batch = int(first.shape[0]) if first is not None else 1
    seed = int(first.sum()) % 1000 if first is not None and not first.is_floating_point() else 0
    device = first.device if first is not None else "cpu"
    return {**inputs, spec.select.input: example_ids(spec, batch, seed=seed, device=device)}


def ids_dynamic_shape(spec: Any) -> dict[int, str] | None:
    """``adapter_ids``' dynamic dim: the batch dim name of the spec's inputs (None: a static batch)."""
    for entry in spec.inputs.values():
        if entry.shape and isinstance(entry.shape[0], str):
            return {0: entry.shape[0]}
    return None


# --- slots: clear and load without recompiling -------------------------------------------------

def _slot_of(model: Any, adapter: str) -> int:
    select = model.pefc.spec.select
    if select is None or adapter not in select.adapters:
        chosen = ", ".join(select.adapters) if select is not None else "none: the spec has no `select`"
        raise PefcError(f"{adapter!r} is not a selected adapter (selected: {chosen})")
    return select.adapters.index(adapter)


def clear_slot(model: Any, adapter: str) -> None:
    """Make rows that select ``adapter`` run as ``-1`` (none) until :func:`load_slot` fills it again."""
    getattr(model, ROWS).enabled[_slot_of(model, adapter)] = False


def load_slot(model: Any, adapter: str, directory: str | Path, *, source: str | None = None) -> None:
    """Load ``adapter``'s tensors from a pefc checkpoint (``save_adapters``) or an HF PEFT directory.

    ``source`` names the adapter in a pefc checkpoint holding several (default: ``adapter``, or
    the only one). The checkpoint must have the same method, sites and shapes (and, for LoRA and
    DoRA, the same scaling); the other slots keep serving. The slot is enabled afterwards.
    """
    slot = _slot_of(model, adapter)
    path = Path(directory)
    if (path / "adapter_config.json").is_file():
        tensors = _peft_tensors(model, adapter, path)
    else:
        tensors = _pefc_tensors(model, adapter, path, source)
    own = {k: v for k, v in model.adapter_state_dict().items() if k.split(".", 1)[0] == adapter}
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        what = f"has no tensor for {missing[0]!r}" if missing else f"has tensor {extra[0]!r} the slot lacks"
        raise CheckpointError(f"{path}: the checkpoint {what}; it was saved for other sites or another model")
    for key, value in tensors.items():
        check_tensor_fits(str(path), key, value, own[key], holder=f"slot {adapter!r}", same_dtype=False)
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))
    getattr(model, ROWS).enabled[slot] = True


_RUNTIME_KEYS = {"name", "dropout", "dropout_scope"}


def _pefc_tensors(model: Any, adapter: str, path: Path, source: str | None) -> dict[str, torch.Tensor]:
    from pefc.checkpoint import metadata_spec, read_checkpoint_file

    tensors, metadata, file = read_checkpoint_file(path)
    saved = {a["name"]: a for a in metadata_spec(file, metadata)["adapters"]}
    name = source or (adapter if adapter in saved else next(iter(saved)) if len(saved) == 1 else None)
    if name not in saved:
        raise CheckpointError(f"{file}: holds adapters {sorted(saved)}; pass source= to name the one to load")
    config = next(a for a in model.pefc.spec.adapters if a.name == adapter)
    mine = config.model_dump(mode="json")
    for key in sorted((set(saved[name]) | set(mine)) - _RUNTIME_KEYS):
        if saved[name].get(key, mine.get(key)) != mine.get(key):
            raise CheckpointError(f"{file}: adapter {name!r} differs from slot {adapter!r} in {key!r}: checkpoint "
                                  f"{saved[name].get(key)!r}, slot {mine.get(key)!r}")
    prefix = f"{name}."
    return {f"{adapter}.{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)}


def _peft_tensors(model: Any, adapter: str, path: Path) -> dict[str, torch.Tensor]:
    from pefc.interop.peft_files import check_supported, read_peft_dir
    from pefc.interop.peft_load import method_of, pefc_tensors

    checkpoint = read_peft_dir(path)
    check_supported(checkpoint)
    method = method_of(checkpoint)
    config = next(a for a in model.pefc.spec.adapters if a.name == adapter)
    if method != config.method:
        raise CheckpointError(f"{path}: a {method} checkpoint cannot fill slot {adapter!r} ({config.method})")
    if method in ("lora", "dora"):
        _same_lora_scaling(checkpoint, config, path)
    return pefc_tensors(checkpoint, model, adapter, method)


def _same_lora_scaling(checkpoint: Any, config: Any, path: Path) -> None:
    """The slot's scaling is a constant of the graph: the checkpoint must imply the same one."""
    given = {"r": checkpoint.get("r"), "alpha": checkpoint.get("lora_alpha"),
             "rslora": bool(checkpoint.get("use_rslora", False))}
    for key, value in given.items():
        if value is not None and value != getattr(config, key):
            raise CheckpointError(f"{path}: the checkpoint has {key} {value!r} but slot {config.name!r} has "
                                  f"{getattr(config, key)!r}; LoRA's scaling is fixed when compiling")
    if checkpoint.get("rank_pattern") or checkpoint.get("alpha_pattern"):
        raise CheckpointError(f"{path}: the checkpoint sets rank_pattern / alpha_pattern, whose per-site scaling a "
                              "slot cannot take; load it with pefc.interop.peft.load instead")
