"""Checks a spec's transformers model against transformers itself, without building the model.

A misspelt ``hf.config`` key is silently stored by transformers (``num_hiden_layers`` builds the
default 24 layers), a misspelt class fails only at build time, and an input the model's
``forward`` does not take reaches torch.export's raw message. These checks catch all three at
validation, with "did you mean ...": the class comes from transformers' lazy module (its
modeling file is imported, no model is built), the config class is instantiated from the keys
alone (no tensors), and ``forward``'s signature gives the input names. Without transformers
installed they are skipped (building an ``hf`` model then says to install it).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from pefc.errors import ModelSourceError
from pefc.spec import SpecBase
from pefc.suggest import closest, did_you_mean

Issue = tuple[list[Any], str]


def hf_issues(spec: SpecBase) -> list[Issue]:
    """Problems of ``spec.model.hf`` and of ``spec.inputs`` for that class, each with its key path."""
    hf = spec.model.hf if spec.model is not None else None
    if hf is None:
        return []
    try:
        import transformers
    except ImportError:
        return []
    if hf.class_ is not None:
        cls, issues = _model_class(transformers, hf.class_, ["model", "hf", "class"])
        if cls is not None:
            issues += _config_issues(cls, hf.config)
    else:
        cls, issues = _pretrained_class(transformers, Path(str(hf.pretrained)))
    if cls is not None:
        issues += _input_issues(cls, spec)
    return issues


def _model_class(transformers: Any, name: str, loc: list[Any]) -> tuple[type | None, list[Issue]]:
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # its modeling file needs a package that is missing: the build will say which
        return None, []
    import torch

    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return cls, []
    models = [n for n in dir(transformers) if n[:1].isupper() and ("For" in n or n.endswith("Model"))]
    what = "has no model class" if cls is None else "exports, but not as a model class,"
    return None, [(loc, f"transformers {what} {name!r}{did_you_mean(name, models, cutoff=0.8)}")]


def _pretrained_class(transformers: Any, path: Path) -> tuple[type | None, list[Issue]]:
    from pefc.source import read_pretrained_config

    loc = ["model", "hf", "pretrained"]
    try:
        config = read_pretrained_config(path)
    except ModelSourceError as exc:
        return None, [(loc, exc.message)]
    architectures = config.get("architectures") or []
    if not architectures:
        return None, []
    return _model_class(transformers, str(architectures[0]), loc)


def _config_issues(cls: type, values: dict[str, Any]) -> list[Issue]:
    """Keys of ``hf.config`` that the config class neither takes nor translates (e.g. ``rope_theta``)."""
    config_cls = getattr(cls, "config_class", None)
    if config_cls is None:
        return []
    known = _config_keys(config_cls)
    unknown = [key for key in values if key not in known]
    if not unknown:
        return []
    try:
        stored = vars(config_cls(**values))
        default = vars(config_cls())
    except Exception as exc:  # noqa: BLE001 - any refusal of the config class is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [(["model", "hf", "config"], f"not a valid {config_cls.__name__}: {first[:300]}")]
    public = sorted(k for k in known if not k.startswith("_"))
    return [(["model", "hf", "config", key],
             f"{config_cls.__name__} has no parameter {key!r} (transformers would ignore it)"
             f"{did_you_mean(key, public, cutoff=0.7)}")
            for key in unknown if key in stored and key not in default]


def _config_keys(config_cls: type) -> set[str]:
    """Parameters of the config class and its bases, and its ``attribute_map`` aliases."""
    keys: set[str] = set()
    for klass in config_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            keys |= {name for name, p in _parameters(init).items()
                     if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"}
        keys |= set(getattr(klass, "attribute_map", None) or {})
    return keys


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _input_issues(cls: type, spec: SpecBase) -> list[Issue]:
    """Spec inputs that ``cls.forward`` does not take (where it takes ``**kwargs``, only near misses)."""
    params = _parameters(getattr(cls, "forward", None))
    named = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not named:
        return []
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    select = getattr(spec, "select", None)
    own = {getattr(select, "input", None)}  # an input pefc adds itself (per-row adapter selection)
    issues: list[Issue] = []
    for name in spec.inputs:
        if name in named or name in own:
            continue
        guess = closest(name, named, cutoff=0.75)
        if guess or not any_keyword:
            hint = f"; did you mean {guess}?" if guess else f"; it takes {', '.join(named)}"
            issues.append((["inputs", name], f"{cls.__name__}.forward takes no input {name!r}{hint}"))
    return issues
