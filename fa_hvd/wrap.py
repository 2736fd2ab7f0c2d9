"""Run an unchanged Horovod script with fa_hvd's robust aggregation.

    horovodrun -np 4 python -m fa_hvd.wrap [--aggregator NAME] [--f F]
        [--param key=value ...] [--transport horovod|mpi] [--worker-momentum BETA] script.py [script args]

Before the script runs, ``horovod.torch.DistributedOptimizer`` becomes
:func:`fa_hvd.DistributedOptimizer` with the chosen aggregator (and
``broadcast_optimizer_state`` the fa_hvd one, which also broadcasts the aggregator's
state; Horovod's state-initialising zero step makes no gradient exchange and does
not count as a step). Every choice can come from the
environment instead, which is how a batch system passes it:

* ``FA_HVD_AGGREGATOR`` (default ``flag``), ``FA_HVD_F`` (default 0),
  ``FA_HVD_PARAMS`` (``key=value,key=value``), ``FA_HVD_TRANSPORT``;
* ``FA_HVD_WORKER_MOMENTUM`` (default 0): each rank sends its momentum ``m_t = beta m_(t-1) + g_t``
  (:mod:`fa_hvd.worker_momentum`); the script's optimizer keeps no momentum of its own: an SGD
  momentum it sets is set to 0 in every parameter group, and rank 0 says so; a Nesterov SGD's
  Nesterov moves to the workers (they send ``g_t + beta m_t``); an SGD with dampening is refused
  (worker momentum has none);
* ``FA_HVD_FAULTS`` (a YAML list of faults, or ``@file.yaml``), ``FA_HVD_FAULT_SEED``
  and ``FA_HVD_ALLOW_EXCEEDING_F``: fault injection (:mod:`fa_hvd.faults`): gradient
  and process faults. Data faults (labelflip, lotka_volterra, catmap) are refused
  before the script starts: an unchanged script's training data cannot be told
  from its test data, and poisoning the wrong one would be worse than none.

Command-line options win over the environment.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import runpy
import sys

from .aggregators import get as get_aggregator
from .config import parse_key_values, parse_value
from .worker_momentum import check_beta

PROG = "python -m fa_hvd.wrap"
TRANSPORTS = ("horovod", "mpi")


def parse_args(argv, environ=os.environ):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Environment: FA_HVD_AGGREGATOR, FA_HVD_F, FA_HVD_PARAMS, FA_HVD_TRANSPORT, "
               "FA_HVD_WORKER_MOMENTUM, FA_HVD_FAULTS, FA_HVD_FAULT_SEED, FA_HVD_ALLOW_EXCEEDING_F.",
    )
    parser.add_argument("--aggregator", default=environ.get("FA_HVD_AGGREGATOR", "flag"))
    parser.add_argument("--f", type=int, default=None, help="Byzantine workers tolerated")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="an aggregator parameter (repeatable), e.g. --param r=8")
    parser.add_argument("--transport", default=environ.get("FA_HVD_TRANSPORT", "horovod"), choices=TRANSPORTS)
    parser.add_argument("--worker-momentum", type=float, metavar="BETA",
                        default=environ.get("FA_HVD_WORKER_MOMENTUM", "0"),
                        help="each rank sends its momentum with this beta (0 <= beta < 1; default 0: its "
                             "gradient); the script's SGD momentum is set to 0 (another optimizer's momentum "
                             "is refused)")
    parser.add_argument("script", help="the Horovod training script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    args = parser.parse_args(argv)
    if args.transport not in TRANSPORTS:  # argparse does not check a default, here FA_HVD_TRANSPORT's
        parser.error(f"FA_HVD_TRANSPORT: expected one of {', '.join(TRANSPORTS)}, got {args.transport!r}")
    env_params = [p for p in environ.get("FA_HVD_PARAMS", "").split(",") if p.strip()]
    try:
        params = {**parse_key_values(env_params, "FA_HVD_PARAMS"), **parse_key_values(args.param, "--param")}
        f = args.f if args.f is not None else environ.get("FA_HVD_F")
        if f is not None:
            params["f"] = parse_value(str(f))
        get_aggregator(args.aggregator, **params)  # fail here, not inside the script
        check_beta(args.worker_momentum)
        _check_faults(environ, params.get("f"))
    except ValueError as exc:
        parser.error(str(exc))
    return args, params


def _check_faults(environ, f) -> None:
    """Refuse bad ``FA_HVD_*`` fault settings before the script runs; the ranks' range is checked
    once the world size is known (:func:`_fault_transform`)."""
    from .faults import DATA_KINDS, allow_exceeding_f_from_env, check_faults, fault_seed_from_env, faults_from_env

    entries, allow_exceeding_f = faults_from_env(environ), allow_exceeding_f_from_env(environ)
    try:
        check_faults(entries, f, allow_exceeding_f)
    except ValueError as exc:
        raise ValueError(f"FA_HVD_FAULTS: {exc}") from None
    fault_seed_from_env(environ)
    kinds = sorted({entry["kind"] for entry in entries} & set(DATA_KINDS))
    if kinds:
        raise ValueError(
            f"FA_HVD_FAULTS: data fault(s) {', '.join(kinds)} cannot be applied to an unchanged script "
            f"(its training data cannot be told from its test data); poison the training set in the script "
            f"with fa_hvd.faults.poison_for_rank, or run fa-hvd-train with the faults in its config")


def robust_optimizer(aggregator: str, params: dict, transport: str, worker_momentum: float = 0.0,
                     environ=os.environ):
    """``hvd.DistributedOptimizer``'s replacement, with faults from the environment; with
    ``worker_momentum`` the wrapped optimizer's own SGD momentum is set to 0."""
    from . import optimizer as fa_optimizer
    from .comm import get_transport

    signature = inspect.signature(fa_optimizer.DistributedOptimizer)

    @functools.wraps(fa_optimizer.DistributedOptimizer)
    def DistributedOptimizer(optimizer, *args, **kwargs):
        kwargs = signature.bind(optimizer, *args, **kwargs).arguments  # Horovod's positional order too
        kwargs.setdefault("aggregator", aggregator)
        kwargs.setdefault("aggregator_params", dict(params))
        link = get_transport(transport, kwargs.pop("process_set", None))
        kwargs["transport"] = link
        if link.included:
            kwargs.setdefault("gradient_transform", _fault_transform(link, kwargs["aggregator_params"], environ))
        moved, nesterov = [], False
        if worker_momentum:
            moved, nesterov = _move_momentum(optimizer)
            kwargs.setdefault("worker_momentum", worker_momentum)
            kwargs.setdefault("worker_nesterov", nesterov)
        if link.rank == 0:
            print(f"fa_hvd.wrap: hvd.DistributedOptimizer -> fa_hvd ({aggregator}, {params}) "
                  f"on {link.size} ranks" + (f", worker momentum {worker_momentum}" if worker_momentum else "")
                  + (" (Nesterov)" if nesterov else "")
                  + (f" (the script's SGD momentum {', '.join(map(str, sorted(set(moved))))} set to 0)"
                     if moved else ""), file=sys.stderr, flush=True)
        robust = fa_optimizer.DistributedOptimizer(**kwargs)
        if link.included and environ.get("HOROVOD_ELASTIC") != "1":  # collective, as the optimizer's model check
            link.start_roll_call()  # a stalled exchange names the ranks that do not answer
        return robust

    return DistributedOptimizer


