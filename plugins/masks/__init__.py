"""One additive attention mask shared by every layer (:mod:`pefc.shared_mask`), converted once
per call instead of once per layer; run on every compiled model through the public
``pefc_after_rewrite`` hook. Switch it off with ``PEFC_DISABLE_PLUGINS=masks``."""

from __future__ import annotations

from typing import Any

import pefc


@pefc.hookimpl
def pefc_after_rewrite(model: Any, spec: Any) -> None:
    from pefc.shared_mask import share_additive_masks

    model.pefc.extras["shared_masks"] = share_additive_masks(model)
