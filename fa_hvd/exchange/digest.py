"""Per-step divergence detection: every rank publishes a digest of the aggregate it computed.

Honest ranks aggregate the same matrix with the same kernels, so their aggregates
are bit-identical. They can still differ when the matrix they received differs:
a rank on a relay path (ring or recursive-doubling allgather) altered a block in
transit, or a rank handed different bytes to different ranks. Without a check
the ranks then drift apart silently until the parameter checksum at the end of
the run. With one, any disagreement raises :class:`Divergence` on every rank
alike, naming which ranks hold which aggregate. The digest covers the aggregate,
not the gathered matrix: a difference that does not change the aggregate (a rule
that ignored the altered row) changes nothing that could diverge. Two ways:

* **Deferred** (:class:`DeferredDigest`; ``DistributedOptimizer(digest="deferred")``,
  the trainer's ``robust.digest``, on by default): no collective of its own. Step
  ``t``'s aggregate is fingerprinted with a key drawn after it was fixed and the
  fingerprint rides in step ``t + 1``'s control row (:func:`fa_hvd.train.control.agree`,
  which every step gathers anyway): a relayed lie is named one step late. The
  fingerprint runs on a worker thread, overlapping the next forward and backward. Before
  anything is saved (a checkpoint, an elastic commit, the end of the run)
  :meth:`DeferredDigest.verify` compares the last fingerprints at once, so nothing
  saved rests on an unverified aggregate.
* **In the step** (:func:`check_agreement`; ``digest=True``): SHA-256 of the
  aggregate and one more allgather, which is also a barrier: the lie is named in
  its own step, at a cost of tens of percent of a CPU step (see the README).

**The fingerprint** (:func:`fingerprint`). The aggregate's bytes as 32-bit words
``x``, in rows of ``W = 1024`` (what is left over, under ``W`` words, is hashed as
it is). A 32-byte key ``K`` gives two lanes of ``W`` 32-bit weights ``v_l``
(SHAKE-256 of ``K``); each row ``r`` gives ``s_lr = sum_c x_rc v_lc mod 2^64``
(32 x 32 -> 64-bit multiply-adds, compiled to C: memory speed, about 3-5 ms for
ResNet-18's 11.2M fp32 on one core here; numpy, about 40 ms, where no C compiler
works; torch's int64 arithmetic on a GPU; the same bits on each), and the fingerprint is the first 8 bytes
of SHA-256 over ``K``, the dtype, the length, every ``s_lr`` and the leftover
(1/256 of the aggregate's bytes). Strength, for a key independent of the two
aggregates: they differ in some row, ``d = x_r - x'_r != 0`` with ``|d_c| < 2^32``;
take the ``c`` whose ``d_c`` has the fewest trailing zero bits, ``z < 32``. Whatever
the other weights, ``d_c v_lc`` must hit one residue mod ``2^64``, which one residue
class mod ``2^(64 - z)`` of ``v_lc`` does, and ``2^(64 - z) > 2^32``: at most one of
the ``2^32`` weights. So a lane's sums collide with probability at most ``2^-32``,
both lanes at most ``2^-64``, and different sums collide in the truncated
SHA-256 with probability ``2^-64``: every bit of the aggregate counts (a sign of
zero, the last bit of a denormal), as with SHA-256 of the whole.

**The key.** ``K = SHA-256(step, every rank's nonce in step t's control row)``;
each rank draws its 48-bit nonce from the OS (not torch's generator) when it
writes that row, after its own aggregate is fixed. So while any honest rank's
aggregate can still change, at least that rank's nonce does not exist yet: no
rank, Byzantine or not, can craft an alteration that the key will miss. A
Byzantine rank can send its nonce last, after the honest ones: each nonce it
tries costs a fingerprint of the aggregates and wins with probability about
``2^-63``, inside one step. Different nonces to different ranks give them
different keys, hence different fingerprints: the check fires. A rank that lies
in its own fingerprint or nonce stops the run with :class:`Divergence` naming it,
which a stop request could do anyway. What no digest covers: a relay that also
forges the fingerprints it relays (in a ring, rank ``i`` receives everything
through rank ``i - 1``), which would need authenticated channels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..aggregators import native
from .base import wait

_log = logging.getLogger("fa_hvd")
ROW_WORDS = 1024  # W: 32-bit words per row of the fingerprint (the two lanes' weights stay in L1)
WORDS = 3  # a control row's words: this step's nonce, the last fingerprint (two 32-bit halves; NaN: none)
NONCE_BITS = 48  # exact in a float64 word
_LANES = """#include <stdint.h>
void lanes(const uint32_t *restrict x, int64_t rows, int64_t width, const uint32_t *restrict v,
           uint64_t *restrict out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t *restrict row = x + r * width;
    uint64_t a = 0, b = 0;
    for (int64_t c = 0; c < width; ++c) {
      a += (uint64_t)row[c] * v[c];
      b += (uint64_t)row[c] * v[width + c];
    }
    out[2 * r] = a;
    out[2 * r + 1] = b;
  }
}
"""


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
    _raise_unless_equal(everyone.tolist(), step)


def fingerprint(t: torch.Tensor, key: bytes) -> int:
    """``t``'s keyed fingerprint under ``key`` (module docstring), as a signed 64-bit integer; a CUDA
    tensor is read where it is (only the lanes' sums, 1/256 of it, come to the host)."""
    flat = t.detach().reshape(-1).contiguous()
    if flat.storage_offset() * flat.element_size() % 4:
        flat = flat.clone()  # 32-bit words need an aligned start
    data = flat.view(torch.uint8)
    rows = data.numel() // (4 * ROW_WORDS)
    bulk = rows * ROW_WORDS * 4
    weights = torch.frombuffer(bytearray(hashlib.shake_256(key).digest(8 * ROW_WORDS)), dtype=torch.int32)
    sums = lane_sums(data[:bulk].view(torch.int32).reshape(rows, ROW_WORDS), weights.reshape(2, ROW_WORDS))
    h = hashlib.sha256(key)
    h.update(f"{t.dtype} {t.numel()}".encode())
    h.update(sums.cpu().numpy().tobytes())
    h.update(data[bulk:].cpu().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def lane_sums(words: torch.Tensor, weights: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """``(rows, 2)`` int64 holding the bits of row ``r``'s sums ``sum_c words[r, c] * weights[l, c] mod 2^64``,
    lanes ``l = 0, 1``; ``words`` ``(rows, W)`` and ``weights`` ``(2, W)`` int32 read as unsigned.

    ``path``: ``"native"`` (the compiled kernel: the CPU's default), ``"numpy"`` (the CPU's where the
    kernel cannot be built or ``FA_HVD_NATIVE=0``) or ``"torch"`` (other devices: int64 arithmetic
    wraps mod 2^64, so any order of summation gives the same bits)."""
    if path is None:
        cpu = words.device.type == "cpu"
        path = "torch" if not cpu else "native" if native.enabled() and _kernel() is not None else "numpy"
    rows = words.shape[0]
    if path == "native":
        out = torch.empty(rows, 2, dtype=torch.int64)
        _kernel()(words.data_ptr(), rows, ROW_WORDS, weights.contiguous().data_ptr(), out.data_ptr())
        return out
    if path == "numpy":
        x, lanes = words.numpy().view(np.uint32), weights.numpy().view(np.uint32).astype(np.uint64).T.copy()
        out = np.empty((rows, 2), dtype=np.uint64)
        for start in range(0, rows, 256):  # uint64 products wrap mod 2^64, as in C; blocks bound the memory
            out[start : start + 256] = x[start : start + 256].astype(np.uint64) @ lanes
        return torch.from_numpy(out.view(np.int64))
    out = torch.empty(rows, 2, dtype=torch.int64, device=words.device)
    lanes = weights.to(device=words.device, dtype=torch.int64) & 0xFFFFFFFF
    for start in range(0, rows, 256):  # blocks bound the (rows, 2, W) products
        block = words[start : start + 256].to(torch.int64) & 0xFFFFFFFF
        out[start : start + 256] = (block.unsqueeze(1) * lanes).sum(-1)
    return out


@functools.lru_cache(maxsize=1)
def _kernel():
    """The compiled lanes, or None (a warning, once) where they cannot be built."""
    import ctypes
    import subprocess

    try:
        function = native.function(_LANES, "lanes")
    except (OSError, subprocess.SubprocessError) as exc:
        _log.warning("fa_hvd: the compiled digest kernel is unavailable (%s); the digest uses numpy (slower)", exc)
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return function


def key_for(step: int, nonces: torch.Tensor) -> bytes:
    """The fingerprint key of ``step``'s aggregate: every rank's nonce word, as gathered."""
    data = nonces.to(torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(b"fa_hvd.digest" + step.to_bytes(8, "little", signed=True) + data).digest()


class DeferredDigest:
    """Step ``t``'s aggregate, checked in step ``t + 1``'s control row (module docstring).

    The optimizer calls :meth:`hold` with each aggregate; the control row carries
    :meth:`words` and hands every rank's back to :meth:`receive`, which starts the
    fingerprint on a worker thread (it overlaps the next forward and backward; the
    compiled kernel, numpy and hashlib release the GIL); :meth:`settle` waits for it
    (the optimizer calls it before the next exchange may reuse its buffers, the next
    row before it publishes it); :meth:`verify` compares the last fingerprint at
    once (one allgather) before anything is saved.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget the last aggregate and fingerprint (a resume or an elastic reset: on every rank alike)."""
        self.held: tuple[int, torch.Tensor] | None = None  # (step, aggregate) until its key is known
        self.pending: tuple[int, Future] | None = None  # (step, fingerprint under way)
        self.published: tuple[int, int] | None = None  # (step, fingerprint) of the last aggregate
        self.verified: tuple[int, int] | None = None
        self.seconds = 0.0  # the last fingerprint's time on the worker (the CPU time the check adds)
        self.waited = 0.0  # how long the last settle blocked (the wall time a step pays; the benchmark reads both)

    def hold(self, aggregate: torch.Tensor, step: int) -> None:
        self.held = (step, aggregate)

    def settle(self) -> None:
        """Wait for the fingerprint under way, if any, and publish it."""
        if self.pending is None:
            return
        started, (step, future) = time.perf_counter(), self.pending
        value, self.seconds = future.result()
        self.published, self.pending = (step, value), None
        self.waited = time.perf_counter() - started

    def words(self) -> list[float]:
        """This rank's control-row words: a fresh nonce (NaN without an aggregate), the last fingerprint."""
        self.settle()
        nonce = float(secrets.randbits(NONCE_BITS)) if self.held is not None else math.nan
        if self.published is None:
            return [nonce, math.nan, math.nan]
        value = self.published[1]
        return [nonce, float(value >> 32), float(value & 0xFFFFFFFF)]

    def receive(self, words: torch.Tensor) -> None:
        """Every rank's words, ``(p, WORDS)``: :class:`Divergence` unless the fingerprints agree, then
        this step's aggregate fingerprinted (on the worker) with the key from everyone's nonces."""
        last = self.published[0] if self.published is not None else None
        _raise_unless_equal(_values(words[:, 1:]), last)
        if self.held is not None:
            (step, aggregate), key = self.held, key_for(self.held[0], words[:, 0])
            self.pending, self.held = (step, _worker().submit(_timed_fingerprint, aggregate, key)), None

    def verify(self, transport, name: str = "fa_hvd.digest.verify") -> None:
        """Compare the last fingerprint now (collective; nothing to do if it was verified already)."""
        self.settle()
        if self.published is None or self.published == self.verified:
            return
        value = self.published[1]
        mine = torch.tensor([[float(value >> 32), float(value & 0xFFFFFFFF)]], dtype=torch.float64)
        _raise_unless_equal(_values(transport.allgather(mine, name=name).reshape(-1, 2)), self.published[0])
        self.verified = self.published


def _timed_fingerprint(aggregate: torch.Tensor, key: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    return fingerprint(aggregate, key), time.perf_counter() - started


@functools.lru_cache(maxsize=1)
def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fa_hvd_digest")


def _values(words: torch.Tensor) -> list[tuple]:
    """Each rank's fingerprint words as a comparable tuple (any NaN: None)."""
    return [tuple(None if math.isnan(w) else w for w in row) for row in words.tolist()]


def _raise_unless_equal(values: list, step: int | None) -> None:
    if len(set(values)) <= 1:
        return
    groups: dict = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    ordered = sorted(groups.values(), key=lambda ranks: (-len(ranks), ranks))
    described = "; ".join(f"ranks {ranks}" for ranks in ordered)
    when = f"step {step}" if step is not None else "the last step"
    raise Divergence(f"fa_hvd: {when}: the ranks computed different aggregates ({described} each agree): "
                     f"a block was altered in transit or sent differently to different ranks; "
                     f"ranks {sorted(r for ranks in ordered[1:] for r in ranks)} differ from the largest group")
