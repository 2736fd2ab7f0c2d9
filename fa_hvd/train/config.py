"""The trainer's configuration: typed sections, validated on load, hashed for resume.

A config is a YAML mapping with the sections below (every key optional; the
defaults are the dataclass fields). ``--set a.b=c`` overrides any key. A bad key
or value raises one :class:`~fa_hvd.config.ConfigError` naming the key and what
is allowed. Checks that need the world size (the aggregator's precondition,
faults on ranks outside the world, shards) happen after the ranks start, before
any of them trains.

``identity(conf)`` is what a checkpoint must match to be resumed: the whole
config except ``checkpoint`` and ``log`` (where and how often to save and print
changes nothing in the numbers) and ``robust.digest`` (a check, not arithmetic: a
run may resume with it turned on or off, and checkpoints written before it
existed still resume).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from fa_hvd import config as cfg
from fa_hvd.aggregators import get as get_aggregator
from fa_hvd.faults import parse_faults
from fa_hvd.faults.roles import SHARDED_ROLE_KINDS
from fa_hvd.train import trust
from fa_hvd.worker_momentum import check_beta

DATA_SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "dir")
BOOKKEEPING_SECTIONS = ("checkpoint", "log")
CHECK_WORLD = 1024  # at least this world size when faults are checked before the ranks start


def _positive(name: str, value, integer: bool = False) -> None:
    if value is None:
        return
    ok = value >= 1 if integer else (math.isfinite(value) and value > 0)
    if not ok:
        raise cfg.ConfigError(f"{name}: must be {'an integer >= 1' if integer else 'a number > 0'}, got {value!r}")


@dataclass
class SyntheticConfig:
    """Random inputs labelled by a fixed random linear teacher (learnable), for benchmarks."""

    train_size: int = 4096
    test_size: int = 1024
    shape: list = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10

    def validate(self) -> None:
        _positive("data.synthetic.train_size", self.train_size, integer=True)
        _positive("data.synthetic.test_size", self.test_size, integer=True)
        if not self.shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.shape):
            raise cfg.ConfigError(f"data.synthetic.shape: must be a non-empty list of integers >= 1, "
                                  f"got {self.shape!r}")
        if self.num_classes < 2:
            raise cfg.ConfigError(f"data.synthetic.num_classes: must be >= 2, got {self.num_classes}")


@dataclass
class DataConfig:
    """Where the samples come from and how each rank's shard is drawn."""

    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic",
                  "dir"] = "digits"
    dir: Optional[str] = None          # local files for mnist, fashion_mnist, cifar*, imagefolder, dir
    alpha: Optional[float] = None      # Dirichlet non-IID over labels; null = IID
    augment: Literal["none", "crop_flip"] = "none"
    normalize: bool = True             # per-channel mean/std of the known data sets
    verify: bool = True                # CIFAR: check torchvision's MD5 sums of the batch files
    image_size: int = 64               # imagefolder: images resized to image_size x image_size
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        if self.name not in ("digits", "synthetic") and not self.dir:
            raise cfg.ConfigError(f"data.dir: data set {self.name!r} reads local files; set data.dir "
                             f"(nothing is downloaded)")
        _positive("data.alpha", self.alpha)
        _positive("data.image_size", self.image_size, integer=True)


