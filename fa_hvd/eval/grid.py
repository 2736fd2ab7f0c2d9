"""The evaluation grid: a YAML file of (split x workers x rule x fault x seed), expanded into cells.

A grid file (``configs/eval/standing.yaml`` is the standing one)::

    out: docs/results/standing      # where results go unless --out says otherwise
    trainer:                        # fa-hvd-train's config for every cell (configs/*.yaml keys)
      optim: {lr: 0.1}
      train: {steps: 300}
    seeds: 5                        # 0..4, or a list of run seeds
    splits: {iid: null, dirichlet0.5: 0.5}    # label -> Dirichlet alpha (null: IID)
    workers: [[15, 3], [8, 1]]      # (p, f): world size and Byzantine count
    rules:                          # label -> an aggregator name, or {name, params}
      mean: mean
      flag-ref: {name: flag, params: {mode: reference}}
    faults:                         # label -> a list of fault entries (fa_hvd.faults)
      none: []
      alie-nf: [{kind: alie, params: {sign: -1}}]
    bars: {rule: flag}              # optional: report this rule's bars (see report.py)

A cell's run is ``trainer`` with the cell's ``seed``, ``data.alpha``, ``robust.aggregator``,
``robust.aggregator_params`` (``f`` included) and ``faults`` set; those keys may not appear in
``trainer``. Every rule gets the cell's ``f``; a fault entry without ``ranks`` acts on the cell's
``f`` faulty ranks (the last ``f`` ranks, or the first with ``faulty: first``). Cells
are ordered seed-major (seed, split, workers, fault, rule), so a partial run already
holds whole grids of the first seeds; ``--cell INDEX`` follows this order. A cell's
``key`` names it (``iid/p15f3/flag/alie-nf/s0``); its ``digest`` hashes the run's config,
the engine and the source of the rule's own modules, so a cell whose definition or whose
rule's code changed is run again (not one whose shared code changed: the Gram, the faults,
the trainer's components).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from fa_hvd import config as cfg
from fa_hvd.aggregators import PRE_AGGREGATORS, RULES
from fa_hvd.aggregators import get as get_aggregator
from fa_hvd.faults import parse_faults

ENGINES = ("simulation", "distributed")


@dataclass
class Bars:
    """The bars one rule is held to (report.py checks them per split and (p, f))."""

    rule: str
    clean_fault: str = "none"
    clean_rule: str = "mean"
    control: str = "nmean"
    tolerance: float = 0.01


SET_BY_GRID = {"seed": None, "faults": None, "robust": ("aggregator", "aggregator_params"), "data": ("alpha",)}
"""Trainer keys each cell sets (a whole section: None; else the section's keys)."""


@dataclass
class GridConfig:
    trainer: dict = field(default_factory=dict)
    seeds: object = 5
    splits: dict = field(default_factory=lambda: {"iid": None})
    workers: list = field(default_factory=lambda: [[15, 3]])
    rules: dict = field(default_factory=dict)
    faults: dict = field(default_factory=lambda: {"none": []})
    faulty: Literal["last", "first"] = "last"
    broken_below: float = 0.5
    bars: Optional[Bars] = None
    out: Optional[str] = None


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    index: int
    split: str
    alpha: Optional[float]
    p: int
    f: int
    rule: str
    aggregator: str
    params: tuple  # sorted (key, value) pairs, f included
    fault: str
    faults: tuple  # the fault entries as canonical JSON strings, ranks filled in
    seed: int
    trainer: str  # the grid's trainer mapping as canonical JSON

    @property
    def key(self) -> str:
        return f"{self.split}/p{self.p}f{self.f}/{self.rule}/{self.fault}/s{self.seed}"

    @property
    def aggregator_params(self) -> dict:
        return dict(self.params)

    @property
    def fault_entries(self) -> list[dict]:
        return [json.loads(entry) for entry in self.faults]

    def run_config(self) -> dict:
        """The trainer config of this cell's run (what ``fa-hvd-train --config`` reads)."""
        conf = json.loads(self.trainer)
        conf["seed"] = self.seed
        conf["data"] = {**conf.get("data", {}), "alpha": self.alpha}
        conf["robust"] = {**conf.get("robust", {}), "aggregator": self.aggregator,
                          "aggregator_params": self.aggregator_params}
        conf["faults"] = self.fault_entries
        return conf

    def digest(self, engine: str) -> str:
        """A hash of this cell's config, ``engine`` and its rule's own source (module docstring: not the shared code)."""
        content = {"engine": engine, "p": self.p, "config": self.run_config(), "code": rule_code(self.aggregator)}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.split} p={self.p} f={self.f} {self.rule} {self.fault} seed {self.seed}"


@functools.lru_cache(maxsize=None)
def rule_code(name: str) -> str:
    """A hash of the source of the modules that implement aggregator ``name`` (its stages too)."""
    digest = hashlib.sha256()
    for part in name.split("+"):
        cls = RULES.get(part.strip().lower()) or PRE_AGGREGATORS.get(part.strip().lower())
        path = inspect.getsourcefile(cls) if cls is not None else None
        digest.update(Path(path).read_bytes() if path else part.encode())
    return digest.hexdigest()[:16]


@dataclass
class Grid:
    path: Path
    config: GridConfig
    cells: list[Cell]

    @property
    def name(self) -> str:
        return self.path.stem


