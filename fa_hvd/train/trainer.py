"""``fa-hvd-train``: robust data-parallel training from a config, under horovodrun, mpirun, srun or torchrun.

    horovodrun -np N fa-hvd-train --config configs/X.yaml [--set KEY=VALUE ...]
        [--run-dir DIR] [--resume auto|never|PATH] [--resume-reshard]
    torchrun --nproc-per-node N fa-hvd-train --config configs/X.yaml --set robust.transport=torch ...

The loop is assembled from components with one job each: the config
(:mod:`fa_hvd.train.config`), the data and each rank's shard and sample order
(:mod:`~fa_hvd.train.data`, :mod:`~fa_hvd.train.sharding`), the model
(:mod:`~fa_hvd.train.models`), the optimizer and learning-rate schedule
(:mod:`~fa_hvd.train.optim`) wrapped by ``fa_hvd.DistributedOptimizer``, the
faults (:mod:`fa_hvd.faults`), checkpoints (:mod:`fa_hvd.checkpoint`; which one to resume
from, set-aside and the run lock: :mod:`~fa_hvd.train.resume`), the
per-step agreement and preemption signals (:mod:`~fa_hvd.train.control`),
metrics and progress (:mod:`~fa_hvd.train.metrics`), and elastic mode
(:mod:`~fa_hvd.train.elastic`).

One optimizer step on rank ``r`` (step ``t``, counted from 0):

1. ``backward_passes_per_step`` (k) micro-batches, each the next ``batch_size``
   indices of the rank's :class:`~fa_hvd.train.sharding.ShardStream`; each
   rank's loss is the mean cross-entropy of its batch, backpropagated divided
   by k;
2. the optimizer all-gathers the gradients (with this rank's faults applied to
   what it sends) and every rank aggregates; with ``optim.grad_clip`` or fp16,
   ``synchronize()``, then unscale and clip, then ``step()`` under
   ``skip_synchronize()``, as Horovod documents;
3. the learning-rate schedule steps; the ranks agree on the median loss, a stop
   request (SIGTERM/SIGUSR1 on any rank) and a timed checkpoint
   (:func:`~fa_hvd.train.control.agree`), and, with ``robust.digest`` (the default),
   compare the last step's aggregate digests in the same row; rank 0 logs;
   evaluation and checkpoints follow when due (a checkpoint, an elastic commit and
   the end of the run first compare this step's digests: nothing saved rests on an
   unverified aggregate).

Exit status: 0 finished; 2 bad config or input (one line ``fa-hvd-train: error:
...`` from rank 0, before any rank trains); 75 stopped by SIGTERM/SIGUSR1 (a
checkpoint was written, or the signal came during set-up and the checkpoints are
untouched): the run should be resumed with ``--resume auto``; 76 stopped by
``robust.evict`` with a checkpoint, naming the host to drain (listed in the exclusion
file, ``FA_HVD_EXCLUDE_FILE`` or ``RUN_DIR/excluded_hosts``, when excluding it is safe).
Under elastic an eviction that is safe does not stop the run: the host's ranks leave and
the others go on (:mod:`fa_hvd.train.eviction`).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import fa_hvd
from fa_hvd import checkpoint
from fa_hvd.aggregators import get as get_aggregator
from fa_hvd.comm import get_transport, messages
from fa_hvd.comm.messages import Optional
from fa_hvd.config import ConfigError
from fa_hvd.exchange import replicated
from fa_hvd.faults import FaultInjector, parse_faults, poison_for_rank
from fa_hvd.faults.seeding import derive_seed
from fa_hvd.faults.spec import rank_list
from fa_hvd.optimizer import checksum
from fa_hvd.train import config as train_config
from fa_hvd.train import control, data, eviction, metrics, models, optim, resume, tensorboard, trust
from fa_hvd.train.resume import CHECKPOINT_FORMAT, UsageError
from fa_hvd.train.sharding import ShardStream, partition, steps_per_epoch
from fa_hvd.worker_momentum import WorkerMomentum

PROG = "fa-hvd-train"
EXIT_OK, EXIT_USAGE, EXIT_PREEMPTED, EXIT_EVICTED = 0, 2, 75, 76
EXCLUDED_HOSTS = "excluded_hosts"  # in the run directory: hosts to drain, one a line (launch/, slurm/ read it)
EXCLUDE_FILE_VARIABLE = "FA_HVD_EXCLUDE_FILE"  # the exclusion file, when not RUN_DIR/excluded_hosts
# Elastic: at the last step, how often and how many times to commit while Horovod has not yet dropped a
# host evicted this run (its discovery runs each second; the host-update notice reaches rank 0 at a commit).
DROP_POLL_S, DROP_POLLS = 1.0, 60


def exclusion_file(run_dir: Path, environ=os.environ) -> Path:
    """Where robust.evict lists the hosts to drain: ``FA_HVD_EXCLUDE_FILE`` (which
    ``launch/discover-hosts.sh`` reads; ``launch/elastic.sh`` sets it), else ``RUN_DIR/excluded_hosts``."""
    return Path(environ.get(EXCLUDE_FILE_VARIABLE) or Path(run_dir) / EXCLUDED_HOSTS)


def say(text: str, file=None) -> None:
    print(text, file=file or sys.stdout, flush=True)


class Trainer:
    """One rank's training run: its components, its state, its loop (:meth:`train`)."""

    def __init__(self, conf: train_config.RunConfig, conf_data: dict, run_dir: Path, transport):
        self.conf, self.conf_data = conf, conf_data
        self.config_hash = train_config.config_hash(conf_data)
        self.run_dir = Path(run_dir)
        self.transport = transport
        self.rank, self.world = transport.rank, transport.size
        self.device = self._device()
        self.passes = conf.optim.backward_passes_per_step
        self.step = 0
        self.max_step_seen = 0
        self.consumed_faults: set[int] = set()
        self.evicted: list[dict] = []  # robust.evict's evictions over the run: {step, rank, host}
        self.launch_time = self.wall_origin = time.perf_counter()
        self.last_eval: dict | None = None
        self.last_loss: float | None = None
        self.events: list[dict] = []
        self.total_steps: int | None = None
        self.log = None
        self.progress = None
        self.board = None
        self.identities: list[dict] | None = None  # every rank's of this world, once the ranks met (meet())
        self.trust: trust.TrustLedger | None = None
        self.evictor: trust.TrustLedger | None = None  # robust.evict's thresholds over the same diagnostics
        self.trust_state: dict | None = None  # a checkpoint's, for the ledger of a world of its size
        self.writer = checkpoint.Writer(conf.checkpoint.keep)
        self.lock = resume.RunLock(self.run_dir)

    # -- components for the current world ------------------------------------------------
    def _device(self) -> torch.device:
        choice = self.conf.train.device
        if choice == "cuda" and not torch.cuda.is_available():
            raise UsageError("train.device: cuda was asked for but torch sees no GPU")
        if self.conf.train.deterministic:  # cuBLAS reads its workspace setting when CUDA starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # An op with no deterministic CUDA kernel (adaptive_avg_pool2d's backward) warns, naming itself.
            torch.use_deterministic_algorithms(True, warn_only=True)
        if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
            local = self.transport.local_rank % max(1, torch.cuda.device_count())
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def fault_entries(self) -> list:
        """The config's faults for this world: ranks outside it and faults already spent dropped."""
        entries = []
        for i, entry in enumerate(self.conf.faults):
            if i in self.consumed_faults:
                continue
            entry = dict(entry)
            ranks = rank_list(entry.get("ranks"))
            if isinstance(ranks, list) and self.conf.elastic.enabled:
                entry["ranks"] = [r for r in ranks if isinstance(r, int) and r < self.world]
                if not entry["ranks"]:
                    continue
            entries.append(entry)
        return entries

    def load_data(self) -> None:
        conf = self.conf
        self.split = data.load_dataset(
            conf.data.name, conf.data.dir, conf.seed, normalize=conf.data.normalize, augment=conf.data.augment,
            verify=conf.data.verify, image_size=conf.data.image_size, synthetic=conf.data.synthetic)
        self.train_labels = self.split.labels()

    def meet(self) -> None:
        """Every rank's identity in this world (collective): the trust ledger's, and the hosts that
        faults given by ``hosts`` act on. Before :meth:`check_world`, in every new world."""
        self.identities = trust.gather_identities(self.transport, self.device)

    def rank_hosts(self) -> list[str]:
        """Each rank's host as ``robust.evict`` names it ([] before :meth:`meet`)."""
        return [trust.node(identity, self.conf.elastic.enabled) for identity in self.identities or []]

    def check_world(self) -> None:
        """Every check that needs the world size, local to this rank (``ValueError`` on failure)."""
        conf = self.conf
        self.specs = parse_faults(self.fault_entries(), self.world, f=conf.robust.f,
                                  allow_exceeding_f=conf.robust.allow_exceeding_f, rank_hosts=self.rank_hosts())
        aggregator = get_aggregator(conf.robust.aggregator, **conf.robust.aggregator_params)
        aggregator.check(self.world)
        if conf.robust.replicas > self.world:
            raise ValueError(f"robust.replicas: {conf.robust.replicas} needs at least as many ranks, got {self.world}")
        self.shards = partition(self.train_labels, self.world, conf.seed, conf.data.alpha)
        self.steps_per_epoch = steps_per_epoch(len(self.split.train), self.world, conf.train.batch_size * self.passes)
        if self.total_steps is None:  # fixed at the start: an elastic world change keeps it
            self.total_steps = conf.train.steps or max(1, math.ceil(conf.train.epochs * self.steps_per_epoch))
        with torch.device("meta"):  # the model builds for this data; no draw from the global RNG
            self.new_model()

    def new_model(self) -> torch.nn.Module:
        model = self.conf.model
        return models.build(model.name, self.split.shape, self.split.num_classes, model.hidden, model.width,
                            model.dropout)

    def build(self) -> None:
        """Model, optimizer, schedule, and this world's shard, stream and faults.

        Outside elastic mode rank 0's initial parameters are broadcast (collective); in
        elastic mode nothing here talks to the other ranks (a worker may join while the
        others train): the first sync broadcasts the state."""
        conf = self.conf
        with models.seeded(conf.seed):
            self.model = self.new_model()
        self.model = self.model.to(self.device)
        if not conf.elastic.enabled:
            for name, tensor in self.model.state_dict().items():
                self.transport.broadcast_(tensor, 0, f"fa_hvd.train.init.{name}")
        self.scaler = torch.amp.GradScaler(self.device.type) if conf.train.amp == "fp16" else None
        self.optimizer = fa_hvd.DistributedOptimizer(
            optim.build_optimizer(conf.optim, self.model),
            named_parameters=self.model.named_parameters(),
            backward_passes_per_step=self.passes,
            aggregator=conf.robust.aggregator,
            aggregator_params=conf.robust.aggregator_params,
            transport=self.transport,
            gradient_transform=self._outgoing,
            exchange=replicated(conf.robust.replicas) if conf.robust.replicas > 1 else conf.robust.exchange,
            digest="deferred" if conf.robust.digest else False,
        )
        self.scheduler = optim.build_scheduler(self.optimizer, conf.schedule, conf.optim.lr, self.total_steps,
                                               self.steps_per_epoch)
        self._overflowed = False
        self._scale = 1.0
        self.worker_momentum = WorkerMomentum(conf.robust.worker_momentum, conf.worker_nesterov)
        self.join_world()

    def join_world(self) -> None:
        """This rank's part of the current world: its (poisoned) shard, stream, test share, faults."""
        conf = self.conf
        self.train_set = poison_for_rank(self.split.train, self.specs, self.rank, seed=conf.seed)
        self.stream = ShardStream(self.shards[self.rank], conf.seed, self.rank)
        self.eval_indices = data.eval_indices(len(self.split.test), self.rank, self.world)
        counts = self.injector.counts if hasattr(self, "injector") else {}
        self.injector = FaultInjector(self.specs, self.rank, self.world, seed=conf.seed, transport=self.transport)
        self.injector.counts = dict(counts)
        lies = self.injector.roles or None  # role faults (fa_hvd.faults.roles) are told where they are asked
        self.optimizer.exchange.lies = self.transport.lies = lies

    def open_trust(self) -> None:
        """A fresh trust ledger for this world, with every rank's identity (collective): a checkpoint's or
        commit's from a world of this size goes on; from another, only its suspects are kept."""
        s = self.conf.log.suspects
        if self.identities is None:
            self.meet()
        identities = self.identities
        iid = self.conf.data.alpha is None  # the measured defaults of IID shards, else those of any split
        thresholds = s.thresholds(self.conf.robust.aggregator, iid=iid)
        self.trust = trust.TrustLedger(self.world, thresholds, identities)
        evict = self.conf.robust.evict
        if evict is not None:
            self.evictor = trust.TrustLedger(self.world, s.evicting(self.conf.robust.aggregator, evict, iid=iid),
                                             identities)
        if self.trust_state is not None and self.trust_state["p"] == self.world:
            self.trust.load_state_dict(self.trust_state)
        elif self.trust_state is not None:
            self.trust.carry(self.trust_state)
        self.trust_state = None

    def account_trust(self, losses: list[float]) -> list[dict]:
        """Feed this step's diagnostics and every rank's batch loss (the step's agreement) to the ledgers; name
        each new suspect once (every rank alike). Returns the ranks that crossed ``robust.evict``'s threshold
        at this step."""
        for suspect in self.trust.observe(self.step, self.optimizer.stats, losses):
            self.event(self.trust.describe(suspect), suspect=suspect)
        return self.evictor.observe(self.step, self.optimizer.stats, losses) if self.evictor is not None else []

    def evict(self, ranks: list[dict]) -> int | None:
        """Act on the ranks that crossed ``robust.evict`` (every rank alike; :func:`fa_hvd.train.eviction.decide`):
        rank 0 lists their hosts in the exclusion file when that is safe, and an event names ranks, hosts
        and verdict. Returns :data:`EXIT_EVICTED` after a checkpoint when the run stops (always without
        elastic), None when it goes on (under elastic, or when every host is already excluded)."""
        path = exclusion_file(self.run_dir)
        verdict = eviction.decide(ranks, self.trust.identities, self.evicted, self.conf.robust.f,
                                  self.optimizer.aggregator, self.conf.elastic.enabled, self.step, str(path))
        if verdict is None:
            return None
        if verdict.hosts:
            self.evicted += verdict.evicted
            if self.rank == 0:
                known = path.read_text().split() if path.exists() else []
                checkpoint.write_atomic(path, "".join(f"{h}\n" for h in dict.fromkeys(known + verdict.hosts)).encode())
        named = "; ".join(f"rank {s['rank']} on {trust.where(s)} ({s['reason']})" for s in verdict.suspects)
        ending = f"Checkpoint at step {self.step}, exit {EXIT_EVICTED}" if verdict.stop else "Training goes on"
        self.event(f"warning: evict: {named}. {verdict.text}. {ending}", evicted=[s["rank"] for s in verdict.suspects],
                   excluded=verdict.hosts)
        if not verdict.stop:
            return None
        self.save_checkpoint(wait=True)
        return EXIT_EVICTED

    # -- one step ---------------------------------------------------------------------------
    def _outgoing(self, flat: torch.Tensor, bucket: int, step: int) -> torch.Tensor:
        """What this rank sends: under fp16 the unscaled gradient (exact: the scale is a power of 2),
        so every rule sees true gradients; with ``robust.worker_momentum`` its momentum; then this
        rank's faults."""
        if self.scaler is not None:
            if bucket == 0:
                self._overflowed = False
            self._overflowed |= not bool(torch.isfinite(flat).all())
            flat = flat / self._scale
        flat = self.worker_momentum(flat, bucket)
        if self.injector.specs:
            flat = self.injector.gradient_transform(flat, bucket, step)
        return flat

    def _autocast(self):
        amp = self.conf.train.amp
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=amp != "none")

    def train_step(self) -> float:
        """One optimizer step; returns this rank's batch loss (mean over its micro-batches)."""
        conf = self.conf
        self.model.train()
        self.optimizer.step_count = self.step  # the fault schedule's clock
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self._scale = float(self.scaler.get_scale())
        started = time.perf_counter()
        total = 0.0
        for micro in range(self.passes):
            indices = self.stream.take(conf.train.batch_size)
            generator = (data.augment_generator(conf.seed, self.rank, self.step, micro)
                         if self.split.augment != "none" else None)
            x, y = self.split.batch(self.train_set, indices, generator)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                loss = F.cross_entropy(self.model(x), y)
            total += loss.detach().item()
            scaled = loss / self.passes
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.backward_s = time.perf_counter() - started
        self.optimizer.synchronize()
        self.synchronize_s = time.perf_counter() - started - self.backward_s
        if self.scaler is None and conf.optim.grad_clip is None:
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        else:
            if self.scaler is not None:
                with torch.no_grad():  # the aggregate is unscaled (see _outgoing): rescale, exactly
                    for p in self.model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(self._scale)
                self.scaler.unscale_(self.optimizer)
            if conf.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), conf.optim.grad_clip)
            with self.optimizer.skip_synchronize():
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                else:
                    self.optimizer.step()
            if self.scaler is not None:
                self.scaler.update()
        self.scheduler.step()
        return total / self.passes

    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy over the whole test set: each rank its share, summed."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad(), self._autocast():
            for chunk in self.eval_indices.split(self.conf.train.eval_batch_size):
                x, y = self.split.batch(self.split.test, chunk)
                out = self.model(x.to(self.device)).float()
                y = y.to(self.device)
                sums += torch.tensor([float(F.cross_entropy(out, y, reduction="sum")),
                                      float((out.argmax(1) == y).sum()), float(len(y))], dtype=torch.float64)
        self.model.train()
        total = self.transport.allreduce_sum(sums, name="fa_hvd.train.eval")
        count = max(float(total[2]), 1.0)
        return float(total[0]) / count, float(total[1]) / count

    # -- state: checkpoints and elastic commits -------------------------------------------
    def rank_state(self) -> dict:
        """What only this rank knows: its random generators, stream position, buffers, fault counts,
        worker momentum."""
        return {
            "rng": checkpoint.rng_state(),
            "stream": self.stream.state_dict(),
            "buffers": {name: b.detach().cpu().clone() for name, b in self.model.named_buffers()},
            "faults": dict(self.injector.counts),
            "worker_momentum": self.worker_momentum.state_dict(),
        }

    def shared_state(self) -> dict:
        """What every rank holds alike (rank 0's copy is saved)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "world_size": self.world,
            "config": self.conf_data,
            "config_hash": self.config_hash,
            "model_name": self.conf.model.name,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": checkpoint.host_copy(self.optimizer.state_dict()),
            "scheduler": checkpoint.host_copy(self.scheduler.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "consumed_faults": sorted(self.consumed_faults),
            "evicted": [dict(e) for e in self.evicted],
            "trust": self.trust.state_dict() if self.trust is not None else None,
            "progress": {"wall_s": self.total_wall_s(), "last_eval": self.last_eval,
                         "last_loss": self.last_loss, "events": list(self.events)},
        }

    def gather_state(self) -> dict | None:
        """The whole checkpoint on rank 0 (None elsewhere): shared state plus every rank's own (collective)."""
        ranks = self.transport.gather_state(  # room for a worker momentum buffer per parameter, and the buffers
            self.rank_state(), root=0, name="fa_hvd.train.rank_state",
            limit=messages.model_state_limit([*self.model.parameters(), *self.model.buffers()], copies=1))
        if self.rank != 0:
            return None
        state = self.shared_state()
        state["ranks"] = ranks
        return state

    def load_state(self, state: dict) -> None:
        """Continue from ``state``: exactly when it was saved by a world of this size, otherwise
        resharded (every rank's stream restarts at the same position, generators re-seeded)."""
        self.load_shared(state)
        self.wall_origin = time.perf_counter() - float(state.get("progress", {}).get("wall_s", 0.0))
        if resume.resharded(state, self.world, self.config_hash):
            self.reseed()
            return
        mine = state["ranks"][self.rank]
        checkpoint.set_rng_state(mine["rng"])
        self.stream.load_state_dict(mine["stream"])
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, value in mine["buffers"].items():
                buffers[name].copy_(value)
        self.injector.counts = dict(mine["faults"])
        if "worker_momentum" in mine:  # absent from checkpoints written before worker momentum existed
            self.worker_momentum.load_state_dict(mine["worker_momentum"])

    def load_shared(self, state: dict) -> None:
        """Model, optimizer, schedule, scaler, step and progress from ``state``."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.max_step_seen = max(self.max_step_seen, self.step)
        self.consumed_faults = set(state.get("consumed_faults", []))
        self.evicted = [dict(e) for e in state.get("evicted", [])]
        progress = state.get("progress", {})
        self.last_eval, self.last_loss = progress.get("last_eval"), progress.get("last_loss")
        self.events = list(progress.get("events", []))
        self.trust_state = state.get("trust")
        self.trust = None  # opened again from trust_state by the next train()

    def reseed(self) -> None:
        """This rank's stream and generators for a new world, from the step alone; its worker momentum
        starts afresh (the history it holds may be of steps the new world does again)."""
        self.worker_momentum.reset()
        self.stream.position = self.step * self.conf.train.batch_size * self.passes
        seed = derive_seed(self.conf.seed, 0x5EED, self.rank, self.step)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # -- bookkeeping ------------------------------------------------------------------------
    def wall_s(self) -> float:
        """Seconds since this process started training."""
        return time.perf_counter() - self.launch_time

    def total_wall_s(self) -> float:
        """Seconds of training over every launch of this run."""
        return time.perf_counter() - self.wall_origin

    @property
    def epoch(self) -> float:
        """Epochs done (fractional): steps done / steps per epoch."""
        return round(self.step / self.steps_per_epoch, 4)

    def eval_due(self) -> bool:
        conf = self.conf.train
        if self.step == self.total_steps:
            return True
        if conf.eval_every_steps and self.step % conf.eval_every_steps == 0:
            return True
        if conf.eval_every_epochs:
            every = max(1, round(conf.eval_every_epochs * self.steps_per_epoch))
            return self.step % every == 0
        return False

    def checkpoint_due(self) -> bool:
        every = self.conf.checkpoint.every_steps
        return bool(every) and self.step % every == 0

    def timed_checkpoint_due(self) -> bool:
        minutes = self.conf.checkpoint.every_minutes
        return bool(minutes) and time.monotonic() - self.last_checkpoint_time >= 60 * minutes

    def verify_aggregates(self) -> None:
        """The last step's aggregate digests compared now (collective), so nothing saved rests on an
        unverified aggregate: :class:`~fa_hvd.exchange.digest.Divergence` names the groups otherwise."""
        if self.optimizer.digest is not None:
            self.optimizer.digest.verify(self.transport)

    def save_checkpoint(self, wait: bool) -> None:
        self.verify_aggregates()
        state = self.gather_state()
        self.last_checkpoint_time = time.monotonic()
        if state is None:
            return
        path = checkpoint.path_for(self.run_dir / "checkpoints", self.step)
        self.writer.submit(path, state, self.step)
        if wait:
            self.writer.wait()

    def event(self, text: str, **fields) -> None:
        """An event: logged by rank 0 to the terminal and metrics.jsonl, kept in the checkpoint."""
        record = {"kind": "event", "step": self.step, "event": text, **fields}
        self.events.append(record)
        if self.rank == 0:
            self.progress.message(text) if self.progress is not None else say(text)
            if self.log is not None:
                self.log.write(record)

    def describe(self) -> str:
        conf, split = self.conf, self.split
        return (f"{PROG}: {self.world} ranks ({self.transport.name}, {self.device}), {conf.data.name} "
                f"({len(split.train)} train / {len(split.test)} test), model {conf.model.name}, "
                f"{self.total_steps} steps ({self.steps_per_epoch} per epoch), aggregator "
                f"{self.optimizer.aggregator!r}, config hash {self.config_hash}")

    def open_outputs(self) -> None:
        """Rank 0: metrics.jsonl (cut back to the current step), the progress display, the run's description."""
        self.log = metrics.MetricsLog(self.run_dir / "metrics.jsonl", self.step or None)
        self.progress = metrics.Progress(self.total_steps, self.step, self.conf.log.progress,
                                         self.conf.log.every_steps)
        say(self.describe())
        say("resolved config:\n  " + yaml.safe_dump(self.conf_data, sort_keys=False).rstrip().replace("\n", "\n  "))
        for spec in self.specs:
            hosts = f" (the ranks on {', '.join(spec.hosts)})" if spec.hosts else ""
            say(f"fault: {spec.describe()} on rank(s) {spec.ranks}{hosts}")
        self.board = tensorboard.open_board(self.conf.log.tensorboard, say)

    def compatible(self, reshard: bool):
        """``compatible(state, path)`` for :func:`fa_hvd.train.resume.choose`: this run's checks."""
        return lambda state, path: resume.check_compatible(state, self.conf, self.conf_data, self.config_hash,
                                                           self.world, path, reshard)

    def summary(self, status: str, crc: int, identical: bool, faults: list) -> dict:
        final = dict(self.last_eval or {})
        trust_figures = self.trust.summary()
        drained = {e["host"]: e["step"] for e in self.evicted}
        suspects = [{**s, "evicted": drained.get(trust.node(s, self.conf.elastic.enabled))}
                    for s in trust_figures.pop("suspects")]
        return {
            "status": status,
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.world,
            "params_crc32": f"{crc:08x}",
            "params_identical_on_ranks": identical,
            "final": {"test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss"),
                      "train_loss": self.last_loss},
            "wall_s": round(self.wall_s(), 3),
            "total_wall_s": round(self.total_wall_s(), 3),
            "config_hash": self.config_hash,
            "aggregator": repr(self.optimizer.aggregator),
            "faults_injected": {str(r): counts for r, counts in enumerate(faults) if counts},
            "suspects": suspects,
            "evicted": [dict(e) for e in self.evicted],
            "trust": trust_figures,
            "events": [e["event"] for e in self.events],
        }

    # -- the loop ---------------------------------------------------------------------------
    def train(self, signals: control.StopSignals, commit=None) -> int:
        """Steps until the end or a stop request; returns the exit status (collective)."""
        conf = self.conf
        samples_per_step = self.world * conf.train.batch_size * self.passes
        if self.trust is None:
            self.open_trust()
        while self.step < self.total_steps:
            started = time.perf_counter()
            faults_before = sum(self.injector.counts.values())
            loss = self.train_step()
            self.step += 1
            self.max_step_seen = max(self.max_step_seen, self.step)
            self._spend_process_faults()
            agreed = control.agree(self.transport, loss, stop=signals.received is not None,
                                   checkpoint_due=self.timed_checkpoint_due(),
                                   faulty=sum(self.injector.counts.values()) > faults_before,
                                   overflowed=self._overflowed,
                                   nonfinite_rows=self.optimizer.stats.get("nonfinite", ()),
                                   lies=self.injector.roles or None, digest=self.optimizer.digest)
            self.last_loss = agreed.loss
            crossed = self.account_trust(agreed.losses)
            self._back_off_if_overflowed(agreed.overflowed_ranks)
            step_s = time.perf_counter() - started
            if self.rank == 0:
                self._log_step(agreed, step_s, samples_per_step / step_s)
            if agreed.stop:  # the checkpoint first: the grace period may not cover an evaluation too
                self.event(f"stop requested ({signals.received or 'signal on another rank'}): checkpoint at step "
                           f"{self.step}, then exit {EXIT_PREEMPTED}")
                self.save_checkpoint(wait=True)
                if self.eval_due():
                    self._evaluate()
                return EXIT_PREEMPTED
            evictions = len(self.evicted)
            if crossed and (status := self.evict(crossed)) is not None:
                return status
            if self.eval_due():
                self._evaluate()
            if self.checkpoint_due() or agreed.checkpoint_due:
                self.save_checkpoint(wait=False)
            due = self.step % conf.elastic.commit_every_steps == 0
            if commit is not None and (due or len(self.evicted) > evictions):  # a reset must not forget an eviction
                self.verify_aggregates()
                commit()
        if commit is not None:
            self._await_evicted_hosts(commit)
        self.verify_aggregates()
        if conf.checkpoint.at_end:
            self.save_checkpoint(wait=True)
        self.writer.wait()
        return EXIT_OK

    def _await_evicted_hosts(self, commit) -> None:
        """Elastic, after the last step: while a host evicted this run is still in the world, commit every
        :data:`DROP_POLL_S` until Horovod drops it (the commit raises its host-update interrupt; the reset
        finishes the run on the ranks left), at most :data:`DROP_POLLS` times, then finish as the world
        is. Every rank decides from the shared state, so all make the same commits."""
        evicted = sorted({e["host"] for e in self.evicted})
        if not any(trust.node(identity, True) in evicted for identity in self.trust.identities):
            return
        for _ in range(DROP_POLLS):
            time.sleep(DROP_POLL_S)
            commit()
        self.event(f"warning: evict: Horovod did not drop {', '.join(evicted)} within {DROP_POLLS * DROP_POLL_S:g} s "
                   f"of the last step; the run ends on {self.world} ranks, the host still listed for draining")

    def _back_off_if_overflowed(self, overflowed_ranks: int) -> None:
        """fp16: more than ``f`` ranks overflowed but the aggregate was finite (a robust rule dropped
        their rows, or all were dropped and the aggregate is zero), so the scaler did not back
        off: back off now, the same on every rank. A Byzantine rank (at most ``f``) cannot force it."""
        if self.scaler is None or overflowed_ranks <= self.conf.robust.f:
            return
        if self.scaler.get_scale() >= self._scale:  # GradScaler.update() did not back off this step
            self.scaler.update(new_scale=self._scale * self.scaler.get_backoff_factor())

    def _spend_process_faults(self) -> None:
        """A crash or hang fault happens once: in elastic mode, not again after a reset."""
        for i, entry in enumerate(self.conf.faults):
            if entry.get("kind") in ("crash", "hang") and entry.get("start_step", 0) < self.max_step_seen:
                self.consumed_faults.add(i)

    def _log_step(self, agreed: control.StepAgreement, step_s: float, samples_per_s: float) -> None:
        record = {"kind": "step", "step": self.step, "epoch": self.epoch, "loss": agreed.loss,
                  "lr": self.scheduler.get_last_lr()[0], "step_s": round(step_s, 6),
                  "backward_s": round(self.backward_s, 6), "synchronize_s": round(self.synchronize_s, 6),
                  "samples_per_s": round(samples_per_s, 1), "faults": agreed.faulty_ranks,
                  "world_size": self.world}
        stats = getattr(self.optimizer, "stats", None) or {}  # the exchange's seconds and bytes (rank 0's)
        record.update({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()
                       if k not in record})
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.get_scale()
        self.log.write(record)
        if self.board is not None:
            self.board.step(record)
        self.progress.step(self.step, self.epoch, agreed.loss, samples_per_s)

    def _evaluate(self) -> None:
        test_loss, accuracy = self.evaluate()
        self.last_eval = {"step": self.step, "test_loss": test_loss, "test_accuracy": accuracy}
        if self.rank == 0:
            self.log.write({"kind": "eval", "step": self.step, "epoch": self.epoch, "test_loss": test_loss,
                            "test_accuracy": accuracy})
            self.progress.evaluation(self.step, self.epoch, test_loss, accuracy)
            if self.board is not None:
                self.board.evaluation(self.step, test_loss, accuracy)

    def finish(self, status: int) -> None:
        """Every rank: checksums, fault counts; rank 0 writes summary.json. Ends with a barrier, so no
        rank exits (and makes a launcher kill the others) before rank 0's files are on disk."""
        crcs = self.transport.allgather_json(checksum(self.model.parameters()), name="fa_hvd.train.crc", schema=int)
        faults = self.transport.allgather_json(dict(self.injector.counts), name="fa_hvd.train.faults",
                                               schema={str: int})
        if self.rank == 0:
            name = {EXIT_OK: "finished", EXIT_EVICTED: "evicted"}.get(status, "preempted")
            summary = self.summary(name, crcs[0], all(c == crcs[0] for c in crcs), faults)
            metrics.write_summary(self.run_dir, summary)
            self.progress.close()
            self.log.close()
            if self.board is not None:
                self.board.close()
            _report(summary, self.run_dir)
        self.transport.allreduce_sum(torch.zeros(1), name="fa_hvd.train.done")
        self.transport.stop_roll_call()  # after the last collective: nothing is left to wait for


