"""Per-step divergence detection: every rank publishes a digest of the aggregate it computed.

Honest ranks aggregate the same matrix with the same kernels, so their aggregates
are bit-identical. They can still differ when the matrix they received differs:
a rank on a relay path (ring or recursive-doubling allgather) altered a block in
transit, or a rank handed different bytes to different ranks. Without a check
the ranks then drift apart silently until the parameter checksum at the end of
the run. With it, every rank hashes its aggregate (SHA-256, the first 8 bytes:
a cryptographic hash, so a relay cannot craft an alteration that keeps it, and
the fastest one here, with the CPU's SHA instructions), one
allgather of one word per rank compares them, and any disagreement raises
:class:`Divergence` on every rank alike, in the step it happened, naming which
ranks hold which aggregate: a relayed or equivocated lie lives one step.

The digest covers the aggregate, not the gathered matrix: a difference that does
not change the aggregate (a rule that ignored the altered row) changes nothing
that could diverge.
"""

from __future__ import annotations

import hashlib

import torch

from .base import wait


class Divergence(RuntimeError):
    """Ranks computed different aggregates in one step."""


def digest(t: torch.Tensor) -> int:
    """The first 8 bytes of the SHA-256 of ``t``'s bytes, as a signed 64-bit integer."""
    data = t.detach().contiguous().view(torch.uint8).cpu().numpy()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def check_agreement(transport, aggregate: torch.Tensor, step: int, name: str) -> None:
    """Raise :class:`Divergence` on every rank unless every rank's ``aggregate`` has the same digest."""
    mine = torch.tensor([[digest(aggregate)]], dtype=torch.int64)
    everyone = wait(transport, transport.allgather_async(mine, name=name), step, "aggregate digest").reshape(-1)
    values = everyone.tolist()
    if len(set(values)) == 1:
        return
    groups: dict[int, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    ordered = sorted(groups.values(), key=lambda ranks: (-len(ranks), ranks))
    described = "; ".join(f"ranks {ranks}" for ranks in ordered)
    raise Divergence(f"fa_hvd: step {step}: the ranks computed different aggregates ({described} each agree): "
                     f"a block was altered in transit or sent differently to different ranks; "
                     f"ranks {sorted(r for ranks in ordered[1:] for r in ranks)} differ from the largest group")
