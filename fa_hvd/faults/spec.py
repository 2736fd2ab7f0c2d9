"""Fault specifications: the ``faults:`` list of a config, parsed and validated.

One entry (YAML)::

    - kind: alie            # see fa_hvd.faults for every kind and its formula
      ranks: [0, 1, 2]      # an int or a list of ints in [0, world_size); or instead
      hosts: [gpu-07]       # every rank on these hosts (fa-hvd-train: as robust.evict names them)
      start_step: 0         # first optimizer step it is active (default 0)
      stop_step: null       # first step it is no longer active (exclusive; null = forever)
      probability: 1.0      # chance that it fires at an active step (seeded per rank and step)
      params: {z: 1.0}      # kind-specific, see PARAMS

A fault on ``hosts`` follows the machine, not the rank number: in each world (elastic mode
numbers its ranks anew) it acts on the ranks that world has on those hosts, none once they
are gone. Data faults act on the whole run: they reject ``start_step``/``stop_step``,
and their ``probability`` is the fraction of samples poisoned (seeded per sample).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, NamedTuple

import yaml

from .roles import ROLE_KINDS, ROLE_PARAMS

GRADIENT_KINDS = ("gaussian", "uniform", "signflip", "reverse", "zero", "nan", "inf", "bitflip",
                  "alie", "ipm", "mimic", "minmax", "minsum", "tailored")
OMNISCIENT_KINDS = ("alie", "ipm", "mimic", "minmax", "minsum", "tailored")
DATA_KINDS = ("labelflip", "lotka_volterra", "catmap")
PROCESS_KINDS = ("crash", "hang", "slow")
KINDS = GRADIENT_KINDS + DATA_KINDS + PROCESS_KINDS + ROLE_KINDS

_ENTRY_KEYS = ("kind", "ranks", "hosts", "start_step", "stop_step", "probability", "params")
_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


class Param(NamedTuple):
    default: Any
    check: Callable[[Any], bool]
    requirement: str


_POSITIVE = (lambda v: _is_real(v) and v > 0, "a number > 0")
_DIRECTION = Param("std", lambda v: v in ("std", "unit", "sign"), "'std', 'unit' or 'sign'")


def _rule_name(v) -> bool:
    from fa_hvd.aggregators import get

    try:
        get(v)
    except ValueError:
        return False
    return True


def _int_at_least(k: int):
    return lambda v: _is_int(v) and v >= k, f"an integer >= {k}"


PARAMS: dict[str, dict[str, Param]] = {
    "gaussian": {"sigma": Param(1.0, *_POSITIVE)},
    "uniform": {},
    "signflip": {},
    "reverse": {"scale": Param(100.0, *_POSITIVE)},
    "zero": {},
    "nan": {},
    "inf": {"sign": Param(1, lambda v: _is_int(v) and v in (1, -1), "+1 or -1")},
    "bitflip": {"rate": Param(1e-3, lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]")},
    "alie": {"z": Param(None, lambda v: v is None or _is_real(v), "a finite number"),
             "sign": Param(1, lambda v: _is_int(v) and v in (1, -1), "+1 or -1"),
             "spread": Param(0.0, lambda v: _is_real(v) and v >= 0, "a number >= 0")},
    "ipm": {"eps": Param(0.1, *_POSITIVE)},
    "mimic": {"target": Param(None, lambda v: v is None or _is_int(v), "an integer rank")},
    "minmax": {"direction": _DIRECTION},
    "minsum": {"direction": _DIRECTION},
    "tailored": {"rule": Param(_REQUIRED, lambda v: isinstance(v, str) and _rule_name(v),
                               "an aggregator name (fa_hvd.aggregators.get)"),
                 "f": Param(None, lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0"),
                 "count": Param(None, lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
                 "directions": Param(4, *_int_at_least(0))},
    "labelflip": {"num_classes": Param(_REQUIRED, *_int_at_least(2))},
    "lotka_volterra": {"dt": Param(0.1, *_POSITIVE), "steps": Param(10, *_int_at_least(1))},
    "catmap": {"iterations": Param(1, *_int_at_least(1))},
    "crash": {"exit_code": Param(13, lambda v: _is_int(v) and 0 <= v <= 255, "an integer in [0, 255]")},
    "hang": {},
    "slow": {"delay": Param(0.1, *_POSITIVE)},
    **{kind: {name: Param(*p) for name, p in params.items()} for kind, params in ROLE_PARAMS.items()},
}


@dataclasses.dataclass
class FaultSpec:
    """One fault: ``kind`` on ``ranks`` at steps [start_step, stop_step), each with ``probability``."""

    kind: str
    ranks: list[int]
    start_step: int = 0
    stop_step: int | None = None
    probability: float = 1.0
    params: dict = dataclasses.field(default_factory=dict)
    hosts: list[str] | None = None  # given as hosts: ``ranks`` are this world's ranks on them

    @property
    def category(self) -> str:
        """``"gradient"``, ``"data"``, ``"process"`` or ``"role"`` (:mod:`.roles`)."""
        if self.kind in GRADIENT_KINDS:
            return "gradient"
        if self.kind in ROLE_KINDS:
            return "role"
        return "data" if self.kind in DATA_KINDS else "process"

    @property
    def omniscient(self) -> bool:
        return self.kind in OMNISCIENT_KINDS

    def in_window(self, step: int) -> bool:
        return self.start_step <= step and (self.stop_step is None or step < self.stop_step)

    def describe(self) -> str:
        stop = "inf" if self.stop_step is None else self.stop_step
        params = f" {self.params}" if self.params else ""
        return f"{self.kind}{params} at steps [{self.start_step}, {stop}) with probability {self.probability}"


def parse_faults(entries, world_size: int, f: int | None = None,
                 allow_exceeding_f: bool = False, rank_hosts: list[str] | None = None) -> list[FaultSpec]:
    """Validate the raw ``faults`` list and return specs with every default filled in.

    Raises ``ValueError`` naming the entry at fault. ALIE's ``z`` and mimic's
    ``target`` are resolved here (they depend on the world). More distinct ranks
    with gradient, data or role faults than ``f`` is an error, or a warning with
    ``allow_exceeding_f``. ``rank_hosts[r]`` is rank ``r``'s host, for the entries
    given by ``hosts`` (``[]`` before the ranks met: they are checked and act on no rank);
    ``None`` (a caller that does not know the hosts) refuses such entries.
    """
    if entries is None:
        return []
    specs = _parse_entries(entries, world_size, rank_hosts)
    specs = [_resolve(i, spec, specs, world_size) for i, spec in enumerate(specs)]
    _check_f(specs, f, allow_exceeding_f)
    return specs


def check_faults(entries, f: int | None = None, allow_exceeding_f: bool = False) -> None:
    """What :func:`parse_faults` checks before the world size is known: each entry's kind,
    keys, params and schedule, its ranks as integers >= 0, and the count against ``f`` (with
    ``allow_exceeding_f`` that count is left to :func:`parse_faults`, which warns).

    For a caller that must refuse bad faults before the ranks meet (``fa_hvd.wrap``).
    """
    specs = _parse_entries(entries, None, None)
    if not allow_exceeding_f:
        _check_f(specs, f, allow_exceeding_f=False)


def _parse_entries(entries, world_size: int | None, rank_hosts: list[str] | None) -> list[FaultSpec]:
    if not isinstance(entries, list):
        raise ValueError(f"faults must be a list of mappings, got {type(entries).__name__}")
    return [_parse_entry(i, entry, world_size, rank_hosts) for i, entry in enumerate(entries)]


def _parse_entry(i: int, entry, world_size: int | None, rank_hosts: list[str] | None) -> FaultSpec:
    where = f"faults[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a mapping with a 'kind', got {entry!r}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    where = f"{where} (kind {kind!r})"
    unknown = sorted(set(entry) - set(_ENTRY_KEYS), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(_ENTRY_KEYS)}")
    hosts = None
    if "hosts" in entry:
        if "ranks" in entry:
            raise ValueError(f"{where}: give 'ranks' or 'hosts', not both")
        if rank_hosts is None:
            raise ValueError(f"{where}: 'hosts' needs fa-hvd-train, which knows every rank's host; give 'ranks' here")
        hosts = _parse_hosts(where, entry["hosts"])
        ranks = [r for r, host in enumerate(rank_hosts) if host in hosts]
    else:
        ranks = _parse_ranks(where, entry.get("ranks"), world_size)
    spec = FaultSpec(
        kind=kind,
        ranks=ranks,
        hosts=hosts,
        start_step=entry.get("start_step", 0),
        stop_step=entry.get("stop_step"),
        probability=entry.get("probability", 1.0),
        params=_parse_params(where, kind, entry.get("params")),
    )
    _check_schedule(where, spec)
    return spec


def rank_list(ranks):
    """A fault entry's ``ranks`` as a list: ``ranks: 3`` is short for ``ranks: [3]``; anything else as given."""
    return [ranks] if _is_int(ranks) else ranks


