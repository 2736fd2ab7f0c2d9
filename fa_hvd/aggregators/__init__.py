"""Robust aggregation rules: ``(p, n)`` gradients -> ``(n,)`` aggregate.

Pure tensor math, no communication. Use :func:`get`::

    agg = fa_hvd.aggregators.get("flag", f=3)            # the Flag Aggregator
    agg = fa_hvd.aggregators.get("nnm+krum", f=2)        # pre-aggregation, then a rule
    out = agg(G)                                         # G: (p, n) -> out: (n,)

A name is a rule, optionally preceded by pre-aggregation stages joined with
``+``. Keyword parameters go to every stage whose constructor accepts them
(``f`` goes to all); a parameter no stage accepts is an error.
"""

from __future__ import annotations

import inspect

from .base import Aggregator, Composed, PreAggregator
from .bulyan import Bulyan
from .cclip import CClip
from .flag import Flag
from .geomed import GeoMed
from .krum import Krum, MultiKrum
from .mda import MDA
from .mean import Mean
from .median import Median
from .nmean import NMean
from .pre.arc import ARC
from .pre.bucketing import Bucketing
from .pre.clip import Clip
from .pre.nnm import NNM
from .trimmed_mean import TrimmedMean

RULES: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (Mean, Median, TrimmedMean, Krum, MultiKrum, Bulyan, GeoMed, CClip, MDA, NMean, Flag)
}
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {
    cls.name: cls for cls in (NNM, Bucketing, Clip, ARC)
}


def names() -> list[str]:
    """Names of the rules (pre-aggregators are listed by :data:`PRE_AGGREGATORS`)."""
    return sorted(RULES)


def _accepted(cls) -> set[str]:
    return {
        name
        for name, prm in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)
    }


def get(name: str, **params) -> Aggregator:
    """Build the aggregator ``name`` (e.g. ``"flag"``, ``"bucketing+krum"``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"aggregator name must be a non-empty string, got {name!r}")
    *pre_names, rule_name = [part.strip().lower() for part in name.split("+")]
    if rule_name not in RULES:
        raise ValueError(f"unknown aggregation rule {rule_name!r}; known: {', '.join(names())}")
    for pre in pre_names:
        if pre not in PRE_AGGREGATORS:
            raise ValueError(
                f"unknown pre-aggregation {pre!r} in {name!r}; known: {', '.join(sorted(PRE_AGGREGATORS))}"
            )
    classes = [PRE_AGGREGATORS[p] for p in pre_names] + [RULES[rule_name]]
    used = set()
    built = []
    for cls in classes:
        accepted = _accepted(cls)
        kwargs = {k: v for k, v in params.items() if k in accepted}
        used |= set(kwargs)
        built.append(cls(**kwargs))
    unused = set(params) - used
    if unused:
        raise ValueError(f"{name}: unknown parameter(s) {sorted(unused)}")
    rule = built[-1]
    return Composed(built[:-1], rule) if pre_names else rule


__all__ = ["Aggregator", "PreAggregator", "Composed", "get", "names", "RULES", "PRE_AGGREGATORS"]
