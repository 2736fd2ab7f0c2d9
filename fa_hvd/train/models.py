"""Models by name: ``mlp``, ``cnn``, ``resnet18`` (for 32x32 images) and ``torchvision:NAME``.

``build(name, shape, num_classes)`` takes the input shape ``(C, H, W)`` of one
sample. ``torchvision:NAME`` is ``torchvision.models.get_model(NAME, weights=None,
num_classes=...)`` (randomly initialised: nothing is downloaded), for 3-channel
images.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import nn

TORCHVISION_PREFIX = "torchvision:"
_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int):
    """torch's global RNG seeded with ``seed`` and held by this thread until the block ends.

    Module initialisers draw from the global RNG, which every thread of a process shares. Ranks
    that run as threads of one process (the tests' in-process worlds) would otherwise interleave
    their seeding and drawing, and a rank's model would depend on thread scheduling. Build
    models inside this block; anything that only checks a model can be built does so on the
    ``meta`` device, which draws nothing.
    """
    with _GLOBAL_RNG:
        torch.manual_seed(seed)
        yield


def mlp(shape: tuple, num_classes: int, hidden: int = 64, dropout: float = 0.0) -> nn.Module:
    """Flatten -> Linear(hidden) -> ReLU [-> Dropout(dropout)] -> Linear(num_classes)."""
    layers = [nn.Flatten(), nn.Linear(math.prod(shape), hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, num_classes))


def small_cnn(shape: tuple, num_classes: int, width: int = 16) -> nn.Module:
    """Two 3x3 conv layers with ReLU and max-pooling, then a linear classifier."""
    channels = shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * width, num_classes),
    )


def resnet18_cifar(shape: tuple, num_classes: int) -> nn.Module:
    """ResNet-18 for small images (He et al. 2016, the CIFAR variant): torchvision's
    ResNet-18 with a 3x3 stride-1 stem and no max-pooling, so 32x32 inputs keep 4x4
    maps before the final pooling."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def torchvision_model(name: str, shape: tuple, num_classes: int) -> nn.Module:
    from torchvision.models import get_model

    if shape[0] != 3:
        raise ValueError(f"model {TORCHVISION_PREFIX}{name} takes 3-channel images; the data has "
                         f"{shape[0]} channel(s) (use mlp, cnn or resnet18)")
    return get_model(name, weights=None, num_classes=num_classes)


NAMES = ("mlp", "cnn", "resnet18")


def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a known model."""
    if name in NAMES:
        return
    if name.startswith(TORCHVISION_PREFIX):
        from torchvision.models import list_models

        tv_name = name[len(TORCHVISION_PREFIX):]
        if tv_name not in list_models():
            raise ValueError(f"torchvision has no model {tv_name!r} (torchvision.models.list_models())")
        return
    raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}, or {TORCHVISION_PREFIX}NAME "
                     f"for any torchvision model")


def build(name: str, shape: tuple, num_classes: int, hidden: int = 64, width: int = 16,
          dropout: float = 0.0) -> nn.Module:
    """The model ``name`` for samples of ``shape`` and ``num_classes`` classes."""
    check_name(name)
    if name == "mlp":
        return mlp(shape, num_classes, hidden, dropout)
    if name == "cnn":
        return small_cnn(shape, num_classes, width)
    if name == "resnet18":
        return resnet18_cifar(shape, num_classes)
    return torchvision_model(name[len(TORCHVISION_PREFIX):], shape, num_classes)
