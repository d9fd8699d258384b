"""HF PEFT interop: the equivalent ``peft`` config of a compiled adapter.

``peft`` is optional: it is imported only when these functions are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefc.errors import PefcError

if TYPE_CHECKING:
    from pefc.compiled import CompiledModel

PEFT_METHODS = ("lora", "dora", "ia3", "prefix", "prompt")


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise PefcError("HF PEFT interop needs the `peft` package (pip install peft)") from None
    return peft


def task_type(model: Any) -> str | None:
    """peft's task type for a transformers model class (None for a plain module)."""
    name = type(model).__name__ if not isinstance(model, str) else model
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("Model", "FEATURE_EXTRACTION")):
        if name.endswith(suffix):
            return task
    return None


def peft_config(model: CompiledModel, adapter: str, *, base_class: str | None = None) -> Any:
    """The ``peft`` config equivalent to adapter ``adapter`` of ``model`` (same sites, same math)."""
    peft = _peft()
    config = next((a for a in model.pefc.spec.adapters if a.name == adapter), None)
    if config is None:
        raise PefcError(f"no adapter named {adapter!r}")
    if config.method not in PEFT_METHODS:
        raise PefcError(f"adapter {adapter!r}: HF PEFT has no equivalent of method {config.method!r}")
    sites = [i for i in model.pefc.insertions if i.adapter == adapter]
    paths = list(dict.fromkeys(i.site_path for i in sites))
    task = task_type(base_class) if base_class else None
    if config.method in ("lora", "dora"):
        return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               use_rslora=config.rslora, use_dora=config.method == "dora",
                               target_modules=paths, task_type=task)
    if config.method == "ia3":
        inputs = list(dict.fromkeys(i.site_path for i in sites if i.placement == "input"))
        return peft.IA3Config(target_modules=paths, feedforward_modules=inputs, task_type=task)
    if config.method == "prefix":
        projection = getattr(config, "projection", None)
        return peft.PrefixTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens, task_type=task or "CAUSAL_LM",
            prefix_projection=projection is not None,
            encoder_hidden_size=getattr(projection, "hidden", None) or 512)
    return peft.PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type=task or "CAUSAL_LM")
