"""CompiledModel: the rewritten graph as a trainable ``nn.Module``.

It is an ``fx.GraphModule`` whose code keeps the original call signature and output type
(transformers models keep returning their output dataclass). Base parameters keep their
original names and are frozen; adapter parameters are named
``<adapter name>.<site path>.<param>`` and are the only trainable ones.
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from pydantic import ValidationError
from torch import nn

from pefc.checkpoint import (
    check_tensor_fits,
    metadata_spec,
    other_model_note,
    read_checkpoint_file,
    save_checkpoint,
)
from pefc.errors import CheckpointError, NumericalError, PefcError
from pefc.fxsource import track as track_source
from pefc.report import AdapterReport, ParameterReport, SiteReport, dtype_name
from pefc.rewrite import BakeableModule
from pefc.simplify import expand_grouped_kv
from pefc.state import CompileState

_PRESERVED = "_user_preserved_attributes"  # fx.GraphModule restores these on deepcopy


class CompiledModel(fx.GraphModule):
    """A base model with adapters inserted into its captured graph."""

    pefc: CompileState

    @classmethod
    def create(cls, graph_module: fx.GraphModule, state: CompileState) -> CompiledModel:
        model = cls(graph_module, graph_module.graph, class_name="CompiledModel")
        model.attach_state(state)
        return model

    def attach_state(self, state: CompileState) -> None:
        self.pefc = state
        self.meta.setdefault(_PRESERVED, {})["pefc"] = state
        _sign_forward(self)

    def attach_loss_head(self, head: nn.Module) -> None:
        """Run ``head`` (:class:`pefc.call.LossHead`) on the outputs when the caller gives the loss inputs."""
        from pefc.call import LOSS_HEAD

        setattr(self, LOSS_HEAD, head)
        self.meta.setdefault(_PRESERVED, {})[LOSS_HEAD] = head  # kept by deepcopy, which rebuilds the module
        _sign_forward(self)

    def __str__(self) -> str:
        return self.__repr__()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call as the original: omitted optional inputs get their defaults, loss inputs give ``.loss``."""
        from pefc.call import LOSS_HEAD, bind, bind_planned

        if not hasattr(self, "pefc"):
            return super().__call__(*args, **kwargs)
        if torch.compiler.is_compiling():  # dynamo traces plain data, not the fx graph (pefc.call.CallPlan)
            inputs, labels = bind_planned(self, self._pefc_call_plan, args, kwargs)
        else:
            inputs, labels = bind(self, args, kwargs)
        if getattr(self.pefc.spec, "select", None) is not None:
            from pefc.selection import check_ids

            check_ids(self, inputs)
        out = super().__call__(**inputs)
        return getattr(self, LOSS_HEAD)(out, inputs, labels) if labels else out

    def __repr__(self) -> str:
        report = self.parameter_report()
        names = ", ".join(f"{a.name}:{a.method}" for a in report.adapters) or "no adapters"
        return (f"CompiledModel({names}; trainable {report.trainable_params:,} of "
                f"{report.base_params:,} base params)")

    def _apply(self, fn: Any, recurse: bool = True) -> CompiledModel:
        """``.to()`` / ``.cuda()`` / ``.half()``: move tensors, then retarget the graph's constants."""
        before = _placement(self)
        super()._apply(fn, recurse)
        after = _placement(self)
        if before is not None and after is not None and before != after:
            retarget_constants(self.graph, old=before, new=after)
            _retarget_loss_head(self, old=before, new=after)
            if after[0].type != "cpu":
                expand_grouped_kv(self.graph)  # see pefc.simplify: fused grouped-query attention is for CPU
            self.recompile()
        return self

    def recompile(self) -> Any:
        """Regenerate the code from the flat graph, lowered (:mod:`pefc.lowering`) and cut per layer if
        the layers are :class:`LayerBlock` s."""
        from pefc.layers import bind_layer_blocks, layer_blocks, plan_partition
        from pefc.lowering import lowered_graph

        blocks = dict(layer_blocks(self))
        flat = self._graph
        lowered = lowered_graph(self, flat)
        partition = plan_partition(lowered, list(blocks)) if blocks else None
        self._graph = partition.root if partition is not None else lowered
        try:
            code = super().recompile()
        finally:
            self._graph = flat
        if partition is not None:
            bind_layer_blocks(self, blocks, partition)
        track_source(self)  # forget the generated source once this forward is replaced or dies
        _sign_forward(self)
        return code

    # -- per-layer regions: FSDP2 and activation checkpointing -------------------------------

    def partition_layers(self, paths: list[str] | None = None) -> list[str]:
        """Make each decoder layer a called module running its part of the graph (see :mod:`pefc.layers`).

        Names, ``state_dict`` keys, outputs and ``graph`` do not change. Returns the layer paths.
        """
        from pefc.layers import partition_layers

        return partition_layers(self, paths)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, *,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations (while training).

        ``gradient_checkpointing_kwargs`` go to :func:`torch.utils.checkpoint.checkpoint`
        (non-reentrant by default); ``every_n_layers`` checkpoints layers 0, n, 2n, ...
        """
        if offload:
            raise PefcError("activation offloading is not supported; use gradient checkpointing without offload")
        if every_n_layers < 1:
            raise PefcError(f"every_n_layers must be at least 1, got {every_n_layers}")
        from pefc.layers import layer_blocks

        self.partition_layers([path for path, _ in layer_blocks(self)] or None)
        for index, (_, block) in enumerate(layer_blocks(self)):
            block.checkpoint = index % every_n_layers == 0
            block.checkpoint_kwargs = dict(gradient_checkpointing_kwargs or {})

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None, *,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (HF ``Trainer`` calls it)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                           offload=offload)

    def gradient_checkpointing_disable(self) -> None:
        from pefc.layers import layer_blocks

        for _, block in layer_blocks(self):
            block.checkpoint = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        from pefc.layers import layer_blocks

        return any(block.checkpoint for _, block in layer_blocks(self))

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledModel:
        copied = super().__deepcopy__(memo)
        if getattr(getattr(copied, "pefc", None), "lowerings", None):
            copied.recompile()  # deepcopy generated the code before the compile state was back
        return copied

    def clone(self) -> CompiledModel:
        """A deep copy (weights, adapters, graph and compile state)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch pytree spec deprecation noise
            copied = copy.deepcopy(self)
        _sign_forward(copied)  # deepcopy regenerates forward before the compile state is back
        return copied

    # -- parameters ------------------------------------------------------------------------

    def adapter_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name in self.pefc.adapter_names:
            if hasattr(self, name):
                yield name, getattr(self, name)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of every adapter (parameters and persistent buffers), by full name.

        The tensors are the model's own (detached); under FSDP2 they are sharded ``DTensor`` s.
        """
        state: dict[str, torch.Tensor] = {}
        for name, module in self.adapter_modules():
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value
        for name in self.pefc.saved_params:  # modules_to_save, under their base names
            state[name] = self.get_parameter(name).detach()
        return state

    def check_finite(self) -> None:
        """Raise :class:`pefc.NumericalError` naming the first adapter tensor with NaN or Inf."""
        from pefc.collectives import local_tensor

        for name, shared in self.adapter_state_dict().items():
            tensor = local_tensor(shared)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise NumericalError(f"adapter tensor {name!r} holds {bad} NaN/Inf values",
                                     hint="lower the learning rate, or use float32 adapters (adapter_dtype)")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_report(self) -> ParameterReport:
        """Trainable parameters per adapter, site and method; % of base; mergeable."""
        adapters = []
        for config in self.pefc.spec.adapters:
            root = getattr(self, config.name, None)
            total = sum(p.numel() for p in root.parameters() if p.requires_grad) if root is not None else 0
            sites, seen = [], set()
            for ins in self.pefc.insertions:
                if ins.adapter != config.name or ins.module in seen:
                    continue
                seen.add(ins.module)
                module = self.get_submodule(ins.module)
                params = sum(p.numel() for p in module.parameters() if p.requires_grad)
                sites.append(SiteReport(ins.site_path, ins.site_role, ins.site_kind, params,
                                        _layer(ins.site_path)))
            adapters.append(AdapterReport(
                config.name, config.method, total, self.pefc.mergeable.get(config.method, False), sites,
                shared_params=total - sum(s.params for s in sites),
                formula_params=self.pefc.formula_params.get(config.name),
                extra=dict(self.pefc.extras.get("report", {}).get(config.name, {}))))
        from pefc.trainable import report

        saved = report(self, self.pefc.saved_params)
        adapters += [saved] if saved is not None else []
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        from pefc.quant import base_format, stored_bytes

        floats = [p for p in self.parameters() if p.is_floating_point()]
        return ParameterReport(self.pefc.base_params, trainable, adapters,
                               base_dtype=dtype_name({p.dtype for p in floats if not p.requires_grad}),
                               adapter_dtype=dtype_name({p.dtype for p in floats if p.requires_grad}),
                               base_bytes=stored_bytes(self, exclude=set(self.pefc.adapter_names)),
                               quantized=base_format(self))

    # -- checkpoints -----------------------------------------------------------------------

    def save_adapters(self, directory: str | Path, *, writer: bool | None = None) -> Path:
        """Write ``directory/adapters.safetensors`` and ``directory/spec.json`` (atomic, no pickle).

        In a distributed run (``torch.distributed`` initialised, several ranks) rank 0 writes
        (``writer=True`` makes this process write, e.g. a Trainer's ``should_save`` process).
        Sharded adapters (FSDP2) are gathered first, a collective: call it on every rank; the
        ranks then wait for the write. Replicated adapters (DDP) need no collective, so
        ``if rank == 0: cm.save_adapters(...)`` works too; other ranks return at once.
        """
        from pefc.collectives import barrier, full_tensors, is_main_process, is_sharded
        from pefc.trainable import check_all_saved

        tensors = self.adapter_state_dict()
        check_all_saved(self, tensors)
        sharded = any(is_sharded(t) for t in tensors.values())
        if sharded:
            tensors = full_tensors(tensors)
        path = Path(directory)
        if writer if writer is not None else is_main_process():
            self._write_adapters(path, tensors)
        if sharded:
            barrier()
        return path

    def _write_adapters(self, path: Path, tensors: dict[str, torch.Tensor]) -> Path:
        return save_checkpoint(path, tensors, self.pefc.spec.to_json(),
                               extra={"base_params": str(self.pefc.base_params),
                                      "base_class": str(self.pefc.base_info.get("class", ""))})

    def load_adapters(self, directory: str | Path) -> None:
        """Load adapter tensors saved by :meth:`save_adapters`; refuse a checkpoint that does not fit."""
        tensors, metadata, file = read_checkpoint_file(directory)
        spec = metadata_spec(file, metadata)
        where = str(file)
        _check_adapters_match(where, spec["adapters"], self.pefc.spec)
        own = self.adapter_state_dict()
        missing = [k for k in own if k not in tensors]
        extra = [k for k in tensors if k not in own]
        note = other_model_note(metadata, spec, self.pefc.base_info.get("class"), self.pefc.base_params)
        if missing:
            raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing from the checkpoint "
                                  f"({len(missing)} missing){note}")
        if extra:
            raise CheckpointError(f"{where}: the checkpoint has tensor {extra[0]!r} that this model does not "
                                  f"have ({len(extra)} unexpected){note}")
        for key, target in own.items():
            check_tensor_fits(where, key, tensors[key], target, hint=note or " (was it saved for another base model?)")
        from pefc.collectives import copy_into

        with torch.no_grad():
            for key, target in own.items():
                copy_into(target, tensors[key])

    def load_slot(self, adapter: str, directory: str | Path, *, source: str | None = None) -> None:
        """Load selected adapter ``adapter`` from a pefc or HF PEFT checkpoint, no recompiling (pefc.selection)."""
        from pefc.selection import load_slot

        load_slot(self, adapter, directory, source=source)

    def clear_slot(self, adapter: str) -> None:
        """Make the rows selecting ``adapter`` run with none until :meth:`load_slot` (pefc.selection)."""
        from pefc.selection import clear_slot

        clear_slot(self, adapter)

    # -- merging ---------------------------------------------------------------------------

    def merge(self, *, quantize: bool = False) -> CompiledModel:
        """A copy with every mergeable adapter folded into the base weights (``self`` is untouched).

        Over a quantized base the folded weights are dequantized (a float model, exact); with
        ``quantize=True`` they are quantized again and the measured error is in
        ``merged.pefc.extras["quantization_error"]`` (see :mod:`pefc.quant_merge`).
        """
        from pefc.merge import merge_model

        return merge_model(self, quantize=quantize)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **options: Any) -> torch.Tensor:
        """Continue ``input_ids`` (causal LMs): greedy, or sampled with ``do_sample=True``.

        One prefill, then one decode step per token on a KV cache (``use_cache=False``
        recomputes the full sequence); see :func:`pefc.generate.generate` for ``attention_mask``, ``temperature``, ``top_k``,
        ``top_p``, ``seed`` / ``generator``, ``eos_token_id`` and ``pad_token_id``.
        """
        from pefc.generate import generate

        return generate(self, input_ids, max_new_tokens, **options)

    def save_merged(self, directory: str | Path) -> Path:
        """Write the merged model as a transformers ``save_pretrained`` directory (see :mod:`pefc.hfexport`)."""
        from pefc.hfexport import save_merged

        return save_merged(self, directory)

    def bake(self) -> CompiledModel:
        """A copy with every :class:`pefc.BakeableModule` replaced by its baked form (``self`` is untouched).

        Training-time reparameterisations (e.g. the prefix-tuning MLP) become plain parameters
        with the same outputs, for inference and export; the graph is unchanged.
        """
        baked = self.clone()
        done: list[str] = []
        for name, module in list(baked.named_modules()):
            if isinstance(module, BakeableModule) and not any(name.startswith(d + ".") for d in done):
                done.append(name)
                parent, _, leaf = name.rpartition(".")
                setattr(baked.get_submodule(parent), leaf, module.bake())
        return baked


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """Device and dtype of the first floating-point parameter (the base model's)."""
    tensor = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (tensor.device, tensor.dtype) if tensor is not None else None


def retarget_constants(graph: fx.Graph, *, old: tuple[torch.device, torch.dtype],
                       new: tuple[torch.device, torch.dtype]) -> None:
    """Replace the capture's device and floating dtype constants in node arguments.

    Captured graphs carry them in casts and tensor constructors (``arange(device=cpu)``,
    ``to(float32)``); after a move they must follow the weights. An intentional upcast to
    the old dtype (e.g. an RMSNorm computed in float32) follows too: capture in the target
    dtype (``model.dtype`` in the spec) to keep such casts exact.
    """
    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and _same_device(value, old[0]):
            return new[0]
        if isinstance(value, torch.dtype) and value == old[1]:
            return new[1]
        return value

    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)


def _retarget_loss_head(model: nn.Module, *, old: tuple[torch.device, torch.dtype],
                        new: tuple[torch.device, torch.dtype]) -> None:
    from pefc.call import LOSS_HEAD

    head = getattr(model, LOSS_HEAD, None)
    if head is not None:
        retarget_constants(head.loss.graph, old=old, new=new)
        head.loss.recompile()


def _sign_forward(model: nn.Module) -> None:
    """Give the generated ``forward`` the call signature (optional inputs, labels) tools inspect."""
    from pefc.call import call_plan, signature_of

    if hasattr(model, "pefc"):
        model._pefc_call_plan = call_plan(model)
        signature = signature_of(model)
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        type(model).forward.__signature__ = signature.replace(parameters=[this, *signature.parameters.values()])


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _layer(path: str) -> int | None:
    from pefc.sites import layer_of

    return layer_of(path)


def _check_adapters_match(where: str, saved: list[dict[str, Any]], spec: Any) -> None:
    current = [json.loads(a.model_dump_json()) for a in spec.adapters]
    saved_names = [a.get("name") for a in saved]
    names = [a["name"] for a in current]
    if saved_names != names:
        raise CheckpointError(f"{where}: the checkpoint holds adapters {saved_names} but the model has {names}")
    for old, new, config in zip(saved, current, spec.adapters, strict=True):
        defaults = _defaults(config)
        for key in sorted((set(old) | set(new)) - set(config.runtime_keys)):
            before = old.get(key, defaults.get(key))  # a key added since the checkpoint was saved: its default
            if before != new.get(key):
                raise CheckpointError(f"{where}: adapter {new['name']!r} differs in {key!r}: "
                                      f"checkpoint {before!r}, model {new.get(key)!r}")


def _defaults(config: Any) -> dict[str, Any]:
    """The default value of every key of ``config``'s class, as JSON data ({} if some key has no default)."""
    try:
        return json.loads(type(config).model_validate({"name": config.name}).model_dump_json())
    except ValidationError:
        return {}
