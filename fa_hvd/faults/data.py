"""Data faults: poisoned labels and the paper's "augmented losses" image transforms.

The image transforms act on the last two dimensions, so they take one image
``(H, W)`` / ``(C, H, W)`` or a batch ``(N, H, W)`` / ``(N, C, H, W)`` alike,
and keep shape and dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .seeding import derive_seed, uniform_draw

LV_ALPHA, LV_BETA, LV_GAMMA, LV_DELTA = 2 / 3, 4 / 3, 1.0, 1.0


def label_flip(y, num_classes: int):
    """y -> C - 1 - y (labels in [0, C); an int or an integer tensor)."""
    if isinstance(y, torch.Tensor):
        out_of_range = bool(((y < 0) | (y >= num_classes)).any())
    else:
        out_of_range = not 0 <= y < num_classes
    if out_of_range:
        raise ValueError(f"label_flip: labels must lie in [0, {num_classes}), got {y!r}")
    return num_classes - 1 - y


def lotka_volterra(images: torch.Tensor, dt: float = 0.1, steps: int = 10) -> torch.Tensor:
    """Move pixel coordinates along the Lotka–Volterra flow and resample the image.

    dx/dt = alpha x - beta x y,  dy/dt = delta x y - gamma y  with alpha = 2/3,
    beta = 4/3, gamma = delta = 1. The image (column -> x, row -> y) is mapped onto
    the square centred on the flow's equilibrium (x*, y*) = (gamma/delta, alpha/beta)
    = (1, 1/2) with half-width 0.8 min(x*, y*) = 0.4, i.e. [0.6, 1.4] x [0.1, 0.9]:
    positive, so the flow is defined there, and orbits circle the image centre.
    ``out(p) = in(Phi_T(p))`` with Phi_T the flow for T = dt * steps (RK4 with
    ``steps`` steps), sampled bilinearly with border padding: values are convex
    combinations of input pixels, so the value range is kept (integer images are
    rounded back).
    """
    height, width = images.shape[-2:]
    grid = _lotka_volterra_grid(height, width, float(dt), int(steps))
    work = images.reshape(-1, 1, height, width)
    work = work if work.is_floating_point() else work.float()
    grid = grid.to(device=work.device, dtype=work.dtype).expand(work.shape[0], -1, -1, -1)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = out.clamp(work.min(), work.max())  # guard rounding at the range's ends
    if not images.is_floating_point():
        out = out.round()
    return out.to(images.dtype).reshape(images.shape)


@functools.lru_cache(maxsize=16)
def _lotka_volterra_grid(height: int, width: int, dt: float, steps: int) -> torch.Tensor:
    """The ``(1, H, W, 2)`` sampling grid (grid_sample's [-1, 1] coordinates) of the flow."""
    cx, cy = LV_GAMMA / LV_DELTA, LV_ALPHA / LV_BETA
    half = 0.8 * min(cx, cy)
    v, u = torch.meshgrid(torch.linspace(-1, 1, height, dtype=torch.float64),
                          torch.linspace(-1, 1, width, dtype=torch.float64), indexing="ij")
    x, y = cx + half * u, cy + half * v
    for _ in range(steps):
        x, y = _rk4_step(x, y, dt)
    return torch.stack(((x - cx) / half, (y - cy) / half), dim=-1).unsqueeze(0)


def _lv_field(x, y):
    return LV_ALPHA * x - LV_BETA * x * y, LV_DELTA * x * y - LV_GAMMA * y


def _rk4_step(x, y, dt):
    k1x, k1y = _lv_field(x, y)
    k2x, k2y = _lv_field(x + dt / 2 * k1x, y + dt / 2 * k1y)
    k3x, k3y = _lv_field(x + dt / 2 * k2x, y + dt / 2 * k2y)
    k4x, k4y = _lv_field(x + dt * k3x, y + dt * k3y)
    return (x + dt / 6 * (k1x + 2 * k2x + 2 * k3x + k4x),
            y + dt / 6 * (k1y + 2 * k2y + 2 * k3y + k4y))


def cat_map(images: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Arnold's cat map on a square N x N pixel grid, ``iterations`` times.

    The pixel at (x, y) (x = row, y = column) moves to ((2x + y) mod N, (x + y) mod N):
    an exact permutation of the pixels (the matrix [[2, 1], [1, 1]] has determinant 1).
    """
    if images.dim() < 2 or images.shape[-2] != images.shape[-1]:
        raise ValueError(f"cat_map needs square images (..., N, N), got shape {tuple(images.shape)}")
    n = images.shape[-1]
    source = _cat_map_source(n, int(iterations)).to(images.device)
    return images.reshape(*images.shape[:-2], n * n)[..., source].reshape(images.shape)


@functools.lru_cache(maxsize=16)
def _cat_map_source(n: int, iterations: int) -> torch.Tensor:
    """Flat index of the source pixel of each destination pixel: the inverse map
    (x, y) -> ((x - y) mod N, (2y - x) mod N), applied ``iterations`` times."""
    x, y = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    for _ in range(iterations):
        x, y = (x - y) % n, (2 * y - x) % n
    return (x * n + y).reshape(-1)


IMAGE_TRANSFORMS = {"lotka_volterra": lotka_volterra, "catmap": cat_map}


class PoisonedDataset(torch.utils.data.Dataset):
    """``dataset`` with a data fault applied to items ``(x, y, ...)``.

    ``labelflip`` changes ``y``; ``lotka_volterra`` and ``catmap`` transform the
    image ``x`` (a tensor). Item ``i`` is poisoned when a draw seeded with
    ``(seed, i)`` falls below ``probability``, so the poisoned subset is fixed.
    """

    def __init__(self, dataset, kind: str, params: dict, seed: int = 0, probability: float = 1.0):
        if kind != "labelflip" and kind not in IMAGE_TRANSFORMS:
            raise ValueError(f"PoisonedDataset: unknown data fault {kind!r}")
        self.dataset, self.kind, self.params = dataset, kind, dict(params)
        self.seed, self.probability = seed, probability

    def __len__(self) -> int:
        return len(self.dataset)

    def poisoned(self, index: int) -> bool:
        return self.probability >= 1 or uniform_draw(self.seed, int(index)) < self.probability

    def __getitem__(self, index):
        x, y, *rest = self.dataset[index]
        if self.poisoned(index):
            if self.kind == "labelflip":
                y = label_flip(y, **self.params)
            else:
                x = IMAGE_TRANSFORMS[self.kind](x, **self.params)
        return (x, y, *rest)


def poison_for_rank(dataset, specs, rank: int, seed: int = 0):
    """``dataset`` wrapped in every data fault of ``specs`` that names ``rank`` (in order)."""
    for i, spec in enumerate(specs):
        if spec.category == "data" and rank in spec.ranks:
            dataset = PoisonedDataset(dataset, spec.kind, spec.params, derive_seed(seed, rank, i), spec.probability)
    return dataset
