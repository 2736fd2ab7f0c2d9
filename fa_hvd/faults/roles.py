"""Faults that lie in a role other than the gradient row: what a rank reports, relays and says.

Each kind is a fault spec like any other (``ranks``, ``start_step``, ``stop_step``,
``probability``, ``params``; a rank that lies counts against ``f``). The exchange,
the transport and the per-step agreement ask :class:`RoleLies` at the point where
the lie is told:

* ``false_flags``     -- sharded, as a shard owner: report rows ``rows`` (default:
  every other rank's) as non-finite in its shard
* ``false_claims``    -- sharded, as a sender: claim ``scale`` (default 2) times the
  true squared norm of each chunk of its own row
* ``gram_scale``      -- sharded, as an owner: its partial Gram times ``scale`` (default 2)
* ``gram_perturb``    -- sharded, as an owner: every off-diagonal entry of its partial
  Gram moved by ``eps`` times ``sqrt(K_ii K_jj)``, the diagonal kept (default -3:
  every correlation pushed below -1, so no longer a Gram matrix; a small ``eps``
  can stay one, which is the trusted margin)
* ``wrong_aggregate`` -- sharded, as an owner: its shard of the aggregate times
  ``scale`` (default -100)
* ``equivocate``      -- sharded, as a sender: the chunk sent to rank ``target``
  (default: the last rank) differs from what the other holders get (replicas
  compare them; unreplicated, a chunk has one receiver, so this is a gradient fault)
* ``lie_loss``        -- the agreement: report loss ``value`` (default 1e6)
* ``lie_stop``        -- the agreement: request a stop
* ``lie_overflow``    -- the agreement: claim an fp16 overflow
* ``malformed_message`` -- every object message it sends (errors, checksums, model
  signature, ...) is ``payload`` instead (default: a pickle that would run code)

A relaying rank altering another rank's block inside a collective cannot be
injected from Python over Horovod, Gloo or MPI (the relay is in their C++); the
tests inject it with an in-process transport, and the per-step digest
(:mod:`fa_hvd.exchange.digest`) is what detects it.
"""

from __future__ import annotations

import math
import pickle

import torch

SHARDED_ROLE_KINDS = ("false_flags", "false_claims", "gram_scale", "gram_perturb", "wrong_aggregate", "equivocate")
ROLE_KINDS = SHARDED_ROLE_KINDS + ("lie_loss", "lie_stop", "lie_overflow", "malformed_message")


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rows(v) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                                      for r in v))


# kind -> param -> (default, check, requirement): registered in fa_hvd.faults.spec.PARAMS
ROLE_PARAMS = {
    "false_flags": {"rows": (None, _rows, "null or a list of ranks")},
    "false_claims": {"scale": (2.0, lambda v: _real(v) and v > 0, "a number > 0")},
    "gram_scale": {"scale": (2.0, lambda v: _real(v) and v > 0, "a number > 0")},
    "gram_perturb": {"eps": (-3.0, _real, "a finite number")},
    "wrong_aggregate": {"scale": (-100.0, _real, "a finite number")},
    "equivocate": {"target": (None, lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
                              "null or a rank")},
    "lie_loss": {"value": (1e6, _real, "a finite number")},
    "lie_stop": {},
    "lie_overflow": {},
    "malformed_message": {"payload": (None, lambda v: v is None or isinstance(v, str), "null or a string")},
}


class _Call:
    """A pickle that calls ``print`` when loaded: it stands for any code another rank would run."""

    def __reduce__(self):
        return (print, ("fa_hvd fault: a malformed_message payload was unpickled: code of another rank ran",))


DEFAULT_PAYLOAD = pickle.dumps(_Call())


class RoleLies:
    """One rank's role faults, asked by the exchange, the transport and :func:`~fa_hvd.train.control.agree`.

    ``injector`` (:class:`~fa_hvd.faults.injector.FaultInjector`) decides what fires;
    ``step`` is the optimizer step the injector last saw (the same step the lie belongs to).
    Every method returns what to report instead (unchanged when no lie fires).
    """

    def __init__(self, injector):
        self.injector = injector
        self.step = 0
        self.specs = [(i, s) for i, s in enumerate(injector.specs) if s.kind in ROLE_KINDS]

    def __bool__(self) -> bool:
        return bool(self.specs)

    def _firing(self, kind: str):
        for i, spec in self.specs:
            if spec.kind == kind and self.injector.fires(i, self.injector.rank, self.step):
                self.injector.record(spec, self.step)
                return spec.params
        return None

    # -- the sharded exchange -------------------------------------------------------------
    def report(self, shard: int, finite: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An owner's row flags and partial Gram of ``shard`` (host tensors)."""
        params = self._firing("false_flags")
        if params is not None:
            rows = params["rows"]
            rows = [r for r in range(finite.numel()) if r != self.injector.rank] if rows is None else rows
            finite = finite.clone()
            finite[rows] = False
        params = self._firing("gram_scale")
        if params is not None:
            K = K * params["scale"]
        params = self._firing("gram_perturb")
        if params is not None:
            d = K.diagonal().clamp_min(0).sqrt()
            K = K + params["eps"] * (d[:, None] * d[None, :]).fill_diagonal_(0)
        return finite, K

    def claim(self, finite: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sender's word on its own row: finite chunks and their squared norms."""
        params = self._firing("false_claims")
        return (finite, norms) if params is None else (finite, norms * params["scale"])

    def aggregate(self, shards: list[int], out: torch.Tensor) -> torch.Tensor:
        """An owner's shards of the aggregate (one row per shard it holds)."""
        params = self._firing("wrong_aggregate")
        return out if params is None else out * params["scale"]

    def sent(self, wire: torch.Tensor, splits: list[int]) -> torch.Tensor:
        """What a sender's alltoall carries (``splits[r]`` values to rank ``r``, in rank order)."""
        params = self._firing("equivocate")
        if params is None:
            return wire
        target = len(splits) - 1 if params["target"] is None else params["target"]
        at, wire = sum(splits[:target]), wire.clone()
        wire[at : at + splits[target]] += 1.0
        return wire

    # -- the transport and the agreement ----------------------------------------------------
    def message(self, data: bytes) -> bytes:
        params = self._firing("malformed_message")
        if params is None:
            return data
        return DEFAULT_PAYLOAD if params["payload"] is None else params["payload"].encode()

    def control(self, row: torch.Tensor) -> torch.Tensor:
        """The agreement's row: ``[loss, stop, checkpoint due, injected a fault, overflowed]``."""
        row = row.clone()
        params = self._firing("lie_loss")
        if params is not None:
            row[0, 0] = params["value"]
        if self._firing("lie_stop") is not None:
            row[0, 1] = 1.0
        if self._firing("lie_overflow") is not None:
            row[0, 4] = 1.0
        return row
