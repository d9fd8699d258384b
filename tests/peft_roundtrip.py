"""Helpers of the HF PEFT interop tests: checkpoints written by peft itself, outputs compared."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from conftest import INPUTS, batch, make_spec, randomize_adapters, shared_hf

import pefc
from pefc.interop import peft as interop
from pefc.spec import parse_spec

SHAPES = [(3, 5), (1, 9)]  # padded batches of other sizes than the capture's (2, 8)
ATOL = 1e-5


def main_output(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def max_diff(reference: torch.nn.Module, model: torch.nn.Module, shapes: list[tuple[int, int]] = SHAPES) -> float:
    """Largest |difference| of the main outputs on padded batches (PEFT's prompt rows dropped)."""
    worst = 0.0
    for shape in shapes:
        inputs = batch(*shape, pad=True)
        with torch.no_grad():
            want, got = main_output(reference(**inputs)), main_output(model(**inputs))
        want = want[:, want.shape[1] - got.shape[1]:]  # PEFT's prompt tuning returns the virtual tokens' rows too
        worst = max(worst, (want - got).abs().max().item())
    return worst


def effect(base: torch.nn.Module, model: torch.nn.Module) -> float:
    """How much the adapter changes the output (a round trip of a no-op adapter proves nothing)."""
    return max_diff(base, model, shapes=SHAPES[:1])


def peft_checkpoint(family: str, config: Any, directory: Path, seed: int = 3, scale: float = 0.3):
    """A PeftModel with random adapter tensors, saved by its own save_pretrained into ``directory``."""
    import peft

    base = shared_hf(family)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    reference.eval()
    reference.save_pretrained(directory)
    return base, reference


def from_peft(family: str, config: Any, tmp_path: Path) -> dict[str, Any]:
    """peft -> pefc -> peft: import a PEFT checkpoint, compare, save it back, compare again."""
    import peft

    base, reference = peft_checkpoint(family, config, tmp_path / "peft")
    model = interop.load(tmp_path / "peft", base, inputs=INPUTS, example_inputs=batch(2, 8))
    imported = max_diff(reference, model)
    interop.save(model, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    return {"import": imported, "export": max_diff(again, model), "effect": effect(base, model),
            "model": model, "reference": reference}


def from_pefc(family: str, entry: dict[str, Any], tmp_path: Path, scale: float = 0.3) -> dict[str, Any]:
    """pefc -> peft -> pefc: save a compiled adapter for PEFT, compare, import it back, compare again."""
    import peft

    base = shared_hf(family)
    spec = make_spec([entry], family=None)
    model = pefc.compile(parse_spec(spec), model=base, example_inputs=batch(2, 8))
    randomize_adapters(model, scale=scale)
    model.eval()
    interop.save(model, tmp_path / "peft")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    exported = max_diff(reference, model)
    back = interop.load(tmp_path / "peft", base, name=entry["name"], inputs=spec["inputs"],
                        example_inputs=batch(2, 8))  # reuses the capture
    return {"export": exported, "import": max(max_diff(reference, back), max_diff(model, back)),
            "effect": effect(base, model), "model": model, "back": back}


def assert_round_trip(result: dict[str, Any], what: str) -> None:
    assert result["import"] < ATOL, f"{what}: import max |diff| {result['import']}"
    assert result["export"] < ATOL, f"{what}: export max |diff| {result['export']}"
    assert result["effect"] > 1e-3, f"{what}: the adapter changes nothing ({result['effect']})"
