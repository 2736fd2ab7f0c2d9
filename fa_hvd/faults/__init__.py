"""Fault injection: Byzantine gradients, poisoned data, crashed, hung and slow ranks.

Faults are listed in a config (``faults:``) or in ``FA_HVD_FAULTS`` (see
:mod:`fa_hvd.faults.spec`), each with ``ranks``, ``start_step``, ``stop_step``
(exclusive), ``probability`` and ``params``. All randomness is seeded by
``(seed, rank, step, spec index)``. ``g`` is the flat gradient bucket the rank
would send; ``mu``/``sigma`` the coordinate-wise mean/standard deviation of the
honest ranks' buckets at that step.

Gradient faults (what the faulty rank sends instead of ``g``):

* ``gaussian``  -- N(0, sigma^2) noise replaces g (``sigma``, default 1.0)
* ``uniform``   -- U[0, 1) noise replaces g (the paper's "random")
* ``signflip``  -- -g
* ``reverse``   -- -scale * g (``scale``, default 100)
* ``zero``      -- 0
* ``nan``       -- NaN everywhere
* ``inf``       -- sign * Inf everywhere (``sign`` +1 or -1, default +1)
* ``bitflip``   -- each element, with probability ``rate`` (default 1e-3), gets one
  random bit of its binary representation flipped
* ``alie``      -- mu + sign * z * sigma; z = Phi^-1((n - f - s) / (n - f)), s = floor(n/2) + 1 - f,
  n = world size, f = the spec's number of ranks (or ``params.z``); ``sign`` +1 (default) or -1;
  ``spread`` (default 0): each faulty rank adds its own spread * sigma * N(0, I), so the copies
  do not coincide
* ``ipm``       -- -eps * mu (``eps``, default 0.1)
* ``mimic``     -- a copy of honest rank ``target``'s g (default the lowest rank without
  gradient faults)
* ``minmax``    -- mu + gamma d (Shejwalkar and Houmansadr, NDSS 2021), d = the unit vector of
  -sigma (``direction: std``, default), -mu (``unit``) or -sign(mu) (``sign``); gamma the
  largest for which the row's largest distance to an honest row stays within the largest
  distance between two honest rows (solved exactly)
* ``minsum``    -- the same with the row's summed squared distance to the honest rows within
  the largest such sum of an honest row
* ``tailored``  -- every faulty rank sends the same mu + s sigma_S u found by a black-box search
  that maximises the distance of ``rule``'s aggregate to mu: ``rule`` (required) an aggregator
  name, ``f`` (default: the spec's number of ranks) its parameter, ``count`` (default the same)
  the Byzantine copies assumed, ``directions`` (default 4) random directions added to the
  structured ones; about (8 + directions) x 15 + 12 evaluations of the rule per bucket per step
  (see :func:`fa_hvd.faults.gradient.tailored`)

``alie``, ``ipm``, ``mimic``, ``minmax``, ``minsum`` and ``tailored`` are omniscient: they cost
every rank one extra allgather per bucket per step while scheduled.

Data faults (the whole run; ``probability`` = fraction of samples poisoned):

* ``labelflip``       -- y -> C - 1 - y (``num_classes`` C, required)
* ``lotka_volterra``  -- pixel coordinates flowed by dx/dt = alpha x - beta x y,
  dy/dt = delta x y - gamma y (alpha = 2/3, beta = 4/3, gamma = delta = 1) for
  ``dt * steps`` (defaults 0.1 * 10), image resampled there
* ``catmap``          -- Arnold's cat map (x, y) -> (2x + y, x + y) mod N on N x N
  images, ``iterations`` times (default 1)

Process faults (at the start of a step's first bucket):

* ``crash``  -- print "fa_hvd fault: rank R crashes at step S" to stderr, then
  ``os._exit(exit_code)`` (default 13)
* ``hang``   -- stop answering: sleep forever
* ``slow``   -- sleep ``delay`` seconds (default 0.1) every active step

Role faults (a rank lying in what it reports, relays or says; :mod:`.roles` has each
kind's parameters): ``false_flags``, ``false_claims``, ``gram_scale``, ``gram_perturb``,
``wrong_aggregate``, ``equivocate`` (the sharded exchange's roles: they need
``exchange="sharded"``), ``lie_loss``, ``lie_stop``, ``lie_overflow`` (the per-step
agreement) and ``malformed_message`` (object messages). The README's threat model
says which are tolerated, detected or trusted.
"""

from .data import PoisonedDataset, cat_map, label_flip, lotka_volterra, poison_for_rank
from .gradient import ATTACKS, HonestView
from .injector import FaultInjector
from .roles import ROLE_KINDS, SHARDED_ROLE_KINDS, RoleLies
from .spec import (
    DATA_KINDS,
    GRADIENT_KINDS,
    KINDS,
    OMNISCIENT_KINDS,
    PROCESS_KINDS,
    FaultSpec,
    alie_z,
    allow_exceeding_f_from_env,
    check_faults,
    faults_from_env,
    fault_seed_from_env,
    parse_faults,
)

__all__ = [
    "ATTACKS", "DATA_KINDS", "GRADIENT_KINDS", "KINDS", "OMNISCIENT_KINDS", "PROCESS_KINDS", "ROLE_KINDS",
    "SHARDED_ROLE_KINDS", "FaultInjector", "FaultSpec", "HonestView", "PoisonedDataset", "RoleLies",
    "alie_z", "allow_exceeding_f_from_env", "cat_map", "check_faults", "faults_from_env", "fault_seed_from_env",
    "label_flip", "lotka_volterra", "parse_faults", "poison_for_rank",
]
