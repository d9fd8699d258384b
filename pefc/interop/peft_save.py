"""pefc adapter -> HF PEFT ``adapter_config.json`` fields and ``adapter_model.safetensors`` tensors.

Modules are named by exact path in ``target_modules`` (PEFT matches a listed name that
equals the module path exactly), so pefc's roles and globs need no translation. Per-site
ranks and alphas become ``rank_pattern`` / ``alpha_pattern`` keyed by exact path.
Prefix tuning is written as PEFT itself saves it: the prefix table, already projected when
pefc trained it through the MLP, with ``prefix_projection: false`` so PEFT can load it for
inference and for further training alike.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pefc.attention import find_attentions
from pefc.errors import PefcError
from pefc.interop.peft_files import PREFIX, peft_key
from pefc.interop.peft_load import by_layer, peft_pattern_value
from pefc.sites import LinearSite

PEFT_METHODS = ("lora", "dora", "ia3", "prefix", "prompt")


def task_type(model: Any) -> str | None:
    """peft's task type for a transformers model class or class name (None for a plain module)."""
    name = model if isinstance(model, str) else type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("Model", "FEATURE_EXTRACTION")):
        if name.endswith(suffix):
            return task
    return None


def adapter_of(model: Any, name: str | None = None) -> Any:
    """The adapter config to save: ``name``, or the model's only adapter; refuses what PEFT cannot hold."""
    adapters = model.pefc.spec.adapters
    if name is None:
        if len(adapters) != 1:
            listed = ", ".join(f"{a.name} ({a.method})" for a in adapters) or "none"
            raise PefcError(f"an HF PEFT checkpoint holds exactly one adapter; this model has {len(adapters)}: "
                            f"{listed}. HF PEFT cannot express a composition of adapters")
        config = adapters[0]
    else:
        config = next((a for a in adapters if a.name == name), None)
        if config is None:
            raise PefcError(f"no adapter named {name!r} (the model has {[a.name for a in adapters]})")
    if config.method not in PEFT_METHODS:
        raise PefcError(f"adapter {config.name!r}: HF PEFT has no equivalent of method {config.method!r}"
                        + (" (bottleneck adapters)" if config.method == "adapter" else "")
                        + f"; PEFT checkpoints can hold {', '.join(PEFT_METHODS)}")
    if not any(i.adapter == config.name for i in model.pefc.insertions):
        raise PefcError(f"adapter {config.name!r} has been merged into the base weights; save the model "
                        "from before CompiledModel.merge()")
    return config


