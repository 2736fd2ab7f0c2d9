"""Worker momentum: each rank sends its momentum, not its gradient.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization"
(ICML 2021); Farhadkhani et al., "Byzantine Machine Learning Made Easy" (ICML 2022).
Rank ``r`` keeps, per bucket, ``m_t = beta m_(t-1) + g_t`` (``m_0 = g_0``; torch SGD's
buffer, no dampening) and sends ``m_t``; the rule aggregates the momenta and the local
optimizer steps with the aggregate and no momentum of its own.

With ``mean`` this is SGD with momentum ``beta`` on the averaged gradient (``mean_r m_t``
is the momentum of ``mean_r g_t``; on one rank bit for bit, the buffer rounded as torch's
SGD rounds it), so the learning rate keeps its meaning. Weight decay and gradient clipping
stay the optimizer's: they act on the aggregate, after the momentum, not inside it.
With ``nesterov`` the rank sends ``g_t + beta m_t`` instead (torch SGD's Nesterov step; the
buffer is the same ``m_t``), so with ``mean`` it is Nesterov SGD on the averaged gradient.

What changes is the honest rows' spread beside their mean: over i.i.d. steps the
momentum's mean grows as ``1 / (1 - beta)`` and its noise as ``1 / sqrt(1 - beta^2)``, so
at ``beta = 0.9`` the honest rows agree about 4.4 times more closely relative to their
mean, and an attack that hides inside their spread (ALIE: one standard deviation from
the mean) moves the aggregate that much less relative to it.

A bucket whose gradient is not finite leaves its buffer as it was and is sent non-finite
(the rule drops the row; fp16 loss scaling skips the step): one bad batch never poisons
the history. The other buckets of a step that fp16 loss scaling skips keep what they folded in
(their gradients were finite; only the overflowing bucket's are lost).

Buffers are per rank and per bucket, in the dtype sent (bf16 is sent as fp32). A checkpoint
keeps each rank's own (the trainer's per-rank state); a new world starts them afresh.
``0 <= beta < 1``; ``beta = 0`` sends the gradient.
"""

from __future__ import annotations

import math

import torch


def check_beta(beta) -> float:
    """``beta`` as a float; ``ValueError`` unless ``0 <= beta < 1``."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 <= beta < 1) or math.isnan(beta):
        raise ValueError(f"worker_momentum must be a number with 0 <= beta < 1, got {beta!r}")
    return float(beta)


def check_single_momentum(param_groups, beta: float) -> None:
    """``ValueError`` when worker momentum ``beta`` is on and a parameter group (of an optimizer, or of
    a state it is about to load) has SGD momentum of its own: momentum applied twice."""
    own = sorted({group["momentum"] for group in param_groups if group.get("momentum")})
    if beta and own:
        raise ValueError(f"worker_momentum={beta} with the optimizer's own momentum {', '.join(map(str, own))} "
                         f"applies momentum twice (the ranks' and then the optimizer's); give the optimizer "
                         f"momentum 0")


class WorkerMomentum:
    """One rank's momentum buffers, keyed by an integer the caller picks (the optimizer's bucket
    index, the DDP hook's parameter order): ``momentum(flat, index)`` -> what to send."""

    def __init__(self, beta: float, nesterov: bool = False):
        self.beta = check_beta(beta)
        if not isinstance(nesterov, bool):
            raise ValueError(f"worker_nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.beta == 0:
            raise ValueError("worker_nesterov needs worker_momentum > 0")
        self.nesterov = nesterov
        self.buffers: dict[int, torch.Tensor] = {}

    def __call__(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Fold this step's gradient of bucket ``index`` into its buffer and return a copy to send
        (the exchange may write into what it is handed; the buffer stays this rank's own)."""
        if self.beta == 0:
            return flat
        previous = self.buffers.get(index)
        if previous is not None and previous.shape != flat.shape:
            raise ValueError(f"worker_momentum: bucket {index} has {flat.numel()} elements, its buffer "
                             f"{previous.numel()}; the bucket layout must not change during a run")
        if previous is not None and (previous.device != flat.device or previous.dtype != flat.dtype):
            previous = previous.to(device=flat.device, dtype=flat.dtype)
        buffer = flat.clone() if previous is None else previous.mul(self.beta).add_(flat)  # torch SGD's rounding
        if bool(torch.isfinite(buffer).all()):
            self.buffers[index] = buffer.clone()
        return flat.add(buffer, alpha=self.beta) if self.nesterov else buffer

    def state_dict(self) -> dict:
        return {"beta": self.beta, "buffers": {index: b.detach().cpu().clone() for index, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """This rank's buffers from :meth:`state_dict` (moved to the gradients' device when next used)."""
        if float(state["beta"]) != self.beta:
            raise ValueError(f"worker_momentum: the saved buffers are for beta={state['beta']}, this run has "
                             f"beta={self.beta}")
        self.buffers = {int(index): b.clone() for index, b in state["buffers"].items()}

    def reset(self) -> None:
        """Forget the history (a new world: this rank's shard and stream start afresh)."""
        self.buffers = {}