@dataclass
class ModelConfig:
    """``mlp``, ``cnn``, ``resnet18`` (CIFAR-style, 32x32) or ``torchvision:NAME``."""

    name: str = "mlp"
    hidden: int = 64                   # mlp
    dropout: float = 0.0               # mlp
    width: int = 16                    # cnn

    def validate(self) -> None:
        from fa_hvd.train.models import check_name

        try:
            check_name(self.name)
        except ValueError as exc:
            raise cfg.ConfigError(f"model.name: {exc}") from None
        _positive("model.hidden", self.hidden, integer=True)
        _positive("model.width", self.width, integer=True)
        if not 0 <= self.dropout < 1:
            raise cfg.ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9              # sgd
    nesterov: bool = False             # sgd; with robust.worker_momentum the workers send Nesterov's momentum
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8                  # adam, adamw
    grad_clip: Optional[float] = None  # max L2 norm of the aggregated gradient
    backward_passes_per_step: int = 1  # local gradient accumulation, as in Horovod

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise cfg.ConfigError(f"optim.momentum: must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.name != "sgd":
            raise cfg.ConfigError(f"optim.nesterov: needs optim.name sgd, got {self.name}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise cfg.ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise cfg.ConfigError(f"optim.betas: must be two numbers in [0, 1), got {self.betas!r}")
        _positive("optim.eps", self.eps)
        _positive("optim.grad_clip", self.grad_clip)
        _positive("optim.backward_passes_per_step", self.backward_passes_per_step, integer=True)


@dataclass
class ScheduleConfig:
    """The learning rate as a factor of ``optim.lr`` per optimizer step.

    ``constant``; ``step``: times ``gamma`` every ``step_epochs`` epochs; ``cosine``:
    from 1 down to ``min_lr / lr`` over the run. A linear warm-up over
    ``warmup_steps`` (or ``warmup_epochs``) multiplies any of them.
    """

    name: Literal["constant", "step", "cosine"] = "constant"
    step_epochs: Optional[float] = None
    gamma: float = 0.1
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_epochs: float = 0.0

    def validate(self) -> None:
        if self.name == "step" and self.step_epochs is None:
            raise cfg.ConfigError("schedule.step_epochs: required with schedule.name step")
        _positive("schedule.step_epochs", self.step_epochs)
        if not 0 < self.gamma <= 1:
            raise cfg.ConfigError(f"schedule.gamma: must be in (0, 1], got {self.gamma}")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise cfg.ConfigError(f"schedule.min_lr: must be >= 0, got {self.min_lr}")
        if self.warmup_steps < 0 or not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise cfg.ConfigError(f"schedule.warmup_steps, schedule.warmup_epochs: must be >= 0 (finite), got "
                                  f"{self.warmup_steps}, {self.warmup_epochs}")
        if self.warmup_steps and self.warmup_epochs:
            raise cfg.ConfigError("schedule: set warmup_steps or warmup_epochs, not both")


@dataclass
class TrainConfig:
    steps: Optional[int] = None        # total optimizer steps; null = epochs x steps per epoch
    epochs: float = 5
    batch_size: int = 32               # per rank, per backward pass
    eval_batch_size: int = 512
    eval_every_steps: Optional[int] = None
    eval_every_epochs: float = 1       # 0: only at the end
    amp: Literal["none", "bf16", "fp16"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False        # torch.use_deterministic_algorithms (warn_only): deterministic CUDA kernels

    def validate(self) -> None:
        _positive("train.steps", self.steps, integer=True)
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size, integer=True)
        _positive("train.eval_batch_size", self.eval_batch_size, integer=True)
        _positive("train.eval_every_steps", self.eval_every_steps, integer=True)
        if not (math.isfinite(self.eval_every_epochs) and self.eval_every_epochs >= 0):
            raise cfg.ConfigError(f"train.eval_every_epochs: must be a finite number >= 0, got {self.eval_every_epochs}")


@dataclass
class EvictConfig:
    """``robust.evict``: drain the host of a rank whose mean relative weight over ``window`` steps
    fell below ``threshold`` (or whose row was non-finite in more than ``log.suspects.max_nonfinite``
    of them, or whose alignment gap, mean distance, closest share or twin gap crossed ``log.suspects``'
    threshold; its loss excess only where ``log.suspects.max_loss_excess`` is set by number):
    its host goes into the exclusion file and the run stops with a checkpoint, or under elastic goes on
    without that host; never more than ``f`` ranks over the run, never below the rule's need, ``f`` unchanged
    (:mod:`fa_hvd.train.eviction`, README "Eviction")."""

    window: int = 100
    threshold: float = 0.2

    def validate(self) -> None:
        try:
            trust.Thresholds(self.window, self.threshold).check("robust.evict")
        except ValueError as exc:
            raise cfg.ConfigError(str(exc).replace("robust.evict.min_weight", "robust.evict.threshold")) from None


@dataclass
class RobustConfig:
    aggregator: str = "flag"
    aggregator_params: dict = field(default_factory=dict)   # f, r, tau, ...
    transport: Literal["horovod", "mpi", "torch"] = "horovod"  # torch: torch.distributed (torchrun)
    exchange: Literal["allgather", "sharded"] = "allgather"  # sharded: allreduce's traffic, O(n) memory
    replicas: int = 1                  # sharded only: 1, or >= f+1 ranks compute each shard (>= 2f+1: repaired)
    digest: bool = True                # compare the ranks' aggregates, one step late in the control row
    allow_exceeding_f: bool = False    # more faulty ranks than f: a warning, not an error
    evict: Optional[EvictConfig] = None  # {window, threshold}: drain a distrusted rank's host (elastic: go on)
    worker_momentum: float = 0.0       # beta: each rank sends its momentum (fa_hvd/worker_momentum.py)

    def validate(self) -> None:
        try:
            rule = get_aggregator(self.aggregator, **self.aggregator_params)
        except (TypeError, ValueError) as exc:
            raise cfg.ConfigError(f"robust.aggregator / robust.aggregator_params: {exc}") from None
        try:
            check_beta(self.worker_momentum)
        except ValueError as exc:
            raise cfg.ConfigError(f"robust.{exc}") from None
        _positive("robust.replicas", self.replicas, integer=True)
        if self.replicas > 1 and self.exchange != "sharded":
            raise cfg.ConfigError(f"robust.replicas: {self.replicas} needs robust.exchange sharded")
        if 1 < self.replicas <= rule.f:
            raise cfg.ConfigError(f"robust.replicas: {self.replicas} cannot keep the promise for f={rule.f} (f ranks "
                                  f"could hold every copy of a shard); use >= {rule.f + 1} (detect) or "
                                  f">= {2 * rule.f + 1} (repair), or 1")
        if self.exchange == "sharded" and not rule.columnwise:
            raise cfg.ConfigError(f"robust.exchange: sharded cannot compute {rule.name} (it needs whole "
                                  f"gradients); use allgather")

    @property
    def f(self) -> int:
        return int(self.aggregator_params.get("f", 0))


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None
    every_minutes: Optional[float] = None
    keep: int = 3                      # newest checkpoints kept; older ones are deleted
    at_end: bool = True

    def validate(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps, integer=True)
        _positive("checkpoint.every_minutes", self.every_minutes)
        _positive("checkpoint.keep", self.keep, integer=True)


@dataclass
class ElasticConfig:
    """Horovod elastic mode: launch with ``horovodrun --min-np ... --host-discovery-script``."""

    enabled: bool = False
    commit_every_steps: int = 10

    def validate(self) -> None:
        _positive("elastic.commit_every_steps", self.commit_every_steps, integer=True)


RULE = "rule"  # a log.suspects threshold left to the measured default of the run's rule (trust.defaults)


@dataclass
class SuspectsConfig:
    """When the trust ledger names a rank a suspect (:mod:`fa_hvd.train.trust`). Each threshold is a number,
    ``rule`` (the default: the value measured for ``robust.aggregator`` and the run's split, IID shards or
    ``data.alpha`` set, :func:`fa_hvd.train.trust.defaults`) or, where it may be, null (not judged)."""

    window: int = trust.Thresholds.window               # steps
    min_weight: Union[float, Literal["rule"]] = RULE    # mean relative weight (1 = 1/p) below this over the window
    max_nonfinite: Union[float, Literal["rule"]] = RULE  # or non-finite in more than this share of the window
    min_alignment: Union[float, Literal["rule"], None] = RULE  # or alignment gap (window mean minus the median rank's) below this
    min_distance: Union[float, Literal["rule"], None] = RULE  # or mean relative distance to the others' aggregate below this
    max_distance: Union[float, Literal["rule"], None] = RULE  # or above this
    max_closest: Union[float, Literal["rule"], None] = RULE  # or the closest rank to the others' aggregate in more
    #                                                          than this share of the window's steps
    min_twin: Union[float, Literal["rule"], None] = RULE  # or mean gap to the nearest other rank's place below this
    max_loss_excess: Union[float, Literal["rule"], None] = RULE  # or mean batch loss minus the median rank's
    #                                                              above this (nats)
    min_loss_z: Union[float, Literal["rule"], None] = RULE  # ... where that excess is at least this many times
    #                                                         the ranks' spread of losses (null: at any spread)

    def thresholds(self, rule: str | None, window: int | None = None, iid: bool = False) -> trust.Thresholds:
        """The thresholds for a run of ``rule`` (None: the defaults of a rule not measured) over ``window``
        steps (default: this section's ``window``), its ranks' shards IID or not (``data.alpha`` null)."""
        measured = trust.defaults(rule, self.window if window is None else window, iid=iid)
        chosen = {f.name: getattr(self, f.name) for f in dataclasses.fields(trust.Thresholds) if f.name != "window"}
        return dataclasses.replace(measured, **{key: value for key, value in chosen.items() if value != RULE})

    def evicting(self, rule: str | None, evict: "EvictConfig", iid: bool = False) -> trust.Thresholds:
        """``robust.evict``'s thresholds: these over its window, its threshold the weight's. The loss excess
        evicts only where set here by number: its measured default names suspects but drains no host,
        because an attack that slows training lifts honest ranks' losses past it in nats (ALIE mu - sigma,
        z = 1: an honest rank named in 50 of FA's 54 cells, before any attacker in 22), and draining their
        hosts would hand the attackers a larger share. The loss z gate spares all but one of them on that
        sweep (``min_loss_z``; ``docs/results/suspects/README.md``); eviction waits for more attacks measured."""
        chosen = self.thresholds(rule, window=evict.window, iid=iid)
        loss_excess = chosen.max_loss_excess if self.max_loss_excess != RULE else None
        return dataclasses.replace(chosen, min_weight=evict.threshold, max_loss_excess=loss_excess)

    def validate(self) -> None:
        try:
            self.thresholds(None).check("log.suspects")
        except ValueError as exc:
            raise cfg.ConfigError(str(exc)) from None


@dataclass
class LogConfig:
    progress: Literal["auto", "bar", "lines", "none"] = "auto"  # auto: a bar on a terminal, lines otherwise
    every_steps: Optional[int] = None  # plain progress lines; null = about 20 per run
    tensorboard: Optional[str] = None  # a directory for TensorBoard event files (pip install fa_hvd[tensorboard])
    suspects: SuspectsConfig = field(default_factory=SuspectsConfig)

    def validate(self) -> None:
        _positive("log.every_steps", self.every_steps, integer=True)


@dataclass
class RunConfig:
    """One training run (the whole YAML file)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    faults: list = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def worker_nesterov(self) -> bool:
        """``optim.nesterov`` with ``robust.worker_momentum``: the workers' momentum is Nesterov's."""
        return self.optim.nesterov and self.robust.worker_momentum > 0

    def validate(self) -> None:
        if self.seed < 0:
            raise cfg.ConfigError(f"seed: must be >= 0, got {self.seed}")
        try:  # everything but the ranks' range, which needs the world size
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parse_faults(self.faults, _world_for_checks(self.faults), f=self.robust.f,
                             allow_exceeding_f=self.robust.allow_exceeding_f, rank_hosts=[])
        except ValueError as exc:
            message = str(exc).replace("set allow_exceeding_f (FA_HVD_ALLOW_EXCEEDING_F=1)",
                                       "set robust.allow_exceeding_f")
            raise cfg.ConfigError(message if message.startswith("faults[") else
                                  f"faults / robust.aggregator_params.f: {message}") from None
        for i, entry in enumerate(self.faults):
            kind = entry.get("kind") if isinstance(entry, dict) else None
            if kind in SHARDED_ROLE_KINDS and self.robust.exchange != "sharded":
                raise cfg.ConfigError(f"faults[{i}] (kind {kind!r}): a lie in the sharded exchange's roles; "
                                      f"set robust.exchange sharded")
        if self.elastic.enabled and self.robust.transport != "horovod":
            raise cfg.ConfigError("elastic.enabled: elastic mode needs robust.transport horovod")
        if self.optim.nesterov and not (self.optim.momentum or self.robust.worker_momentum):
            raise cfg.ConfigError("optim.nesterov: needs optim.momentum > 0, or robust.worker_momentum > 0 (the "
                                  "workers' momentum is then Nesterov's)")
        if self.robust.worker_momentum and self.optim.name == "sgd" and self.optim.momentum:
            raise cfg.ConfigError(f"robust.worker_momentum: {self.robust.worker_momentum} with optim.momentum "
                                  f"{self.optim.momentum} applies momentum twice (the ranks' and then the "
                                  f"optimizer's); set optim.momentum 0")


def _world_for_checks(entries) -> int:
    """A world size that holds every rank the faults name (and an honest one): the checks that
    do not depend on the real size run before the ranks start."""
    listed = [0]
    for entry in entries:
        ranks = entry.get("ranks") if isinstance(entry, dict) else None
        ranks = [ranks] if isinstance(ranks, int) else ranks if isinstance(ranks, list) else []
        listed += [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(CHECK_WORLD, max(listed) + 2)


def load(path, overrides=()) -> tuple[RunConfig, dict]:
    """Read ``path``, apply ``--set`` ``overrides``, validate; returns the config and its plain data."""
    return parse(cfg.read_yaml(path), overrides)


def parse(raw: dict, overrides=()) -> tuple[RunConfig, dict]:
    """A config from its YAML mapping ``raw`` and ``--set`` ``overrides``; returns it and its plain data."""
    raw = cfg.apply_overrides(raw, overrides)
    if isinstance(raw.get("elastic"), bool):  # `elastic: true` is short for `elastic: {enabled: true}`
        raw["elastic"] = {"enabled": raw["elastic"]}
    conf = cfg.from_dict(RunConfig, raw)
    return conf, cfg.to_dict(conf)


def identity(data: dict) -> dict:
    """The part of a config's plain data that a resumed run must share with its checkpoint
    (``robust.worker_momentum`` only when not 0: checkpoints from before the key resume as they did)."""
    kept = {k: v for k, v in data.items() if k not in BOOKKEEPING_SECTIONS}
    if isinstance(kept.get("robust"), dict):
        kept["robust"] = {k: v for k, v in kept["robust"].items()
                          if k != "digest" and not (k == "worker_momentum" and not v)}
    return kept


def config_hash(data: dict) -> str:
    return cfg.digest(identity(data))
