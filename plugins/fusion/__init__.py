"""The horizontal-fusion pass (:mod:`pefc.fusion`), run on every compiled model through the
public ``pefc_after_rewrite`` hook: same-adapter sites reading one input share one
down-projection, the base products of low-rank sites run with their updates as one node, and
every other frozen ``linear`` runs its products in the faster CPU library (two lowerings,
:mod:`pefc.lowering`; :mod:`pefc.cpu_gemm`). Switch all three off with ``PEFC_DISABLE_PLUGINS=fusion``."""

from __future__ import annotations

from typing import Any

import pefc


@pefc.hookimpl
def pefc_after_rewrite(model: Any, spec: Any) -> None:
    from pefc.frozen_linear import lower_frozen_linears
    from pefc.fusion import fuse_shared_inputs, lower_base_products
    from pefc.lowering import add_lowering

    model.pefc.extras["fusion"] = {"groups": fuse_shared_inputs(model)}
    add_lowering(model, lower_base_products)
    add_lowering(model, lower_frozen_linears)  # after: the linears the first one did not take
