"""The horizontal-fusion pass (:mod:`pefc.fusion`), run on every compiled model through the
public ``pefc_after_rewrite`` hook: same-adapter sites reading one input share one
down-projection. Switch it off with ``PEFC_DISABLE_PLUGINS=fusion``."""

from __future__ import annotations

from typing import Any

import pefc


@pefc.hookimpl
def pefc_after_rewrite(model: Any, spec: Any) -> None:
    from pefc.fusion import fuse_shared_inputs

    model.pefc.extras["fusion"] = {"groups": fuse_shared_inputs(model)}
