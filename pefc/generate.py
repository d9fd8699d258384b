"""Token generation for compiled causal LMs: greedy or sampled.

With ``use_cache=True`` (the default) one prefill runs over the prompt, then each new token
is one decode step that reads and extends the KV cache (:mod:`pefc.kvcache`). With
``use_cache=False`` every step runs the training graph on the whole sequence so far (the
oracle the cache is tested against). Either way each row's real tokens
(``attention_mask == 1``) are moved to the front, so every row sits at positions ``0 .. n-1``
whatever its padding, as in HF ``generate`` (which takes positions from the mask); the result
keeps the caller's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pefc.errors import PefcError

SUPPORTED_INPUTS = ("input_ids", "attention_mask")


@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool | None = None) -> torch.Tensor:
    """``[batch, seq + n]``: ``input_ids`` followed by up to ``max_new_tokens`` tokens per row.

    Greedy unless ``do_sample`` (then ``temperature``, ``top_k``, ``top_p`` in that order, drawn
    with ``generator`` or a fresh one seeded with ``seed``). A row stops at an
    ``eos_token_id`` (default: the model's; ``[]`` never stops) and is filled with
    ``pad_token_id`` (default: the model's, else the first eos) until every row has stopped
    or ``max_new_tokens`` are made. ``use_cache`` (default: for transformers models) decodes on
    a KV cache; ``use_cache=False`` recomputes the full sequence each step.
    """
    _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    info = model.pefc.base_info
    eos = _token_list(info.get("eos_token_id") if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else info.get("pad_token_id", eos[0] if eos else 0)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if do_sample and generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    tokens, lengths = _left_align(input_ids, mask, max_new_tokens)
    done = torch.zeros(len(tokens), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    if use_cache is None:
        use_cache = "hf_config" in info  # a plain torch module has no cache protocol to capture
    cached = _CachedSteps(model, tokens, lengths, max_new_tokens) if use_cache and max_new_tokens else None
    logits = cached.first if cached is not None else None
    stops = torch.tensor(eos, device=device, dtype=torch.long) if eos else None  # chosen tokens are int64
    for _ in range(max_new_tokens):
        if cached is None:
            logits = _last_logits(model, tokens, lengths)
        chosen = _sample(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
        if stops is not None:
            chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
        new.append(chosen)
        if cached is None:  # the recomputed sequence grows; the cache keeps its own
            tokens[torch.arange(len(tokens), device=device), lengths] = chosen
            lengths = lengths + (~done).long()
        if stops is not None:
            done |= torch.isin(chosen, stops)
            if done.all():
                break
        if cached is not None and len(new) < max_new_tokens:
            logits = cached.step(chosen)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids


def _check_inputs(model: Any, input_ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int) -> None:
    select = getattr(model.pefc.spec, "select", None)
    if select is not None:
        raise PefcError(f"generate does not take per-row {select.input} yet: this model selects adapters per row "
                        f"({', '.join(select.adapters)})",
                        hint="compile a spec without `select` (or with the adapter always on) to generate")
    names = list(model.pefc.spec.inputs)
    if "input_ids" not in names or any(n not in SUPPORTED_INPUTS for n in names):
        raise PefcError(f"generate needs a model compiled with inputs input_ids (and attention_mask); this one "
                        f"takes {', '.join(names)}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise PefcError(f"input_ids must be integer [batch, seq], got {input_ids.dtype} {list(input_ids.shape)}")
    if mask is not None:
        if mask.shape != input_ids.shape:
            raise PefcError(f"attention_mask {list(mask.shape)} does not match input_ids {list(input_ids.shape)}")
        if (mask.sum(1) == 0).any():
            raise PefcError("a row of attention_mask is all zeros (no token to continue)")
        if "attention_mask" not in names and not bool((mask != 0).all()):
            raise PefcError("the model was compiled without attention_mask, so every row must be unpadded")
    if max_new_tokens < 0:
        raise PefcError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def _token_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _left_align(input_ids: torch.Tensor, mask: torch.Tensor, room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens first (``[batch, seq + room]``, zeros after), and their counts."""
    order = torch.argsort((mask == 0).int(), dim=1, stable=True)
    lengths = (mask != 0).sum(1)
    tokens = torch.zeros(input_ids.shape[0], input_ids.shape[1] + room + 1, dtype=input_ids.dtype,
                         device=input_ids.device)
    tokens[:, :input_ids.shape[1]] = input_ids.gather(1, order)
    keep = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
    return tokens * keep, lengths


def _last_logits(model: Any, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, vocab]`` after each row's last real token (rows padded on the right)."""
    width = int(lengths.max())
    ids = tokens[:, :width]
    inputs = {"input_ids": ids}
    if "attention_mask" in model.pefc.spec.inputs:
        inputs["attention_mask"] = (torch.arange(width, device=ids.device) < lengths[:, None]).long()
    logits = _logits(model(**inputs))
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise PefcError(f"generate needs a causal LM returning logits [batch, seq, vocab]; the model returned "
                        f"{list(logits.shape)} (is {model.pefc.base_info.get('class')} a causal LM?)")
    return logits[torch.arange(len(ids), device=ids.device), lengths - 1].float()


class _CachedSteps:
    """One prefill over the prompt, then one decode step per token, on the KV cache.

    Rows are right-padded (see :func:`_left_align`): a row's generated tokens sit at positions
    ``n, n+1, ...`` after its ``n`` real ones, and the cache's padded slots stay masked.
    Slots the prefill graph itself put in front of the prompt (prompt tuning's virtual tokens)
    are always visible.
    """

    def __init__(self, model: Any, tokens: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> None:
        from pefc.kvcache import decoder

        self.decoder = dec = decoder(model)
        width = int(lengths.max())
        _check_positions(dec.max_positions, model, width, max_new_tokens)
        batch, device = len(tokens), tokens.device
        mask = (torch.arange(width, device=device) < lengths[:, None]).long()
        positions = torch.arange(width, device=device).expand(batch, width)
        like = next(p for p in model.parameters() if p.is_floating_point())
        logits, self.past = dec.run(dec.prefill, tokens[:, :width], mask, positions, dec.empty_past(batch, like))
        front = self.past[0].shape[-2] - width
        # the mask over everything the cache will hold and each step's position, made once
        self.mask = torch.cat([mask.new_ones(batch, front), mask, mask.new_ones(batch, max_new_tokens)], dim=1)
        self.positions = lengths[:, None] + torch.arange(max_new_tokens, device=device)
        self.first = logits[torch.arange(batch, device=device), lengths - 1].float()
        self.made = 0  # decode steps run

    def step(self, chosen: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, vocab]`` after ``chosen`` (one token per row) joins the cache."""
        seen = self.past[0].shape[-2] + 1
        logits, self.past = self.decoder.run(self.decoder.step, chosen[:, None], self.mask[:, :seen],
                                             self.positions[:, self.made:self.made + 1], self.past)
        self.made += 1
        return logits[:, -1].float()


def _check_positions(limit: int | None, model: Any, width: int, max_new_tokens: int) -> None:
    """Refuse a prompt (plus adapter slots and new tokens) beyond the model's positions."""
    if limit is None:
        return
    extra = sum(int(v) for e in model.pefc.extras.get("report", {}).values()
                for k, v in e.items() if k in ("extra_attention_length", "context_tokens_used"))
    if width + extra > limit:
        raise PefcError(f"the prompt has {width} tokens (+{extra} adapter slots) but the model has "
                        f"{limit} positions")
    if width + extra + max_new_tokens > limit:
        raise PefcError(f"the KV cache would exceed the model's {limit} positions: {width} prompt tokens "
                        f"+ {extra} adapter slots + max_new_tokens={max_new_tokens}",
                        hint=f"ask for at most {limit - width - extra} new tokens")


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise PefcError(f"generate needs a causal LM returning logits; the model returned {type(output).__name__}")
    return logits


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row after temperature, top-k and top-p (HF's order and conventions)."""
    if temperature <= 0:
        raise PefcError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - top_p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
