"""Trainable base modules (the spec's ``modules_to_save``, as HF PEFT's): trained in full, saved with the adapters.

Their parameters keep their base names (``classifier.weight``), are unfrozen in place, and are
part of :meth:`CompiledModel.adapter_state_dict`, so checkpoints, ``parameter_report()``,
``merge()`` (which keeps them as they are) and ONNX export (which exports the trained values)
treat them like any other trained tensor.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

from torch import nn

from pefc.errors import CheckpointError, TargetError
from pefc.report import AdapterReport, SiteReport

REPORT_NAME = "modules_to_save"


def module_matches(selector: str, path: str) -> bool:
    """A module-path glob, matching the whole path or a tail of it (``classifier`` matches ``model.classifier``)."""
    return fnmatch.fnmatchcase(path, selector) or fnmatch.fnmatchcase(path, "*." + selector)


def saved_parameters(model: nn.Module, selectors: Iterable[str], *, skip: Iterable[str] = ()) -> dict[str, str]:
    """``{parameter name: module path}`` of the base parameters under modules the selectors match.

    ``skip`` holds top-level names that are not the base model's (the adapters). A selector
    matching no module with parameters is an error.
    """
    chosen: dict[str, str] = {}
    for selector in selectors:
        hits = matching_parameters(model, selector, skip=skip)
        if not hits:
            raise TargetError(f"modules_to_save: {selector!r} matches no module with parameters; "
                              f"{_nearest(selector, list(_base_parameters(model, skip)))}")
        for name, module in hits.items():
            chosen.setdefault(name, module)
    return chosen


def matching_parameters(model: nn.Module, selector: str, *, skip: Iterable[str] = ()) -> dict[str, str]:
    """``{parameter name: module path}`` of the base parameters under modules ``selector`` matches."""
    return {name: module for name in _base_parameters(model, skip)
            if (module := _matching_module(selector, name)) is not None}


def _base_parameters(model: nn.Module, skip: Iterable[str]) -> list[str]:
    skipped = set(skip)
    return [name for name, _ in model.named_parameters(remove_duplicate=False)
            if name.split(".", 1)[0] not in skipped]


def _matching_module(selector: str, param: str) -> str | None:
    """The outermost module path holding ``param`` that ``selector`` matches."""
    parts = param.split(".")[:-1]
    for end in range(1, len(parts) + 1):
        path = ".".join(parts[:end])
        if module_matches(selector, path):
            return path
    return None


def _nearest(selector: str, params: list[str]) -> str:
    modules = sorted({name.rpartition(".")[0] for name in params if "." in name})
    close = difflib.get_close_matches(selector, modules, n=3, cutoff=0.3)
    close += [m for m in modules if m.rsplit(".", 1)[-1] == selector.rsplit(".", 1)[-1] and m not in close]
    return "nearest modules: " + (", ".join(close[:5]) or ", ".join(modules[-5:]))


def report(model: nn.Module, saved: dict[str, str]) -> AdapterReport | None:
    """The ``modules_to_save`` entry of ``parameter_report()``: one site per module (kept by merge)."""
    if not saved:
        return None
    sizes: dict[str, int] = {}
    for name, module in saved.items():
        sizes[module] = sizes.get(module, 0) + model.get_parameter(name).numel()
    from pefc.sites import layer_of

    sites = [SiteReport(path, None, "module", params, layer_of(path)) for path, params in sizes.items()]
    return AdapterReport(REPORT_NAME, "full", sum(sizes.values()), True, sites)


def check_all_saved(model: nn.Module, saved: Iterable[str]) -> None:
    """Refuse to save while a trainable parameter is not among the ``saved`` tensors (it would be lost)."""
    names = set(saved)
    unsaved = [name for name, p in model.named_parameters() if p.requires_grad and name not in names]
    if unsaved:
        module = unsaved[0].rpartition(".")[0] or unsaved[0]
        raise CheckpointError(f"parameter {unsaved[0]!r} is trainable but is neither an adapter tensor nor under "
                              f"the spec's modules_to_save ({len(unsaved)} such); saving would drop it",
                              hint=f"add {module!r} to the spec's modules_to_save, or freeze it "
                                   "(requires_grad_(False))")
