"""HF PEFT checkpoint -> pefc adapter entry, and PEFT tensors -> pefc parameters.

Which modules an adapter covers is read from the tensor file (PEFT saves one set of tensors
per adapted module), so every way PEFT has of choosing them (a list, a regex,
``layers_to_transform``, ``exclude_modules``) imports exactly. The entry uses PEFT's own
names as pefc selectors where pefc's matching picks the same modules (``target_modules``
as a list of names: ``q_proj`` matches ``*.q_proj`` in both), and exact module paths
otherwise. ``rank_pattern`` / ``alpha_pattern`` become the LoRA entry's keys of the same
names (per-site overrides; pefc selectors, PEFT's keys where they match the same modules).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pefc.errors import CheckpointError
from pefc.interop.peft_files import CONFIG_FILE, PeftCheckpoint
from pefc.sites import LinearSite, layer_of
from pefc.targets import selector_matches

LORA_LEAVES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
_PLAIN_NAME = re.compile(r"^[\w\-]+(\.[\w\-]+)*$")


def method_of(checkpoint: PeftCheckpoint) -> str:
    """The pefc method of a PEFT checkpoint; refuses PEFT types pefc does not import."""
    methods = {"IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
    if checkpoint.peft_type == "LORA":
        return "dora" if checkpoint.config.get("use_dora") else "lora"
    if checkpoint.peft_type not in methods:
        raise CheckpointError(f"{checkpoint.directory / CONFIG_FILE}: peft_type {checkpoint.peft_type!r} has no "
                              "pefc equivalent; pefc imports LORA (with or without DoRA), IA3, PREFIX_TUNING "
                              "and PROMPT_TUNING")
    return methods[checkpoint.peft_type]


def adapter_entry(checkpoint: PeftCheckpoint, base: nn.Module, name: str,
                  method: str) -> tuple[dict[str, Any], list[str]]:
    """The pefc spec entry equivalent to the checkpoint's adapter on ``base``, and the modules it adapts.

    (No modules for prefix and prompt tuning, which act on every attention / the embedding.)
    """
    if method in ("prefix", "prompt"):
        _expect_keys(checkpoint, {"prompt_embeddings"})
        entry = {"name": name, "method": method, "num_virtual_tokens": int(checkpoint.required("num_virtual_tokens"))}
        if method == "prefix" and _seq2seq(checkpoint):  # PEFT prefixes the decoder's self-attention only
            entry["target"] = ["@attn[decoder]"]
        return entry, []
    leaves = ("ia3_l",) if method == "ia3" else LORA_LEAVES
    modules = adapted_modules(checkpoint, base, leaves)
    keys = _ia3_keys(checkpoint, base, modules) if method == "ia3" else _lora_keys(checkpoint, base, modules, method)
    return {"name": name, "method": method, **keys}, modules


def exact_entry(entry: dict[str, Any], modules: list[str]) -> dict[str, Any]:
    """``entry`` with its targets as exact module paths and no layer filter."""
    entry = {**entry, "target": list(modules)}
    entry.pop("layers", None)
    return entry


# --- modules_to_save -------------------------------------------------------------------------

def saved_modules(checkpoint: PeftCheckpoint, base: nn.Module) -> tuple[PeftCheckpoint, dict[str, torch.Tensor],
                                                                         list[str]]:
    """Split off the ``modules_to_save`` tensors: ``(checkpoint of the adapter's own tensors,
    {base parameter name: tensor}, the spec's modules_to_save)``.

    PEFT saves a module whose path ends with one of the names under its base parameter names;
    the spec gets PEFT's names where pefc's matching picks the same parameters, else exact paths.
    """
    from dataclasses import replace

    from pefc.trainable import matching_parameters, saved_parameters

    names = checkpoint.get("modules_to_save", [])
    if not names:
        return checkpoint, {}, []
    params = {name for name, _ in base.named_parameters(remove_duplicate=False)}
    modules = {path for path, _ in base.named_modules()}
    saved: dict[str, str] = {}
    for key in checkpoint.tensors:
        parts = key.split(".")[:-1]
        owner = next((p for p in (".".join(parts[:end]) for end in range(1, len(parts) + 1))
                      if p in modules and any(p.endswith(n) for n in names)), None)
        if key in params and owner is not None:
            saved[key] = owner
    tensors = {k: v for k, v in checkpoint.tensors.items() if k not in saved}
    chosen = [n for n in names if matching_parameters(base, n)]
    if set(saved_parameters(base, chosen)) != set(saved):
        chosen = sorted(set(saved.values()))
    return replace(checkpoint, tensors=tensors), {k: checkpoint.tensors[k] for k in saved}, chosen


# --- which modules ---------------------------------------------------------------------------

def adapted_modules(checkpoint: PeftCheckpoint, base: nn.Module, leaves: tuple[str, ...]) -> list[str]:
    """Module paths the checkpoint has tensors for, in the base model's order; each must exist."""
    paths: dict[str, None] = {}
    for key in checkpoint.tensors:
        leaf = next((leaf for leaf in leaves if key.endswith("." + leaf)), None)
        if leaf is None:
            raise CheckpointError(f"{checkpoint.weights_file}: tensor {key!r} is not one of PEFT's "
                                  f"{checkpoint.peft_type} tensors ({', '.join(leaves)}); trained biases, "
                                  "modules_to_save and LoRA on embeddings have no pefc equivalent")
        paths[key[:-len(leaf) - 1]] = None
    if not paths:
        raise CheckpointError(f"{checkpoint.weights_file} holds no tensors")
    order = {path: index for index, (path, _) in enumerate(base.named_modules())}
    for path in paths:
        if path not in order:
            raise CheckpointError(_missing_module(checkpoint, base, path, list(order)))
    return sorted(paths, key=order.__getitem__)


def _missing_module(checkpoint: PeftCheckpoint, base: nn.Module, path: str, names: list[str]) -> str:
    near = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
    return (f"{checkpoint.weights_file}: the checkpoint adapts module {path!r}, which the base model "
            f"{type(base).__name__} does not have (was it saved for another model?)"
            + (f"; nearest modules: {', '.join(near)}" if near else ""))


def linear_modules(base: nn.Module) -> list[str]:
    """Paths of the modules pefc sees as linear sites (nn.Linear, transformers' Conv1D)."""
    return [path for path, module in base.named_modules()
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"]


def _plain_names(value: Any) -> list[str] | None:
    """PEFT names that mean the same as pefc path selectors: a list of plain dotted names.

    (A string is a regex PEFT full-matches against the path: no pefc equivalent.)
    """
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and _PLAIN_NAME.match(v) for v in value):
        return None
    return sorted(value)


def _layers(checkpoint: PeftCheckpoint) -> list[int] | None:
    layers = checkpoint.config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    return [layers] if isinstance(layers, int) else [int(i) for i in layers]


def _selected(selectors: list[str], layers: list[int] | None, candidates: list[str]) -> set[str]:
    """What pefc's matching picks among ``candidates``."""
    return {path for path in candidates
            if any(selector_matches(s, _site(path)) for s in selectors)
            and (layers is None or layer_of(path) in layers)}


def _site(path: str) -> LinearSite:
    return LinearSite(path=path, node=None, layer=layer_of(path))


def _targets(checkpoint: PeftCheckpoint, base: nn.Module, modules: list[str]) -> dict[str, Any]:
    """``target`` (and ``layers``): PEFT's names if pefc picks the same modules, else exact paths."""
    names, layers = _plain_names(checkpoint.config.get("target_modules")), _layers(checkpoint)
    if names and _selected(names, layers, linear_modules(base)) == set(modules):
        return {"target": names, **({"layers": layers} if layers is not None else {})}
    return {"target": list(modules)}


# --- LoRA / DoRA -------------------------------------------------------------------------------

def peft_pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` lookup: the first key matching a suffix of ``path`` as a regex."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _lora_keys(checkpoint: PeftCheckpoint, base: nn.Module, modules: list[str], method: str) -> dict[str, Any]:
    config = checkpoint.config
    r, alpha = int(checkpoint.get("r", 8)), float(checkpoint.get("lora_alpha", 8))
    ranks, alphas = {}, {}
    for path in modules:
        ranks[path] = _lora_rank(checkpoint, path, method)
        want = peft_pattern_value(checkpoint.get("rank_pattern", {}), path, r)
        if ranks[path] != want:
            raise CheckpointError(f"{checkpoint.weights_file}: module {path!r} has rank {ranks[path]} "
                                  f"(lora_A {list(checkpoint.tensors[path + '.lora_A.weight'].shape)}) but "
                                  f"{CONFIG_FILE} gives it r={want}")
        alphas[path] = float(peft_pattern_value(checkpoint.get("alpha_pattern", {}), path, alpha))
    return {**_targets(checkpoint, base, modules), "r": r, "alpha": alpha,
            "dropout": float(checkpoint.get("lora_dropout", 0.0)), "rslora": bool(config.get("use_rslora")),
            "rank_pattern": _pattern(checkpoint.get("rank_pattern", {}), ranks, r),
            "alpha_pattern": _pattern(checkpoint.get("alpha_pattern", {}), alphas, alpha)}


def _lora_rank(checkpoint: PeftCheckpoint, path: str, method: str) -> int:
    tensors = checkpoint.tensors
    for leaf in LORA_LEAVES[:2] + ((LORA_LEAVES[2],) if method == "dora" else ()):
        if path + "." + leaf not in tensors:
            raise CheckpointError(f"{checkpoint.weights_file}: module {path!r} has no {leaf} tensor")
    if method == "lora" and path + "." + LORA_LEAVES[2] in tensors:
        raise CheckpointError(f"{checkpoint.weights_file}: module {path!r} has a DoRA magnitude vector but "
                              f"{CONFIG_FILE} says use_dora: false")
    a, b = tensors[path + ".lora_A.weight"], tensors[path + ".lora_B.weight"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(f"{checkpoint.weights_file}: module {path!r}: lora_A {list(a.shape)} and "
                              f"lora_B {list(b.shape)} are not [r, in] and [out, r] (LoRA on a convolution or "
                              "embedding is not supported)")
    return int(a.shape[0])


def _pattern(peft_pattern: dict[str, Any], values: dict[str, Any], default: Any) -> dict[str, Any]:
    """A pefc ``*_pattern``: PEFT's keys if pefc resolves them alike, else one exact path per exception."""
    names = _plain_names(list(peft_pattern))
    if names is not None:
        pattern = dict(peft_pattern)
        resolved = {path: next((v for k, v in pattern.items() if selector_matches(k, _site(path))), default)
                    for path in values}
        if resolved == values:
            return pattern
    return {path: value for path, value in values.items() if value != default}


# --- IA3 ---------------------------------------------------------------------------------------

def _ia3_keys(checkpoint: PeftCheckpoint, base: nn.Module, modules: list[str]) -> dict[str, Any]:
    feedforward = []
    for path in modules:
        shape = tuple(checkpoint.tensors[path + ".ia3_l"].shape)
        if len(shape) != 2 or 1 not in shape:
            raise CheckpointError(f"{checkpoint.weights_file}: {path}.ia3_l has shape {list(shape)}; PEFT saves "
                                  "[out, 1] (output scale) or [1, in] (feedforward input scale)")
        if shape[0] == 1 and shape[1] != 1:
            feedforward.append(path)
    names = _plain_names(checkpoint.config.get("feedforward_modules"))
    if not (names and {p for p in modules if any(selector_matches(n, _site(p)) for n in names)} == set(feedforward)):
        names = feedforward
    return {**_targets(checkpoint, base, modules), "feedforward": names}


# --- tensors into the compiled model -----------------------------------------------------------

def pefc_tensors(checkpoint: PeftCheckpoint, model: Any, name: str, method: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under pefc's names (``<adapter>.<site>.<param>``), shapes checked."""
    insertions = [i for i in model.pefc.insertions if i.adapter == name]
    mapper: Callable[..., dict[str, torch.Tensor]] = {
        "lora": _lora_tensors, "dora": _lora_tensors, "ia3": _ia3_tensors,
        "prefix": _prefix_tensors, "prompt": _prompt_tensors}[method]
    mapped = mapper(checkpoint, model, insertions)
    own = model.adapter_state_dict()
    for key, value in mapped.items():
        _check_shape(checkpoint, key, value, own[key])
    return mapped


def _lora_tensors(checkpoint: PeftCheckpoint, model: Any, insertions: list[Any]) -> dict[str, torch.Tensor]:
    out = {}
    for ins in insertions:
        for leaf in LORA_LEAVES:
            key = f"{ins.site_path}.{leaf}"
            if key in checkpoint.tensors:
                out[f"{ins.module}.{leaf.removesuffix('.weight')}"] = checkpoint.tensors[key]
    return out


def _ia3_tensors(checkpoint: PeftCheckpoint, model: Any, insertions: list[Any]) -> dict[str, torch.Tensor]:
    return {f"{ins.module}.ia3_l": checkpoint.tensors[f"{ins.site_path}.ia3_l"].flatten() for ins in insertions}


def _prompt_tensors(checkpoint: PeftCheckpoint, model: Any, insertions: list[Any]) -> dict[str, torch.Tensor]:
    (ins,) = insertions
    return {f"{ins.module}.prompt_embeddings": checkpoint.tensors["prompt_embeddings"]}


def _seq2seq(checkpoint: PeftCheckpoint) -> bool:
    """An encoder-decoder's prompt-learning checkpoint (PEFT: ``num_transformer_submodules: 2``)."""
    return checkpoint.config.get("num_transformer_submodules") == 2


def _prefix_rows(checkpoint: PeftCheckpoint, layers: int) -> list[tuple[int, int]]:
    """``(key row, value row)`` of PEFT's table for each prefixed layer, as ``PeftModel.get_prompt`` reads them.

    The table holds ``layers * 2`` rows of ``d_kv`` (layer-major, key then value). For an
    encoder-decoder PEFT concatenates the rows with themselves and gives decoder layer ``i``
    rows ``4 i`` and ``4 i + 1`` of that list (its rows ``4 i + 2``, ``4 i + 3`` go to the
    cross-attention cache, which PEFT then empties).
    """
    if not _seq2seq(checkpoint):
        return [(2 * i, 2 * i + 1) for i in range(layers)]
    rows = list(range(2 * layers)) * 2
    return [(rows[4 * i], rows[4 * i + 1]) for i in range(layers)]


def _prefix_tensors(checkpoint: PeftCheckpoint, model: Any, insertions: list[Any]) -> dict[str, torch.Tensor]:
    """Split PEFT's ``[P, layers*2*d_kv]`` table (layer-major, keys then values) per attention."""
    table = checkpoint.tensors["prompt_embeddings"]
    insertions = by_layer(insertions)
    modules = [model.get_submodule(ins.module) for ins in insertions]
    width, heads = modules[0].prefix_key.shape[1], modules[0].kv_heads
    length = int(checkpoint.required("num_virtual_tokens"))
    want = [length, len(modules) * 2 * width]
    config = checkpoint.config
    if list(table.shape) != want or config.get("num_layers", len(modules)) != len(modules) \
            or config.get("token_dim", width) != width or config.get("num_attention_heads", heads) != heads:
        raise CheckpointError(
            f"{checkpoint.weights_file}: prompt_embeddings has shape {list(table.shape)} for num_layers "
            f"{config.get('num_layers')}, token_dim {config.get('token_dim')}, num_attention_heads "
            f"{config.get('num_attention_heads')}, but the base model has {len(modules)} attention layers with "
            f"{heads} key/value heads of width {width} (needs {want}; was it saved for another model?)")
    out = {}
    for ins, (key, value) in zip(insertions, _prefix_rows(checkpoint, len(insertions)), strict=True):
        out[f"{ins.module}.prefix_key"] = table[:, key * width:(key + 1) * width]
        out[f"{ins.module}.prefix_value"] = table[:, value * width:(value + 1) * width]
    return out


def by_layer(insertions: list[Any]) -> list[Any]:
    """Insertions in layer order (PEFT's prefix table is layer-major); graph order within a layer."""
    return sorted(insertions, key=lambda ins: layer_of(ins.site_path) or 0)


def _check_shape(checkpoint: PeftCheckpoint, key: str, value: torch.Tensor, target: torch.Tensor) -> None:
    if value.shape != target.shape:
        _, _, rest = key.partition(".")
        module, _, leaf = rest.rpartition(".")
        raise CheckpointError(f"{checkpoint.weights_file}: module {module!r}: {leaf} has shape {list(value.shape)} "
                              f"in the checkpoint but the base model needs {list(target.shape)} there "
                              "(was the checkpoint saved for another base model?)")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CheckpointError(f"{checkpoint.weights_file}: the tensor for {key!r} holds NaN or Inf values")


def _expect_keys(checkpoint: PeftCheckpoint, keys: set[str]) -> None:
    extra = sorted(set(checkpoint.tensors) - keys)
    missing = sorted(keys - set(checkpoint.tensors))
    if missing:
        raise CheckpointError(f"{checkpoint.weights_file}: tensor {missing[0]!r} is missing")
    if extra:
        raise CheckpointError(f"{checkpoint.weights_file}: tensor {extra[0]!r} has no pefc equivalent "
                              f"({checkpoint.peft_type} saves only {', '.join(sorted(keys))}; modules_to_save "
                              "such as a classifier head are not supported)")
