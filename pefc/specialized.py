"""Which op fixed a dynamic dim: the answer to torch.export's "specialized it to be a constant".

torch.export says *that* a dim the spec marks dynamic was fixed, not *where*. Its ShapeEnv logs
every guard it adds (``eval Eq(s77, 3) [guard added]``) and which input dim each symbol stands
for (``create_symbol s77 = 3 for L['x'].size()[0]``). :func:`find_specialization` re-runs the
export with a handler on that log and, for the first guard fixing a symbol to a constant,
takes the innermost frame of the model's own code from the live stack.
"""

from __future__ import annotations

import logging
import re
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_LOGGER = "torch.fx.experimental.symbolic_shapes"
_SYMBOL = re.compile(r"create_symbol (s\d+) = (-?\d+) for (\S+)")
_FIXED = re.compile(r"Eq\((s\d+), (-?\d+)\) \[guard added\]")
_INTERNAL = (str(Path(torch.__file__).parent), str(Path(__file__).parent), "<frozen", "/logging/", "/contextlib.py")


class _Recorder(logging.Handler):
    """Collects input-dim symbols and the user frame of the first guard fixing one to a constant."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sources: dict[str, str] = {}
        self.found: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if (match := _SYMBOL.search(message)) is not None:
            self.sources[match.group(1)] = match.group(3)
        elif self.found is None and (match := _FIXED.search(message)) and match.group(1) in self.sources:
            where = _user_frame()
            if where is not None:
                self.found = f"{_name(self.sources[match.group(1)])} was fixed to {match.group(2)} by {where}"


def find_specialization(export: Callable[[], object]) -> str | None:
    """Run ``export`` (expected to fail) and say which line of the model fixed a dynamic dim, if found."""
    logger = logging.getLogger(_LOGGER)
    recorder, level, propagate, handlers = _Recorder(), logger.level, logger.propagate, logger.handlers
    logger.handlers = [recorder]  # torch's own handlers would print every guard
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export()
    except Exception:  # noqa: BLE001 (the failure is the one being explained)
        pass
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    return recorder.found


def _user_frame() -> str | None:
    """``file:line in function: `code``` of the innermost frame outside torch, pefc and logging."""
    for frame in reversed(traceback.extract_stack()):
        if not any(part in frame.filename for part in _INTERNAL):
            code = f": `{frame.line.strip()}`" if frame.line else ""
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}{code}"
    return None


def _name(source: str) -> str:
    """``L['kwargs']['input_ids'].size()[0]`` -> ``dim 0 of input 'input_ids'``."""
    match = re.search(r"\['(\w+)'\]\.size\(\)\[(\d+)\]", source)
    return f"dim {match.group(2)} of input {match.group(1)!r}" if match else source
