"""Matches an adapter's ``target`` selectors and ``layers`` filter against the sites."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from pefc.config import AdapterConfig
from pefc.errors import TargetError
from pefc.selector import kind_matches, split_kind
from pefc.sites import Site


def selector_matches(selector: str, site: Site) -> bool:
    """``@role`` matches a role (``@mlp`` matches every ``mlp.*``), ``@role[kind]`` only in
    attentions of that kind (:mod:`pefc.selector`); anything else is a path glob."""
    if selector.startswith("@"):
        selector, kind = split_kind(selector)
        role = selector[1:]
        if kind is not None and not kind_matches(kind, site.attention_kind):
            return False
        return site.role is not None and (site.role == role or site.role.startswith(role + "."))
    return fnmatch.fnmatchcase(site.path, selector) or fnmatch.fnmatchcase(site.path, "*." + selector)


def match_sites(config: AdapterConfig, sites: Sequence[Site], kinds: Sequence[str]) -> list[Site]:
    """Sites of ``kinds`` selected by ``config``; a selector matching nothing is an error."""
    selectors = config.targets()
    if not selectors:
        raise TargetError(f"adapter {config.name!r} ({config.method}): no `target` given and the method has no "
                          "default targets")
    chosen: list[Site] = []
    for selector in selectors:
        _refuse_unread(config, selector, sites, kinds)
        hits = [s for s in sites if selector_matches(selector, s)]
        usable = [s for s in hits if s.kind in kinds]
        if config.layers is not None:
            usable = [s for s in usable if s.layer in config.layers]
        if not usable:
            raise TargetError(_no_match(config, selector, hits, sites, kinds))
        chosen.extend(s for s in usable if s not in chosen)
    return chosen


def _refuse_unread(config: AdapterConfig, selector: str, sites: Sequence[Site], kinds: Sequence[str]) -> None:
    """An attention method aimed at attention pefc cannot read: say which module and why."""
    if "attention" not in kinds:
        return
    for site in sites:
        if site.kind != "unread attention" or (config.layers is not None and site.layer not in config.layers):
            continue
        aimed = selector in ("@attn", "@attn.") or (not selector.startswith("@") and selector_matches(selector, site))
        if aimed:
            raise TargetError(f"adapter {config.name!r} ({config.method}): target {selector!r} covers module "
                              f"{site.path!r}, whose attention pefc cannot read: {getattr(site, 'reason', '')}",
                              hint="write the attention as softmax(q @ k^T [* scale] [+ mask]) @ v or call "
                                   "torch.nn.functional.scaled_dot_product_attention")


def _no_match(config: AdapterConfig, selector: str, hits: list[Site], sites: Sequence[Site],
              kinds: Sequence[str]) -> str:
    head = f"adapter {config.name!r} ({config.method}): target {selector!r}"
    if hits and not any(s.kind in kinds for s in hits):
        found = ", ".join(sorted({s.kind for s in hits}))
        return f"{head} matches only {found} sites, but {config.method} acts on {', '.join(kinds)} sites"
    if hits:
        layers = sorted({s.layer for s in hits if s.layer is not None})
        return f"{head} matches no site in layers {config.layers}; it matches layers {layers}"
    base, kind = split_kind(selector)
    if kind is not None and any(selector_matches(base, s) for s in sites):
        found = sorted({s.attention_kind for s in sites if s.attention_kind and selector_matches(base, s)})
        return f"{head} matches no site; {base} is found in attentions of kind: {', '.join(found)}"
    return f"{head} matches no site; {_nearest(base, sites, kinds)}"


def _nearest(selector: str, sites: Sequence[Site], kinds: Sequence[str]) -> str:
    if selector.startswith("@"):
        present = sorted({s.role for s in sites if s.role and s.kind in kinds})
        if not present:
            have = [s.path for s in sites if s.kind in kinds]
            what = " or ".join(kinds)
            return (f"the model has no {what} sites" if not have else
                    f"its {what} sites have no role; target them by path: {', '.join(have[:5])}")
        close = difflib.get_close_matches(selector[1:], present, n=1, cutoff=0.6)
        guess = f" (did you mean @{close[0]}?)" if close else ""
        return f"roles found in this model: {', '.join('@' + r for r in present)}{guess}{_unread_note(sites)}"
    candidates = [s.path for s in sites if s.kind in kinds]
    tail = selector.strip("*.")
    close = difflib.get_close_matches(selector, candidates, n=5, cutoff=0.3)
    close += [p for p in candidates if tail and tail.split(".")[-1] in p.split(".")[-1] and p not in close]
    if not close:
        close = difflib.get_close_matches(tail, candidates, n=5, cutoff=0.1) or candidates[:5]
    return "nearest sites: " + ", ".join(close[:5])


def _unread_note(sites: Sequence[Site]) -> str:
    unread = [s for s in sites if s.kind == "unread attention"]
    if not unread:
        return ""
    return f"; pefc cannot read the attention of {unread[0].path!r}: {getattr(unread[0], 'reason', '')}"
