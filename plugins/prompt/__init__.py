"""Prompt tuning (Lester et al. 2021): P trainable virtual-token embeddings before the input.

At the token-embedding site the model's input embeddings become ``[prompt; embed(x)]``
(``prompt`` ``[P, d_model]``, parameter ``<adapter>.<embedding path>.prompt_embeddings``),
and the rest of the graph runs on ``P + S`` positions, as HF PEFT does:

- the attention mask (any graph input feeding an attention mask) gets ``P`` leading ones;
  ``labels`` (any input feeding a loss's targets) get ``P`` leading ``ignore_index`` (-100),
  so the model's own loss equals PEFT's; other inputs carrying the sequence (e.g.
  ``token_type_ids``) get ``P`` leading zeros;
- positions are ``0 .. P+S-1``: virtual tokens at ``0 .. P-1``, real tokens at ``P ..``;
- the causal mask, reshapes and every other use of the sequence length see ``P + S``.

**What is returned.** Every graph output that has the sequence dim (``logits``,
``last_hidden_state``, ...) is sliced to the real tokens: ``[:, P:]`` of what PEFT returns,
so shapes are the same as the base model's. Outputs without it are returned as computed
on the widened sequence, as PEFT computes them: a loss the model computes from ``labels``
(virtual positions ignored), BERT's ``pooler_output`` (it pools the first position, which is
the first virtual token).

``init: random`` draws the prompt from N(0, 1); ``init: vocab`` copies rows of the
embedding table at random token ids (PEFT's ``SAMPLE_VOCAB``), drawn with ``seed`` or,
without one, from torch's global generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, PositiveInt

import pefc


class PromptConfig(pefc.AdapterConfig):
    method: Literal["prompt"] = "prompt"
    default_target = ("@embed",)

    num_virtual_tokens: PositiveInt = Field(default=20, le=65536, description="number of virtual tokens P")
    init: Literal["random", "vocab"] = Field(
        default="random", description="N(0, 1), or copies of embedding rows at random token ids")
    seed: int | None = Field(default=None, ge=0, description="seed of the `vocab` token ids (default: torch's RNG)")


class Prompt(pefc.Method):
    name = "prompt"
    config = PromptConfig
    site_kinds = ("embedding",)
    mergeable = False
    identity_at_init = False  # random prefixes / prompts, as in HF PEFT
    description = "Trainable virtual-token embeddings before the input (Lester et al. 2021)"

    def validate_sites(self, config: PromptConfig, sites: Sequence[pefc.Site]) -> None:
        if len(sites) != 1:
            paths = ", ".join(s.path for s in sites)
            raise pefc.TargetError(f"adapter {config.name!r} (prompt): needs exactly one token embedding, "
                                   f"its targets match {len(sites)}: {paths}")

    def rewrite(self, ctx: pefc.RewriteContext, config: PromptConfig, sites: Sequence[pefc.Site]) -> None:
        from pefc_plugins.prompt.modules import PromptEmbedding

        site = sites[0]
        assert isinstance(site, pefc.EmbeddingSite)
        module = PromptEmbedding(config.num_virtual_tokens, site.embedding_dim)
        if config.init == "vocab":
            module.copy_rows(ctx.param(site.weight_name), config.seed)
        ctx.prepend_sequence(site, module, config.num_virtual_tokens)

    def report_extras(self, config: PromptConfig, sites: Sequence[pefc.Site]) -> dict[str, int]:
        return {"context_tokens_used": config.num_virtual_tokens}

    def param_count(self, config: PromptConfig, site: pefc.Site) -> int:
        assert isinstance(site, pefc.EmbeddingSite)
        return config.num_virtual_tokens * site.embedding_dim


@pefc.hookimpl
def pefc_methods() -> list[pefc.Method]:
    return [Prompt()]