def load_grid(path: str | Path) -> Grid:
    """Read, validate and expand a grid file; a bad value raises ``ConfigError`` naming the key."""
    path = Path(path)
    conf = cfg.load(GridConfig, path)
    seeds = _seeds(conf.seeds)
    splits = _splits(conf.splits)
    workers = _workers(conf.workers)
    rules = _rules(conf.rules)
    faults = _faults(conf.faults)
    trainer = _trainer(conf.trainer)
    if not 0 <= conf.broken_below <= 1:
        raise cfg.ConfigError(f"broken_below: expected a fraction in [0, 1], got {conf.broken_below}")
    if conf.bars is not None:
        _check_bars(conf.bars, rules, faults)
    cells = []
    for seed in seeds:
        for split, alpha in splits.items():
            for p, f in workers:
                faulty = list(range(p - f, p)) if conf.faulty == "last" else list(range(f))
                built = {label: _build_rule(label, name, params, p, f) for label, (name, params) in rules.items()}
                for fault, entries in faults.items():
                    resolved = _resolve_faults(fault, entries, faulty, p, f)
                    for rule, (name, params) in built.items():
                        cells.append(Cell(len(cells), split, alpha, p, f, rule, name, params, fault, resolved,
                                          seed, trainer))
    _check_trainer(cells[0])
    return Grid(path, conf, cells)


def _check_trainer(cell: Cell) -> None:
    """The trainer's own validation of a cell's config: a bad ``trainer`` key is named here."""
    from fa_hvd.train import config as train_config

    try:
        train_config.parse(cell.run_config())
    except cfg.ConfigError as exc:
        raise cfg.ConfigError(f"trainer.{exc}") from None


def _trainer(trainer: dict) -> str:
    for key, keys in SET_BY_GRID.items():
        if key in trainer and (keys is None or not isinstance(trainer[key], dict)):
            raise cfg.ConfigError(f"trainer.{key}: set by the grid for each cell; remove it")
        for sub in keys or ():
            if sub in trainer.get(key, {}):
                raise cfg.ConfigError(f"trainer.{key}.{sub}: set by the grid for each cell; remove it")
    return json.dumps(trainer, sort_keys=True)


def _seeds(seeds) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
        return list(range(seeds))
    if isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                 for s in seeds) and len(set(seeds)) == len(seeds):
        return seeds
    raise cfg.ConfigError(f"seeds: expected a count >= 1 or a list of distinct integers >= 0, got {seeds!r}")


def _label(where: str, label) -> str:
    if not isinstance(label, str) or not label or any(c in label for c in "/ \t\n"):
        raise cfg.ConfigError(f"{where}: labels must be non-empty strings without '/' or spaces, got {label!r}")
    return label


def _splits(splits: dict) -> dict:
    if not splits:
        raise cfg.ConfigError("splits: expected at least one split (label: alpha, null for IID)")
    out = {}
    for label, alpha in splits.items():
        _label("splits", label)
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
            raise cfg.ConfigError(f"splits.{label}: expected null (IID) or a Dirichlet alpha > 0, got {alpha!r}")
        out[label] = None if alpha is None else float(alpha)
    return out


def _workers(workers: list) -> list[tuple[int, int]]:
    if not workers:
        raise cfg.ConfigError("workers: expected at least one [p, f] pair")
    out = []
    for i, pair in enumerate(workers):
        ok = (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in pair))
        if not ok or not pair[0] >= 1 or not 0 <= pair[1] < pair[0]:
            raise cfg.ConfigError(f"workers[{i}]: expected [p, f] with p >= 1 and 0 <= f < p, got {pair!r}")
        out.append((pair[0], pair[1]))
    return out


def _rules(rules: dict) -> dict[str, tuple[str, dict]]:
    if not rules:
        raise cfg.ConfigError("rules: expected at least one rule (label: name or {name, params})")
    out = {}
    for label, spec in rules.items():
        _label("rules", label)
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or set(spec) - {"name", "params"}:
            raise cfg.ConfigError(f"rules.{label}: expected an aggregator name or {{name, params}}, got {spec!r}")
        params = spec.get("params") or {}
        if not isinstance(params, dict) or "f" in params:
            raise cfg.ConfigError(f"rules.{label}.params: expected a mapping without f (f comes from workers), "
                                  f"got {params!r}")
        out[label] = (spec["name"], params)
    return out


def _faults(faults: dict) -> dict[str, list]:
    if not faults:
        raise cfg.ConfigError("faults: expected at least one entry (label: list of faults; none: [])")
    out = {}
    for label, entries in faults.items():
        _label("faults", label)
        entries = [] if entries is None else entries
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise cfg.ConfigError(f"faults.{label}: expected a list of fault mappings, got {entries!r}")
        out[label] = entries
    return out


def _build_rule(label: str, name: str, params: dict, p: int, f: int) -> tuple[str, tuple]:
    full = {**params, "f": f}
    try:
        get_aggregator(name, **full).check(p)
    except ValueError as exc:
        raise cfg.ConfigError(f"rules.{label} at p={p}, f={f}: {exc}") from None
    return name, tuple(sorted(full.items()))


def _resolve_faults(label: str, entries: list, faulty: list[int], p: int, f: int) -> tuple:
    resolved = [{**entry, "ranks": entry.get("ranks", faulty)} for entry in entries]
    try:
        parse_faults(resolved, p, f=f)
    except ValueError as exc:
        raise cfg.ConfigError(f"faults.{label} at p={p}, f={f}: {exc}") from None
    return tuple(json.dumps(entry, sort_keys=True) for entry in resolved)


def _check_bars(bars: Bars, rules: dict, faults: dict) -> None:
    for key in ("rule", "clean_rule", "control"):
        if getattr(bars, key) not in rules:
            raise cfg.ConfigError(f"bars.{key}: {getattr(bars, key)!r} is not a label in rules")
    if bars.clean_fault not in faults:
        raise cfg.ConfigError(f"bars.clean_fault: {bars.clean_fault!r} is not a label in faults")
    if not bars.tolerance >= 0:
        raise cfg.ConfigError(f"bars.tolerance: expected a number >= 0, got {bars.tolerance}")

