"""The horizontal-fusion pass (:mod:`pefc.fusion`), run on every compiled model through the
public ``pefc_after_rewrite`` hook: same-adapter sites reading one input share one
down-projection, and three lowerings (:mod:`pefc.lowering`): the base products of low-rank sites
run with their updates as one node, a selecting model's batch on one adapter folds that adapter
into its products (:mod:`pefc.uniform_rows`), and every other frozen ``linear`` runs its products
in the faster CPU library (:mod:`pefc.cpu_gemm`). Switch all off with ``PEFC_DISABLE_PLUGINS=fusion``."""

from __future__ import annotations

from typing import Any

import pefc


@pefc.hookimpl
def pefc_after_rewrite(model: Any, spec: Any) -> None:
    from pefc.frozen_linear import lower_frozen_linears
    from pefc.fusion import fuse_shared_inputs, lower_base_products
    from pefc.lowering import add_lowering
    from pefc.uniform_rows import lower_uniform_rows

    model.pefc.extras["fusion"] = {"groups": fuse_shared_inputs(model)}
    add_lowering(model, lower_base_products)
    add_lowering(model, lower_uniform_rows)
    add_lowering(model, lower_frozen_linears)  # last: the linears the others did not take
