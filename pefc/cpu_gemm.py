"""Float32 products on CPU by the faster of two libraries, chosen per shape by timing both once.

PyTorch runs every float32 ``mm`` on CPU through its BLAS (MKL in the x86 builds). oneDNN, which
the same builds ship, runs some products much faster on some CPUs: on an AMD EPYC Zen 5 (AVX-512),
one thread, ``[512, 256] @ [256, 688]`` takes 1.67 ms in MKL's sgemm and 0.74 ms in oneDNN, both
IEEE float32 (results equal up to rounding); ``gᵀ u`` with 16 columns is faster in MKL. No
library wins every shape on every machine, so :func:`linear` times both on the operands at hand
the first time it sees a shape (rows rounded up to a power of two, the features, the layouts,
the thread count) and keeps the faster one, as cuDNN's benchmark mode or an autotuner does.

Two lowerings call it: :mod:`pefc.fused_linear` (the base products and low-rank updates of adapted
sites) and :mod:`pefc.frozen_linear` (every other frozen ``linear``), both only with nothing that
needs autograd (inside an autograd Function, or under inference): the graph a model is captured,
exported or compiled as is unchanged.

Mode: ``PEFC_CPU_GEMM`` or :func:`set_mode`: ``auto`` (the default, as above), ``torch`` (torch's
BLAS always, e.g. for results bit-identical to an unlowered model's products) or ``onednn``.
``auto`` keeps torch's BLAS while ``torch.use_deterministic_algorithms(True)`` is on: each library
is deterministic, but a timed choice could differ between two runs (as cuDNN's benchmark mode).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator

import torch

MODES = ("auto", "torch", "onednn")
ENV_VAR = "PEFC_CPU_GEMM"
#: oneDNN is kept for a shape where it takes at most this share of torch's time
_MARGIN = 0.95
_TIMED_CALLS = 3

Key = tuple[int, ...]
#: the tensor types (not subclasses: quantized, DTensor, fake) the lowerings compute on themselves
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_choices: dict[Key, bool] = {}


def _mode_from_env() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        warnings.warn(f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}; using auto", stacklevel=2)
        return "auto"
    return mode


_mode = _mode_from_env()


def set_mode(mode: str) -> None:
    """Choose how :func:`linear` picks its library (see the module docstring); forgets past choices."""
    global _mode
    _mode = _checked(mode)
    _choices.clear()


@contextlib.contextmanager
def using(mode: str) -> Iterator[None]:
    """Run a block in ``mode``, keeping what ``auto`` has chosen (e.g. to time one model both ways)."""
    global _mode
    previous, _mode = _mode, _checked(mode)
    try:
        yield
    finally:
        _mode = previous


def _checked(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"cpu gemm mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def mode() -> str:
    """The current mode: ``auto``, ``torch`` or ``onednn``."""
    return _mode


def choices() -> dict[Key, str]:
    """What ``auto`` chose so far, per shape key (for reports and tests)."""
    return {key: "onednn" if dnn else "torch" for key, dnn in _choices.items()}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weightᵀ (+ bias) (+ add)`` for a 2-d ``x``; ``add`` may be updated in place and returned."""
    if _mode == "torch" or not _onednn_applies(x, weight, bias, add):
        return _torch_linear(x, weight, bias, add)
    if _mode == "onednn":
        return _onednn_linear(x, weight, bias, add)
    if torch.are_deterministic_algorithms_enabled():  # a timed choice could differ from one run to the next
        return _torch_linear(x, weight, bias, add)
    key = (max(x.shape[0] - 1, 0).bit_length(), x.shape[1], weight.shape[0], x.stride(-1) == 1,
           weight.stride(-1) == 1, bias is not None, add is not None, torch.get_num_threads())
    use_onednn = _choices.get(key)
    if use_onednn is None:
        use_onednn = _choices[key] = _onednn_is_faster(x, weight, bias, add)
    return (_onednn_linear if use_onednn else _torch_linear)(x, weight, bias, add)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    add: torch.Tensor | None) -> bool:
    """2-d operands oneDNN takes (:func:`takes`), none empty and none needing autograd."""
    tensors = [t for t in (x, weight, bias, add) if t is not None]
    return (x.dim() == 2 and x.numel() > 0 and weight.numel() > 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and takes(*tensors))


def takes(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN can run a product of these: plain float32 CPU tensors, and oneDNN's linear
    built in and enabled (``torch.backends.mkldnn``)."""
    return (all(type(t) in PLAIN_TENSORS and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and onednn_available())


def onednn_available() -> bool:
    """Whether this build has oneDNN's linear and it is enabled (``torch.backends.mkldnn``)."""
    return (torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  add: torch.Tensor | None) -> torch.Tensor:
    if add is not None:
        add = add.addmm_(x, weight.t())
        return add if bias is None else add.add_(bias)
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   add: torch.Tensor | None) -> torch.Tensor:
    if add is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_is_faster(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      add: torch.Tensor | None) -> bool:
    """Time both libraries on these operands (best of a few calls each; ``add`` copied per call)."""
    return _best_time(_onednn_linear, x, weight, bias, add) <= _MARGIN * _best_time(_torch_linear, x, weight, bias, add)


def _best_time(run: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, add: torch.Tensor | None) -> float:
    best = math.inf
    for _ in range(_TIMED_CALLS):
        target = None if add is None else add.clone()
        start = time.perf_counter()
        run(x, weight, bias, target)
        best = min(best, time.perf_counter() - start)
    return best