def _suspect(s: dict) -> str:
    """A suspect in the final line: one named in an earlier world says its size, an evicted one its step."""
    world = f" on {s['world_size']} ranks" if "world_size" in s else ""
    evicted = f" [evicted at step {s['evicted']}]" if s["evicted"] is not None else ""
    return f"rank {s['rank']} on {trust.where(s)} (named at step {s['step']}{world}: {s['reason']}){evicted}"


def _report(summary: dict, run_dir: Path) -> None:
    final = summary["final"]
    accuracy = final["test_accuracy"]
    say(f"{summary['status']} at step {summary['step']}/{summary['total_steps']} on {summary['world_size']} ranks "
        f"in {summary['wall_s']:.1f} s: test accuracy {accuracy if accuracy is None else f'{accuracy:.4f}'}, "
        f"parameters crc32 {summary['params_crc32']} "
        f"({'identical on every rank' if summary['params_identical_on_ranks'] else 'DIFFERENT across ranks'})")
    for rank, counts in summary["faults_injected"].items():
        say(f"rank {rank} injected: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    suspects = summary["suspects"]
    say("suspects: " + ("; ".join(_suspect(s) for s in suspects) if suspects else "none"))
    if summary["evicted"]:  # ranks numbered as in the world they were evicted from
        say("evicted: " + "; ".join(f"rank {e['rank']} on host {e['host']} at step {e['step']}"
                                    for e in summary["evicted"]))
    say(f"run directory: {run_dir} (summary.json, metrics.jsonl, checkpoints/)")


# -- start-up ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Robust data-parallel training from a config, under horovodrun, mpirun, srun or "
                               "torchrun (with robust.transport torch).",
        epilog="Exit status: 0 finished, 2 bad config or input, 75 stopped by SIGTERM/SIGUSR1 (checkpointed, "
               "or stopped during set-up): resume with --resume auto; 76 stopped by robust.evict (checkpointed): "
               "drain the host it names ($FA_HVD_EXCLUDE_FILE, else RUN_DIR/excluded_hosts), then resume. "
               "Under elastic, robust.evict lists the host there and the run goes on without it; 1 under elastic: "
               "too few ranks left for the rule (resume on more).")
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set optim.lr=0.05 "
                             "--set robust.aggregator_params.f=1")
    parser.add_argument("--run-dir", help="where config.yaml, metrics.jsonl, checkpoints/ and summary.json go "
                                          "(default runs/<config file stem>)")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto (default): continue from the newest valid checkpoint in the run directory, if "
                             "any; never: start over (old checkpoints there are deleted); PATH: that checkpoint. "
                             "Checkpoints above the resumed step, and damaged ones, are moved to "
                             "checkpoints/set-aside/")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="also write TensorBoard scalars to DIR (the config's log.tensorboard; needs the "
                             "tensorboard package: pip install 'fa_hvd[tensorboard]')")
    parser.add_argument("--resume-reshard", action="store_true",
                        help="accept a checkpoint from another world size or config (shards and sample order "
                             "are rebuilt for this world; the run is then not bit-identical to an "
                             "uninterrupted one)")
    return parser.parse_args(argv)