def _parse_ranks(where: str, ranks, world_size: int | None) -> list[int]:
    ranks = rank_list(ranks)
    if not isinstance(ranks, list) or not ranks or not all(_is_int(r) for r in ranks):
        raise ValueError(f"{where}: 'ranks' must be an integer or a non-empty list of integers, got {ranks!r}")
    for r in ranks:
        if r < 0:
            raise ValueError(f"{where}: rank {r} is negative")
        if world_size is not None and r >= world_size:
            raise ValueError(f"{where}: rank {r} is outside the world of {world_size} ranks")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"{where}: 'ranks' lists a rank twice: {ranks}")
    return sorted(ranks)


def _parse_hosts(where: str, hosts) -> list[str]:
    hosts = [hosts] if isinstance(hosts, str) else hosts
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ValueError(f"{where}: 'hosts' must be a host name or a non-empty list of host names, got {hosts!r}")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"{where}: 'hosts' lists a host twice: {hosts}")
    return hosts


def _parse_params(where: str, kind: str, params) -> dict:
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ValueError(f"{where}: 'params' must be a mapping, got {params!r}")
    schema = PARAMS[kind]
    unknown = sorted(set(params) - set(schema), key=str)
    if unknown:
        allowed = ", ".join(schema) or "none"
        raise ValueError(f"{where}: unknown param(s) {unknown}; allowed: {allowed}")
    resolved = {}
    for name, param in schema.items():
        value = params.get(name, param.default)
        if value is _REQUIRED:
            raise ValueError(f"{where}: params.{name} is required ({param.requirement})")
        if not param.check(value):
            raise ValueError(f"{where}: params.{name} must be {param.requirement}, got {value!r}")
        resolved[name] = value
    return resolved