def _move_momentum(optimizer) -> tuple[list[float], bool]:
    """Set the SGD momentum of ``optimizer``'s parameter groups to 0 (worker momentum replaces it);
    returns the momenta it had and whether they were Nesterov's. Nesterov goes to the workers, so
    the groups must agree on it; dampening, which worker momentum does not have, is refused, and so is
    another optimizer's momentum (RMSprop's acts on its scaled step: moving it would change the method)."""
    import torch

    groups = [group for group in optimizer.param_groups if group.get("momentum")]
    if groups and not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"fa_hvd.wrap: --worker-momentum moves an SGD's momentum to the ranks; the script's "
                         f"{type(optimizer).__name__} has momentum {groups[0]['momentum']} of its own, which acts "
                         f"on its own step and cannot move: set it to 0, or leave out --worker-momentum")
    if any(group.get("dampening") for group in groups):
        raise ValueError("fa_hvd.wrap: --worker-momentum with an SGD dampening: worker momentum has no "
                         "dampening; set the script's dampening to 0")
    if len({bool(group.get("nesterov")) for group in groups}) > 1:
        raise ValueError("fa_hvd.wrap: --worker-momentum: the script's parameter groups differ in nesterov, and "
                         "the workers' momentum is one")
    moved, nesterov = [group["momentum"] for group in groups], any(group.get("nesterov") for group in groups)
    for group in groups:
        group["momentum"], group["nesterov"] = 0.0, False
    return moved, nesterov


def _fault_transform(transport, aggregator_params: dict, environ):
    from .faults import FaultInjector, allow_exceeding_f_from_env, fault_seed_from_env, faults_from_env, parse_faults

    entries = faults_from_env(environ)
    if not entries:
        return None
    specs = parse_faults(entries, transport.size, f=aggregator_params.get("f"),
                         allow_exceeding_f=allow_exceeding_f_from_env(environ))
    return FaultInjector(specs, transport.rank, transport.size, seed=fault_seed_from_env(environ),
                         transport=transport).gradient_transform


def main(argv=None) -> None:
    args, params = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isfile(args.script):
        print(f"{PROG}: error: script not found: {args.script}", file=sys.stderr)
        raise SystemExit(2)
    import horovod.torch as hvd

    from . import broadcast_optimizer_state

    hvd.DistributedOptimizer = robust_optimizer(args.aggregator, params, args.transport, args.worker_momentum)
    hvd.broadcast_optimizer_state = broadcast_optimizer_state
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
