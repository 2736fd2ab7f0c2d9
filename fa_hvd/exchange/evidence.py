"""What the sharded exchange believes of what ranks report about their shards, and whom it blames.

Unreplicated (``replicas = 1``), each shard has one owner, so the owner's word about
its shard cannot be compared with a second copy. What can be checked is checked
against what each *sender* knows about its own row (:func:`verdict`):

* every rank reports, for its own row, which chunks are finite and each chunk's
  squared norm in fp64 (one pass over its own gradient, O(n));
* the owner of shard ``s`` reports its row flags and its partial Gram ``K_s``,
  whose diagonal holds the same squared norms.

A rank's word about its own row is enough to drop that row (a sender that
declares its row non-finite only loses its own row; it is counted against ``f``
as every non-finite row is). A disagreement between sender ``i`` and owner ``o``
about row ``i`` (flags, or the diagonal beyond :data:`DIAGONAL_RTOL`) is a
*dispute*: one of the two lied, and nothing shows which. Under the promise that
at most ``f`` ranks lie:

* an owner in dispute with more than ``f`` senders lied (else more than ``f``
  senders did), and so did a sender in dispute with more than ``f`` owners;
* a partial Gram that is not a Gram matrix (not finite on finite rows, or not
  positive semidefinite within :data:`PSD_RTOL`) proves its owner lied;
* a rank that disputes with itself (its row in its own shard) lied.

An owner proven to lie stops the step: its shard of ``K`` and of the aggregate
cannot be repaired without a copy, so :class:`~fa_hvd.exchange.sharded.ShardMismatch`
names it on every rank. A sender proven to lie loses its row (counted against
``f``). Every other (open) dispute drops both of its rows, and ``f`` shrinks by
the size of a matching of the open disputes (each matched pair holds a liar). One
lie costs two rows and one from ``f``, so ``p - 2f`` (a rule's margin) is kept; a
lying owner removes at most ``f`` honest rows (with its own) before it is proven.

What stays trusted, unreplicated: within those checks, the off-diagonal entries
of each owner's ``K_s`` (a PSD matrix with the right diagonal bounds each entry by
Cauchy-Schwarz: ``|K_s[i, j]| <= sqrt(K_s[i, i] K_s[j, j])``, so a lie moves the
coefficients no further than the honest norms allow) and the owner's shard of the
aggregate. Replicas (:func:`majority`) buy those back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DIAGONAL_RTOL = 1e-7  # sender's fp64 dot vs owner's fp64 Gram diagonal: the same exact products, summed apart
PSD_RTOL = 1e-9  # the smallest eigenvalue of a partial Gram may fall this far below 0, relative to the largest


class Verdict(NamedTuple):
    keep: torch.Tensor  # (p,) bool: rows the rule aggregates
    f: int  # the f left for them
    disputes: list[tuple[int, int]]  # (sender, owner) pairs that disagree
    blamed: list[int]  # senders proven to lie about their own row
    lying_owners: dict[int, str]  # owner -> what proves it lied (the step must stop)


def not_a_gram(K: torch.Tensor, finite: torch.Tensor, strict_finite: bool) -> str | None:
    """Why the partial Gram ``K`` (rows flagged ``finite``, then anchors) cannot be one, or None."""
    rows = torch.cat([finite, torch.ones(K.shape[0] - finite.numel(), dtype=torch.bool)])
    sub = K[rows][:, rows]
    if not sub.isfinite().all():
        return "non-finite entries between finite rows" if strict_finite else None
    if sub.numel() == 0:
        return None
    eig = torch.linalg.eigvalsh(sub)
    scale = float(eig.abs().max())
    if float(eig.min()) < -PSD_RTOL * scale:
        return f"not positive semidefinite (eigenvalue {float(eig.min()):.3g}, largest {scale:.3g})"
    return None


def verdict(f: int, owners: list[int], flags: torch.Tensor, diagonals: torch.Tensor | None,
            claimed_finite: torch.Tensor, claimed_norms: torch.Tensor, not_grams: dict[int, str]) -> Verdict:
    """Rows kept and ``f`` left, from what owners and senders said (see the module docstring).

    ``owners[s]``: the rank whose report of shard ``s`` is used. ``flags[s, i]`` and
    ``diagonals[s, i]`` (None without a Gram): shard ``s``'s report of row ``i``.
    ``claimed_finite[i, s]``, ``claimed_norms[i, s]``: sender ``i``'s own word on its chunk
    ``s``. ``not_grams``: owner -> why its partial Gram is not one.
    """
    p = flags.shape[1]
    lying_owners = dict(not_grams)
    declared = ~claimed_finite.all(1)  # senders that say their own row is non-finite: dropped on their word
    disputes = []
    for s, owner in enumerate(owners):
        for i in range(p):
            if declared[i]:
                continue
            agree = bool(flags[s, i])
            if agree and diagonals is not None:
                mine, theirs = float(claimed_norms[i, s]), float(diagonals[s, i])
                agree = mine == theirs or abs(mine - theirs) <= DIAGONAL_RTOL * max(abs(mine), abs(theirs))
            if agree:
                continue
            if i == owner:
                lying_owners.setdefault(owner, f"its own row in its own shard {s} contradicts its own claim")
            else:
                disputes.append((i, owner))
    for owner in sorted(set(o for _, o in disputes)):
        senders = {i for i, o in disputes if o == owner}
        if len(senders) > f:
            lying_owners.setdefault(owner, f"its report of shard rows {sorted(senders)} contradicts what more "
                                           f"than f={f} senders say they sent")
    blamed = sorted(i for i in set(i for i, _ in disputes) if len({o for j, o in disputes if j == i}) > f)
    explained = set(torch.nonzero(declared).flatten().tolist()) | set(blamed)
    open_disputes = [(i, o) for i, o in disputes if i not in explained and o not in explained]
    matched: set[int] = set()
    for i, owner in open_disputes:  # a greedy matching: each matched pair holds a liar
        if i not in matched and owner not in matched:
            matched |= {i, owner}
    dropped = explained | {r for pair in open_disputes for r in pair}
    reduction = len(explained) + len(matched) // 2
    keep = torch.ones(p, dtype=torch.bool)
    keep[sorted(dropped)] = False
    return Verdict(keep, max(f - reduction, 0), disputes, blamed, lying_owners)


class Majority(NamedTuple):
    chosen: int  # index of the copy to use
    odd: list[int]  # ranks whose copies differ from it


def majority(copies: list[torch.Tensor], ranks: list[int], f: int) -> Majority | None:
    """The copy held by more than ``f`` of ``ranks`` (it has an honest holder, and honest copies are
    bit-identical), with the ranks whose copies differ; None when no such copy exists (or two do:
    more than ``f`` liars)."""
    bits = [c.contiguous().view(torch.uint8) for c in copies]
    groups: list[list[int]] = []
    for i, b in enumerate(bits):
        for group in groups:
            if torch.equal(bits[group[0]], b):
                group.append(i)
                break
        else:
            groups.append([i])
    big = [g for g in groups if len(g) > f]
    if len(big) != 1:
        return None
    return Majority(big[0][0], sorted(ranks[i] for g in groups if g is not big[0] for i in g))
