"""Small models for the embedded data sets."""

from __future__ import annotations

import torch
from torch import nn


def mlp(shape: tuple, num_classes: int, hidden: int = 64) -> nn.Module:
    """Flatten -> Linear(hidden) -> ReLU -> Linear(num_classes)."""
    inputs = 1
    for d in shape:
        inputs *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def small_cnn(shape: tuple, num_classes: int, width: int = 16) -> nn.Module:
    """Two 3x3 conv layers with ReLU and max-pooling, then a linear classifier."""
    channels = shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * width, num_classes),
    )


MODELS = {"mlp": mlp, "cnn": small_cnn}


def build(name: str, shape: tuple, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](shape, num_classes)