def peft_adapter(model: Any, config: Any, *, projection: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(adapter_config.json fields, tensors by PEFT key)`` for adapter ``config`` of ``model``.

    ``projection`` keeps the prefix MLP (a training config, no tensors) instead of the baked table.
    """
    insertions = [i for i in model.pefc.insertions if i.adapter == config.name]
    if config.method in ("lora", "dora"):
        fields, tensors = _lora(model, config, insertions)
    elif config.method == "ia3":
        fields, tensors = _ia3(model, insertions)
    elif config.method == "prefix":
        fields, tensors = _prefix(model, config, insertions, projection)
    else:
        fields, tensors = _prompt(model, config, insertions)
    info = model.pefc.base_info
    task = task_type(info.get("class", ""))
    if config.method in ("prefix", "prompt") and task is None:
        task = "CAUSAL_LM"
    modules, saved = _modules_to_save(model, task)
    fields["modules_to_save"] = modules or None
    return {**fields, "task_type": task, "inference_mode": True}, {**tensors, **saved}


def _modules_to_save(model: Any, task: str | None) -> tuple[list[str], dict[str, Any]]:
    """PEFT's ``modules_to_save`` (exact module paths) and their tensors under their base names.

    For ``SEQ_CLS`` PEFT always wraps the ``classifier`` / ``score`` head, so it is saved too
    (as it is, when pefc did not train it).
    """
    from pefc.trainable import matching_parameters

    saved = dict(model.pefc.saved_params)
    if task == "SEQ_CLS":
        for head in ("classifier", "score"):
            for name, module in matching_parameters(model, head, skip=model.pefc.adapter_names).items():
                saved.setdefault(name, module)
    tensors = {f"{PREFIX}{name}": model.get_parameter(name) for name in saved}
    return sorted(set(saved.values())), tensors


def _linear_paths(model: Any, insertions: list[Any]) -> list[str]:
    from pefc.quant import format_of_buffer

    for ins in insertions:
        stored = format_of_buffer(ins.weight_name or "")  # a quantized base: the module's stored weight
        if ins.weight_name != f"{ins.site_path}.weight" and (stored is None or stored[1] != ins.site_path):
            raise PefcError(f"site {ins.site_path!r} computes with {ins.weight_name!r}, not a weight of its own "
                            "module: HF PEFT can only adapt modules (nn.Linear, Conv1D)")
    return list(dict.fromkeys(i.site_path for i in insertions))


def _lora(model: Any, config: Any, insertions: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    paths = _linear_paths(model, insertions)
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for ins in insertions:
        module = model.get_submodule(ins.module)
        tensors[peft_key(ins.site_path, "lora_A.weight")] = module.lora_A
        tensors[peft_key(ins.site_path, "lora_B.weight")] = module.lora_B
        if config.method == "dora":
            tensors[peft_key(ins.site_path, "lora_magnitude_vector")] = module.lora_magnitude_vector
        site = config.for_site(LinearSite(path=ins.site_path, node=None, role=ins.site_role))
        ranks[ins.site_path], alphas[ins.site_path] = site.r, site.alpha
    fields = {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "use_dora": config.method == "dora", "target_modules": paths,
        "rank_pattern": _exact_pattern(ranks, config.r), "alpha_pattern": _exact_pattern(alphas, config.alpha),
        "fan_in_fan_out": all(i.weight_layout == "in_out" for i in insertions), "bias": "none",
        "init_lora_weights": True, "layers_to_transform": None}
    return fields, tensors


def _exact_pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """A PEFT pattern giving each path its value: exact paths, regex-escaped where a bare path is ambiguous."""
    pattern = {path: value for path, value in values.items() if value != default}
    if all(peft_pattern_value(pattern, path, default) == value for path, value in values.items()):
        return pattern
    return {re.escape(path): value for path, value in pattern.items()}


def _ia3(model: Any, insertions: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    paths = _linear_paths(model, insertions)
    tensors = {}
    for ins in insertions:
        scale = model.get_submodule(ins.module).ia3_l
        tensors[peft_key(ins.site_path, "ia3_l")] = scale[None, :] if ins.placement == "input" else scale[:, None]
    feedforward = [i.site_path for i in insertions if i.placement == "input"]
    fields = {"peft_type": "IA3", "target_modules": paths, "feedforward_modules": feedforward,
              "fan_in_fan_out": all(i.weight_layout == "in_out" for i in insertions),
              "init_ia3_weights": True}
    return fields, tensors


def _prefix(model: Any, config: Any, insertions: list[Any], projection: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    attentions = len(find_attentions(model.graph)[0])
    if len(insertions) != attentions:
        raise PefcError(f"adapter {config.name!r} (prefix) covers {len(insertions)} of the model's {attentions} "
                        "attentions; HF PEFT's prefix tuning covers every layer")
    insertions = by_layer(insertions)
    kv = [_prefix_kv(model, config, ins) for ins in insertions]
    widths = {k.shape[1] for k, _ in kv}
    heads = {model.get_submodule(ins.module).kv_heads for ins in insertions}
    if len(widths) != 1 or len(heads) != 1:
        raise PefcError(f"adapter {config.name!r} (prefix): HF PEFT needs one key/value width and head count at "
                        f"every layer, found widths {sorted(widths)} and heads {sorted(heads)}")
    (width,), (kv_heads,) = widths, heads
    hidden = config.projection.hidden if projection and config.projection is not None else None
    fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": config.num_virtual_tokens, "token_dim": width,
              "num_attention_heads": kv_heads, "num_layers": len(insertions), "num_transformer_submodules": 1,
              "encoder_hidden_size": hidden or width, "prefix_projection": hidden is not None}
    table = torch.cat([torch.cat([k, v], dim=1) for k, v in kv], dim=1)
    return fields, ({} if hidden else {"prompt_embeddings": table})


@torch.no_grad()
def _prefix_kv(model: Any, config: Any, ins: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[P, d_kv]`` key and value prefix of one site (through the MLP when there is one)."""
    module = model.get_submodule(ins.module)
    if getattr(module, "index", None) is None:
        return module.prefix_key.detach(), module.prefix_value.detach()
    table = model.get_submodule(f"{config.name}.prefix_encoder")()
    start, width = 2 * module.index * module.width, module.width
    return table[:, start:start + width], table[:, start + width:start + 2 * width]


def _prompt(model: Any, config: Any, insertions: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (ins,) = insertions
    table = model.get_submodule(ins.module).prompt_embeddings
    fields = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": config.num_virtual_tokens,
              "token_dim": table.shape[1], "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
    return fields, {"prompt_embeddings": table}
