"""The local optimizer and its learning-rate schedule.

``build_optimizer`` makes the torch optimizer that ``fa_hvd.DistributedOptimizer``
wraps (SGD with momentum/Nesterov, Adam, AdamW; weight decay as torch defines it
for each). ``lr_factor`` is the schedule as a pure function of the optimizer step
``t`` (so a resumed run recomputes it exactly), applied by ``LambdaLR``:

* warm-up: ``min(1, (t + 1) / W)`` for ``W`` warm-up steps (1 when ``W = 0``);
* ``constant``: 1;
* ``step``: ``gamma ** floor(t / S)`` with ``S = step_epochs x steps per epoch``;
* ``cosine``: ``m + (1 - m) (1 + cos(pi t / T)) / 2`` over the run's ``T`` steps,
  ``m = min_lr / lr``.

The factor is the product of the warm-up and the schedule.
"""

from __future__ import annotations

import functools
import math

import torch

from fa_hvd.train.config import OptimConfig, ScheduleConfig


def build_optimizer(conf: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if conf.name == "sgd":
        return torch.optim.SGD(params, lr=conf.lr, momentum=conf.momentum,
                               nesterov=conf.nesterov and conf.momentum > 0,  # else the workers' (worker momentum)
                               weight_decay=conf.weight_decay)
    cls = torch.optim.Adam if conf.name == "adam" else torch.optim.AdamW
    return cls(params, lr=conf.lr, betas=tuple(conf.betas), eps=conf.eps, weight_decay=conf.weight_decay)


def lr_factor(t: int, conf: ScheduleConfig, lr: float, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step ``t`` divided by ``lr`` (see the module docstring)."""
    warmup = conf.warmup_steps or round(conf.warmup_epochs * steps_per_epoch)
    factor = min(1.0, (t + 1) / warmup) if warmup else 1.0
    if conf.name == "step":
        factor *= conf.gamma ** (t // max(1, round(conf.step_epochs * steps_per_epoch)))
    elif conf.name == "cosine":
        floor = conf.min_lr / lr
        factor *= floor + (1 - floor) * (1 + math.cos(math.pi * min(t, total_steps) / total_steps)) / 2
    return factor


def build_scheduler(optimizer, conf: ScheduleConfig, lr: float, total_steps: int, steps_per_epoch: int):
    """``LambdaLR`` stepping ``lr_factor`` once per optimizer step."""
    schedule = functools.partial(lr_factor, conf=conf, lr=lr, total_steps=total_steps,
                                 steps_per_epoch=steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
