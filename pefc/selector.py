"""The syntax of one ``target`` selector: a role (``@attn.q``), optionally qualified by an
attention kind (``@attn.q[cross]``), or a module-path glob (``*.q_proj``).

Attention kinds come from the dataflow (see :func:`pefc.sites.find_sites`):

- ``self``: keys and values come from the queries' own sequence (every self-attention);
- ``cross``: keys and values come from another sequence (an encoder-decoder's
  cross-attention);
- ``encoder``: a self-attention whose output reaches the keys or values of a cross-attention;
- ``decoder``: the other self-attentions of a model that has cross-attention.
"""

from __future__ import annotations

import re

ATTENTION_KINDS = ("self", "encoder", "decoder", "cross")
_QUALIFIED = re.compile(r"^(@[^\[\]]+)\[([^\[\]]*)\]$")


def split_kind(selector: str) -> tuple[str, str | None]:
    """``"@attn.q[cross]"`` -> ``("@attn.q", "cross")``; an unqualified selector gets ``None``.

    Raises ``ValueError`` for an unknown kind. Brackets in a path glob (``*.h[01].attn``)
    keep their ``fnmatch`` meaning.
    """
    match = _QUALIFIED.match(selector) if selector.startswith("@") else None
    if match is None:
        return selector, None
    role, kind = match.group(1), match.group(2).strip()
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"selector {selector!r}: unknown attention kind {kind!r}; "
                         f"use one of {', '.join(ATTENTION_KINDS)}")
    return role, kind


def kind_matches(kind: str, site_kind: str | None) -> bool:
    """Whether a site of attention kind ``site_kind`` is of ``kind`` (``self`` covers encoder and decoder)."""
    if site_kind is None:
        return False
    return site_kind == kind or (kind == "self" and site_kind in ("encoder", "decoder"))
