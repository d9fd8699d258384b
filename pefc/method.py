"""The contract of a PEFT method plugin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pefc.config import AdapterConfig

if TYPE_CHECKING:
    from pefc.rewrite import RewriteContext
    from pefc.sites import Site


class Method:
    """One PEFT method. Plugins subclass it and return instances from ``pefc_methods``.

    Class attributes:

    - ``name``: the value of ``method:`` in a spec.
    - ``config``: the pydantic model of its spec entry (a subclass of :class:`AdapterConfig`
      whose ``method`` field is ``Literal[name]``).
    - ``site_kinds``: which kinds of site it acts on (``linear``, ``attention``,
      ``embedding``, ``activation``); targets matching other kinds are an error.
    - ``identity_at_init``: whether a fresh adapter leaves outputs unchanged (checked by
      :mod:`pefc.testing`).
    - ``mergeable``: whether the modules it inserts implement ``fold`` (see
      :class:`pefc.rewrite.SiteModule`) so :meth:`CompiledModel.merge` can remove them.
    - ``selectable``: whether its adapters may be picked per row (the spec's ``select``): its
      ``wrap_output`` / ``wrap_input`` modules implement the row protocol of
      :class:`pefc.rewrite.SiteModule` (or it only uses ``prepend_kv`` / ``offset_positions``).
    """

    name: ClassVar[str]
    config: ClassVar[type[AdapterConfig]]
    site_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    mergeable: ClassVar[bool] = False
    selectable: ClassVar[bool] = False
    #: Whether a freshly initialised adapter leaves the model's outputs unchanged.
    identity_at_init: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def rewrite(self, ctx: RewriteContext, config: AdapterConfig, sites: Sequence[Site]) -> None:
        """Insert this adapter at ``sites`` (already matched and filtered) through ``ctx``."""
        raise NotImplementedError

    def param_count(self, config: AdapterConfig, site: Site) -> int:
        """The paper's formula: trainable parameters this adapter adds at ``site``."""
        raise NotImplementedError

    def shared_param_count(self, config: AdapterConfig, sites: Sequence[Site]) -> int:
        """Trainable parameters shared by all of the adapter's ``sites`` (e.g. a reparameterisation MLP)."""
        return 0

    def report_extras(self, config: AdapterConfig, sites: Sequence[Site]) -> dict[str, Any]:
        """Extra facts for ``pefc inspect`` (e.g. attention length a prefix adds); JSON-serialisable."""
        return {}

    def validate_sites(self, config: AdapterConfig, sites: Sequence[Site]) -> None:  # noqa: B027
        """Raise :class:`pefc.errors.TargetError` if the matched sites cannot take this adapter."""
