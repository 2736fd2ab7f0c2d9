"""``robust.evict``'s decision: which hosts to drain when ranks cross its threshold, and whether the run goes on.

Every rank takes the same decision from the same inputs (the trust ledger, the world's identities
and the evictions of the run so far, part of the shared state that checkpoints and elastic commits
keep), so no message is needed to agree on it. :func:`decide`, for the suspects named at one step:

1. Suspects on a host already excluded earlier in the run are *pending*: under elastic, Horovod has
   not dropped that host yet; their rows go through the rule as before and nothing is decided again.
2. ``f`` stays what the config says after an eviction (the conservative choice: the evicted
   host proves there was a fault, not that there are fewer to come). More than ``f`` suspects at
   once, or more than ``f`` evicted over the run (pending ones included), and the run stops to ask:
   nothing is excluded.
3. Every rank on an excluded host leaves with it, honest ones included (a host is drained whole;
   they are not counted against ``f``, being no suspects). Under elastic, where the run goes on with
   the ranks left, if they would be fewer than the rule needs with that ``f`` (``p >= 2f + 1`` for FA),
   nothing is excluded and the run stops. Without elastic the run stops anyway and starts again on
   as many ranks as it asks for (SLURM's requeue allocates other nodes in place of the excluded ones;
   a start with too few ranks for the rule is refused before training), so this check does not apply.
4. Otherwise the suspects' hosts are excluded. Without elastic the run stops (a checkpoint, exit 76)
   for the operator or the SLURM requeue (``slurm/train.sbatch``: ``--exclude``) to drain them; under
   elastic it goes on and Horovod's host discovery (``launch/discover-hosts.sh`` reads the exclusion
   file) removes the host.

A host is named as :func:`fa_hvd.train.trust.node` gives it: under elastic the name horovodrun
started the rank under, which is what the discovery script prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fa_hvd.train import trust


@dataclass(frozen=True)
class Verdict:
    """What to do about the suspects of one step."""

    suspects: list[dict]  # those decided on (the pending ones left out)
    text: str  # the operator's sentence after their names
    hosts: list[str] = field(default_factory=list)  # to exclude now (empty: nothing excluded)
    evicted: list[dict] = field(default_factory=list)  # the suspects evicted now: {step, rank, host}
    stop: bool = True  # checkpoint and exit 76


def decide(suspects: list[dict], identities: list[dict], earlier: list[dict], f: int, rule, elastic: bool,
           step: int, where: str) -> Verdict | None:
    """The verdict at ``step`` on ``suspects`` (the evictor's ledger entries, each with ``rank`` and its
    identity), given the world's ``identities`` by rank, the ``earlier`` evictions of the run
    (``{step, rank, host}``), the aggregation ``rule`` with ``f``, and ``where`` the exclusion file is.
    None when every suspect is pending."""
    excluded = list(dict.fromkeys(e["host"] for e in earlier))
    fresh = [s for s in suspects if trust.node(s, elastic) not in excluded]
    if not fresh:
        return None
    hosts = sorted({trust.node(s, elastic) for s in fresh})
    over_run = len(earlier) + len(fresh)
    left = sum(trust.node(identity, elastic) not in excluded + hosts for identity in identities)
    if len(fresh) > f:
        return Verdict(fresh, f"{len(fresh)} ranks crossed robust.evict's threshold at once, more than f = {f}: "
                       f"stopping to ask, nothing excluded")
    if over_run > f:
        return Verdict(fresh, f"draining {', '.join(hosts)} would make {over_run} ranks evicted over this run (hosts "
                       f"{', '.join(excluded)} already), more than f = {f}: stopping to ask, nothing excluded")
    if elastic and left < rule.min_workers(f):
        return Verdict(fresh, f"draining {', '.join(hosts)} would leave {left} ranks, fewer than {rule.name} needs "
                       f"({rule.precondition()}, f = {f}): stopping, nothing excluded")
    records = [{"step": step, "rank": s["rank"], "host": trust.node(s, elastic)} for s in fresh]
    if elastic:
        return Verdict(fresh, f"{', '.join(hosts)} excluded (listed in {where}): Horovod's host discovery drops it and "
                       f"the run goes on with {left} ranks, f = {f}", hosts, records, stop=False)
    return Verdict(fresh, f"drain {', '.join(hosts)}: listed in {where}; start again on {len(identities)} ranks "
                   f"without it", hosts, records)


__all__ = ["Verdict", "decide"]