def usage_error(message: str, rank: int | None) -> int:
    """Print the error on rank 0, or on every rank when ``rank`` is None (before the ranks can talk)."""
    if rank in (None, 0):
        say(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def agree_on_errors(transport, error: str | None) -> None:
    """Raise :class:`UsageError` on every rank if any rank has an error (rank 0 reports it)."""
    errors = transport.allgather_json(error, name="fa_hvd.train.errors", schema=Optional(str))
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    same = all(e == failed[0][1] for _, e in failed) and len(failed) == len(errors)
    raise UsageError(failed[0][1] if same else "; ".join(f"rank {r}: {e}" for r, e in failed))


def start(trainer: Trainer, args) -> list[str]:
    """Build the world's components and load the checkpoint (collective). Returns notes for the user."""
    trainer.meet()
    if any("hosts" in entry for entry in trainer.conf.faults):
        try:  # now that the hosts are known; every rank alike (the same identities)
            trainer.check_world()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    trainer.build()
    trainer.transport.start_roll_call()
    state, notes = resume.choose(trainer.transport, trainer.run_dir, args.resume,
                                 trainer.compatible(args.resume_reshard), trainer.lock)
    if trainer.rank == 0:
        resume.write_config(trainer.run_dir, trainer.conf_data, trainer.config_hash)
    if state is not None:
        trainer.load_state(state)
        resharded = resume.resharded(state, trainer.world, trainer.config_hash)
        notes.append(f"resumed at step {trainer.step}" + (" (resharded)" if resharded else ""))
    return notes


def stopped_during_set_up(trainer: Trainer, signals: control.StopSignals) -> bool:
    """Collective: whether any rank got SIGTERM/SIGUSR1 while setting up (rank 0 says so)."""
    stop = trainer.transport.allreduce_sum(torch.tensor([float(signals.received is not None)]),
                                           name="fa_hvd.train.setup_stop")
    if float(stop[0]) and trainer.rank == 0:
        say(f"{PROG}: stop requested ({signals.received or 'signal on another rank'}) during set-up, before "
            f"training: nothing new to save, the checkpoints are untouched; exit {EXIT_PREEMPTED}")
    return bool(float(stop[0]))


def run(trainer: Trainer, args, signals: control.StopSignals) -> int:
    """Train (non-elastic): set up, resume, loop, finish. A stop signal during set-up ends the run
    at the next point where the ranks agree, before training."""
    error = None
    try:
        trainer.load_data()
        trainer.check_world()
    except (ValueError, UsageError) as exc:
        error = str(exc)
    agree_on_errors(trainer.transport, error)
    if stopped_during_set_up(trainer, signals):
        return EXIT_PREEMPTED
    notes = start(trainer, args)
    if stopped_during_set_up(trainer, signals):
        return EXIT_PREEMPTED
    trainer.launch_time = time.perf_counter()
    if trainer.step == 0:
        trainer.wall_origin = trainer.launch_time
    trainer.last_checkpoint_time = time.monotonic()
    if trainer.rank == 0:
        trainer.open_outputs()
    for note in notes:
        trainer.event(note)
    status = trainer.train(signals)
    trainer.finish(status)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    signals = control.StopSignals().install()  # first: a signal during set-up must not kill the rank
    try:
        return _main(args, signals)
    finally:
        signals.uninstall()


def _main(args, signals: control.StopSignals) -> int:
    # Until the transport starts, each rank finds an error alone, so each says it: a launcher that sees
    # one rank fail ends the others (torchrun, horovodrun), perhaps before rank 0 has said anything.
    try:
        overrides = args.set + ([f"log.tensorboard={args.tensorboard}"] if args.tensorboard else [])
        conf, conf_data = train_config.load(args.config, overrides)
    except ConfigError as exc:
        return usage_error(str(exc), None)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    if "TORCHELASTIC_RUN_ID" in os.environ and conf.robust.transport != "torch":
        return usage_error(f"launched by torchrun, but robust.transport is {conf.robust.transport}: "
                           f"set robust.transport torch (--set robust.transport=torch)", None)
    transport = get_transport(conf.robust.transport)
    trainer = None
    try:
        trainer = Trainer(conf, conf_data, run_dir, transport)
        if conf.elastic.enabled:
            from fa_hvd.train.elastic import run_elastic

            status = run_elastic(trainer, args, signals)
        else:
            status = run(trainer, args, signals)
    except UsageError as exc:
        status = usage_error(str(exc), transport.rank)
    finally:
        if trainer is not None:
            trainer.lock.release()
    transport.close()  # not after an exception: a collective may still be waiting on a lost peer
    return status


if __name__ == "__main__":
    sys.exit(main())
