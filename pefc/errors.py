"""User-facing errors.

Every error a user can cause is a :class:`PefcError`. The CLI prints its message as one
paragraph and exits with :attr:`PefcError.exit_code` (2 for bad input, 1 for failed work);
a Python traceback is only shown with ``--debug``. ``docs/errors.md`` is the catalogue.
"""

from __future__ import annotations


class PefcError(Exception):
    """Base class of every error pefc raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class SpecError(PefcError):
    """The spec file cannot be read or does not validate."""

    def __init__(self, message: str, *, source: str | None = None, issues: list[str] | None = None,
                 hint: str | None = None) -> None:
        self.source = source
        self.issues = issues or []
        head = f"{source}: {message}" if source else message
        body = "".join(f"\n  - {issue}" for issue in self.issues)
        super().__init__(head + body, hint=hint)


class ModelSourceError(PefcError):
    """The model named by ``spec.model`` cannot be built or loaded."""


class CaptureError(PefcError):
    """torch.export could not capture the model."""


class TargetError(PefcError):
    """An adapter's targets match no site, or match sites its method cannot act on."""


class PluginError(PefcError):
    """A plugin failed to load, registered a clashing method, or failed inside a hook."""


class CheckpointError(PefcError):
    """An adapter checkpoint is unreadable or does not fit the compiled model."""


class NumericalError(PefcError):
    """Adapter tensors hold NaN or Inf (e.g. after a diverging training step)."""

    exit_code = 1


class ExportError(PefcError):
    """The model cannot be exported (e.g. it lives on the meta device)."""


class VerificationError(PefcError):
    """An exported artefact disagrees with the PyTorch model beyond tolerance."""

    exit_code = 1