def _check_schedule(where: str, spec: FaultSpec) -> None:
    if not _is_int(spec.start_step) or spec.start_step < 0:
        raise ValueError(f"{where}: start_step must be an integer >= 0, got {spec.start_step!r}")
    if spec.stop_step is not None and (not _is_int(spec.stop_step) or spec.stop_step <= spec.start_step):
        raise ValueError(f"{where}: stop_step must be null or an integer > start_step "
                         f"({spec.start_step}), got {spec.stop_step!r}")
    if not _is_real(spec.probability) or not 0 <= spec.probability <= 1:
        raise ValueError(f"{where}: probability must be a number in [0, 1], got {spec.probability!r}")
    if spec.category == "data" and (spec.start_step != 0 or spec.stop_step is not None):
        raise ValueError(f"{where}: data faults poison the dataset for the whole run; "
                         f"start_step/stop_step do not apply (probability is the fraction of samples poisoned)")


def _resolve(i: int, spec: FaultSpec, specs: list[FaultSpec], world_size: int) -> FaultSpec:
    """Fill in what depends on the world: ALIE's z, mimic's target, the tailored search's ``f`` and ``count``."""
    if not spec.omniscient or not spec.ranks:
        return spec
    where = f"faults[{i}] (kind {spec.kind!r})"
    faulty = {r for s in specs if s.category == "gradient" for r in s.ranks}
    always_honest = sorted(set(range(world_size)) - faulty)
    if not always_honest:
        raise ValueError(f"{where}: an omniscient attack needs at least one rank without gradient faults")
    params = dict(spec.params)
    if spec.kind == "alie" and params["z"] is None:
        params["z"] = alie_z(world_size, len(spec.ranks), where)
    if spec.kind == "tailored":
        params["count"] = len(spec.ranks) if params["count"] is None else params["count"]
        params["f"] = params["count"] if params["f"] is None else params["f"]
    if spec.kind == "mimic":
        target = params["target"]
        if target is None:
            params["target"] = always_honest[0]
        elif target not in always_honest:
            raise ValueError(f"{where}: params.target {target} must be a rank in the world without gradient "
                             f"faults; candidates: {always_honest}")
    return dataclasses.replace(spec, params=params)


