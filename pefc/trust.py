"""Consent to run code that a spec names (``model.python``).

A spec is shared like a config file, so naming code in it must not run that code: building a
``python:`` model (the import as well as the call) needs the user's explicit consent, as
transformers' ``trust_remote_code``. Consent is any of

- ``trust_code=True`` to :func:`pefc.load_spec`, :func:`pefc.compile` or :func:`pefc.plan`,
- ``--trust-code`` on every CLI verb that builds a model,
- the environment variable ``PEFC_TRUST_CODE=1``.

A model passed to ``pefc.compile(spec, model=...)`` needs none: the user built it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pefc.errors import ModelSourceError

if TYPE_CHECKING:
    from pefc.schema import ModelSpec

ENV_VAR = "PEFC_TRUST_CODE"
OPT_IN = f"--trust-code (CLI), trust_code=True (pefc.load_spec / pefc.compile / pefc.plan) or {ENV_VAR}=1"


def env_trusts_code() -> bool:
    """Whether ``PEFC_TRUST_CODE`` gives consent (1, true, yes or on)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def grant(model: ModelSpec | None, trust_code: bool) -> None:
    """Record on ``model`` that the user consents to run its code (``trust_code=True``)."""
    if model is not None and trust_code:
        model._origin.trust_code = True


def code_note(model: ModelSpec | None) -> str | None:
    """What building ``model`` would run, or None when it runs no code named by the spec."""
    if model is None or model.python is None:
        return None
    kwargs = f" with kwargs {sorted(model.kwargs)}" if model.kwargs else ""
    return f"building this model imports and calls {model.python!r}{kwargs}"


def require_consent(model: ModelSpec, trust_code: bool = False) -> None:
    """Refuse (before importing anything) to build a ``python:`` model without consent."""
    if model.python is None or trust_code or model._origin.trust_code or env_trusts_code():
        return
    raise ModelSourceError(f"model.python: {code_note(model)}; pefc runs code named by a spec only with "
                           "your consent, and nothing was imported",
                           hint=f"if you trust this spec and {model.python.partition(':')[0]!r}, give {OPT_IN}")
