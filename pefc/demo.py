"""`pefc demo`: the main job end to end on a small Llama built from a config.

Compile a LoRA spec, train it on a synthetic sequence-copy task (loss falls), save the
adapters, reload them into a freshly compiled model and check the outputs are identical,
then chart the loss. With ``out_dir`` it keeps the adapters, the spec and a merged ONNX
file there and prints the commands to run on them next.
"""

from __future__ import annotations

import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pefc.compiler import compile as compile_spec
from pefc.errors import NumericalError
from pefc.plot import text_chart, write_png
from pefc.spec import SpecBase, parse_spec

VOCAB = 64
SEP = VOCAB - 1

DEMO_SPEC = {
    "version": 1,
    "model": {
        "hf": {"class": "LlamaForCausalLM",
               "config": {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 128, "tie_word_embeddings": False}},
        "dtype": "float32", "device": "cpu", "seed": 0,
    },
    "inputs": {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": VOCAB},
               "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2}},
    "adapters": [{"name": "qv", "method": "lora", "target": ["@attn.q", "@attn.v"],
                  "r": 16, "alpha": 32, "dropout": 0.0}],
}


@dataclass
class DemoResult:
    first_loss: float
    final_loss: float
    reload_max_diff: float
    seconds: float
    trainable_params: int
    base_params: int
    losses: list[float]
    next_commands: list[str]


def copy_task_batch(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[a_1..a_n, SEP, a_1..a_n]``; labels are -100 except on the copied half."""
    tokens = torch.randint(0, SEP, (batch, length), generator=generator)
    sep = torch.full((batch, 1), SEP)
    ids = torch.cat([tokens, sep, tokens], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, length:-1] = ids[:, length + 1:]
    return ids, labels


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)


def run_demo(*, steps: int = 300, batch: int = 32, length: int = 8, lr: float = 1e-2,
             out_dir: str | Path | None = None, plot: str | Path | None = None,
             quiet: bool = False) -> DemoResult:
    started = time.perf_counter()
    torch.manual_seed(0)
    spec: SpecBase = parse_spec(DEMO_SPEC, source="pefc demo")
    say = (lambda *_: None) if quiet else print
    say("pefc demo: LoRA on @attn.q and @attn.v of a 2-layer Llama (hidden 64), copy task")
    model = compile_spec(spec)
    report = model.parameter_report()
    say(f"compiled in {time.perf_counter() - started:.1f}s: {len(report.adapters[0].sites)} sites, "
        f"{report.trainable_params:,} trainable of {report.base_params:,} base params "
        f"({report.percent_of_base:.2f}%)")
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("qv.")}

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="training", disable=quiet, ncols=80, mininterval=0.5)
    for step in bar:
        ids, labels = copy_task_batch(batch, length, generator)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        loss = loss_of(out.logits, labels)
        if not math.isfinite(loss.item()):
            raise NumericalError(f"the training loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.check_finite()  # a diverging step is reported, naming the tensor
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    first, final = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    say(f"loss: {first:.3f} (first 10 steps) -> {final:.3f} (last 10 steps); chance is {math.log(SEP):.3f}")
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in base_before.items())
    say(f"base weights bit-identical after training: {unchanged}")

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out_dir) if out_dir else Path(tmp) / "adapters"
        model.save_adapters(target)
        say(f"saved adapters to {target}/adapters.safetensors (+ spec.json)")
        fresh = compile_spec(spec)
        fresh.load_adapters(target)
    model.eval()
    fresh.eval()
    ids, _ = copy_task_batch(4, length, torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = fresh(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    diff = (a - b).abs().max().item()
    accuracy = _copy_accuracy(fresh, length)
    say(f"reloaded into a freshly compiled model: max |diff| of logits = {diff:.3g}; "
        f"copy accuracy {accuracy:.1%}")
    if not unchanged or diff != 0.0:
        raise RuntimeError("demo check failed: base weights changed or reload differs")
    commands = _keep_onnx(fresh, Path(out_dir), say) if out_dir else []
    say("\n" + text_chart(losses, ascii_only=not _can_print("█")))
    if plot:
        say(f"wrote the loss curve to {write_png(plot, losses)}")
    seconds = time.perf_counter() - started
    say(f"done in {seconds:.1f}s")
    if commands:
        say("next, on what the demo kept:\n" + "\n".join(f"  {c}" for c in commands))
    return DemoResult(first, final, diff, seconds, report.trainable_params, report.base_params, losses, commands)


def _keep_onnx(model: torch.nn.Module, out_dir: Path, say: Callable[..., None]) -> list[str]:
    """Export ``model`` merged to ``out_dir/model.onnx``; return the commands to run on ``out_dir`` next."""
    from pefc.export import export_onnx

    onnx_path = out_dir / "model.onnx"
    export_onnx(model, onnx_path, merge=True)
    say(f"exported the merged model to {onnx_path} (LoRA folded into the base weights)")
    spec, adapters = shlex.quote(str(out_dir / "spec.json")), shlex.quote(str(out_dir))
    return [f"pefc inspect {spec}",
            f"pefc export {spec} --adapters {adapters} -o {shlex.quote(str(onnx_path))} --verify",
            f"pefc export-peft {spec} --adapters {adapters} -o {shlex.quote(str(out_dir / 'peft'))}"]


def _can_print(text: str) -> bool:
    """Whether stdout's encoding can show ``text`` (else the chart falls back to ASCII)."""
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")  # None: an in-memory text stream
    except (UnicodeEncodeError, LookupError):
        return False
    return True


@torch.no_grad()
def _copy_accuracy(model: torch.nn.Module, length: int) -> float:
    ids, labels = copy_task_batch(64, length, torch.Generator().manual_seed(3))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    mask = labels != -100
    return (logits.argmax(-1)[mask] == labels[mask]).float().mean().item()