def alie_z(n: int, f: int, where: str = "alie") -> float:
    """ALIE's z: s = floor(n/2) + 1 - f, z = Phi^-1((n - f - s) / (n - f))."""
    s = n // 2 + 1 - f
    q = (n - f - s) / (n - f) if n > f else math.nan
    if not 0 < q < 1:
        raise ValueError(f"{where}: cannot derive ALIE's z for n={n} ranks and f={f} attackers "
                         f"((n - f - s)/(n - f) = {q} is not in (0, 1)); give params.z")
    return NormalDist().inv_cdf(q)


def _check_f(specs: list[FaultSpec], f: int | None, allow_exceeding_f: bool) -> None:
    byzantine = sorted({r for s in specs if s.category != "process" for r in s.ranks})
    if f is None or len(byzantine) <= f:
        return
    message = (f"faults make {len(byzantine)} ranks Byzantine {byzantine} (gradient, data or role faults) "
               f"but the aggregator tolerates f={f}")
    if not allow_exceeding_f:
        raise ValueError(f"{message}; set allow_exceeding_f (FA_HVD_ALLOW_EXCEEDING_F=1) to run anyway")
    warnings.warn(f"{message}; running anyway (allow_exceeding_f)", stacklevel=2)


def faults_from_env(environ=os.environ) -> list:
    """The raw ``faults`` entries from ``FA_HVD_FAULTS`` ([] when unset).

    The variable holds a YAML (or JSON) list, or ``@path`` to a YAML file that
    holds the list or a mapping with a ``faults:`` key (a whole config file).
    Validate the result with :func:`parse_faults` once the world size is known.
    """
    text = environ.get("FA_HVD_FAULTS", "").strip()
    if not text:
        return []
    source = "FA_HVD_FAULTS"
    if text.startswith("@"):
        source = f"FA_HVD_FAULTS file {text[1:]}"
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise ValueError(f"{source}: cannot read it: {exc}") from exc
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from exc
    if isinstance(entries, dict) and "faults" in entries:
        entries = entries["faults"]
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{source}: must hold a list of faults, got {type(entries).__name__}")
    return entries


def allow_exceeding_f_from_env(environ=os.environ) -> bool:
    """``FA_HVD_ALLOW_EXCEEDING_F``: 1/true/yes/on or 0/false/no/off (default off)."""
    value = environ.get("FA_HVD_ALLOW_EXCEEDING_F", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"FA_HVD_ALLOW_EXCEEDING_F must be 1/true or 0/false, got {value!r}")


def fault_seed_from_env(environ=os.environ) -> int:
    """``FA_HVD_FAULT_SEED``: an integer (default 0), the seed of the faults' randomness."""
    value = environ.get("FA_HVD_FAULT_SEED", "").strip() or "0"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"FA_HVD_FAULT_SEED must be an integer, got {value!r}") from None
