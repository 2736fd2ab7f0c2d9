"""``fa-hvd-bench robustness``: empirical (f, kappa)-robustness of every rule, in every shape.

A rule ``F`` is (f, kappa)-robust (Allouah et al., AISTATS 2023) when, for the honest set
``S`` (``|S| = p - f``) and any ``f`` other rows,

    ||F(x_1..x_p) - mean_S||^2 <= kappa (1/|S|) sum_{i in S} ||x_i - mean_S||^2,

and no rule does better than ``kappa = f / (p - 2f)``. For each shape ``p/f`` and each rule
this benchmark reports kappa-hat, the worst ratio over:

* honest distributions (``n`` coordinates, mean ``a ~ N(0, I)``, unit noise ``xi`` of norm
  about 1): ``tight`` ``a + 0.01 ||a|| xi`` (large batches, late training); ``moderate``
  ``a + 0.3 ||a|| xi``; ``clustered`` (non-IID) honest rows split round-robin over up to 3
  clusters ``s_k (a + 0.7 ||a|| xi_k)`` of norms ``s_k`` in {1, 0.5, 2}, plus ``0.05 ||a|| xi``;
  ``split`` (the issue's p = 4 geometry) half the honest rows within ``1e-3 ||a||`` of ``a``,
  the rest ``a + 0.5 ||a|| xi``; ``bound`` (the geometry of the lower bound's proof) ``p - 2f``
  honest rows within ``1e-3 ||a||`` of ``a``, the other ``f`` within ``1e-3 ||a||`` of ``a +
  0.5 ||a|| u``: with the Byzantine rows copying a row at ``a`` (``mimic``) the same ``p`` rows
  are also ``p - f`` honest rows at ``a`` with no spread, where a finite kappa forces the output
  to ``a``, so every rule's ratio is about ``f / (p - 2f)``. Without it a rule's kappa-hat can
  fall below that bound, which only says the search missed its worst case;
* attacks: every gradient attack of :mod:`fa_hvd.faults` with the parameters of the standing
  grid (a Byzantine row's own gradient, for signflip/reverse/bitflip, is drawn like an honest
  one), ``offset`` (each Byzantine row ``mean_S + 0.5 ||a|| u`` with its own random unit
  ``u``: plausible but off), min-max and min-sum in their three directions, and the search
  tailored to the rule (:func:`fa_hvd.faults.gradient.tailored_search`).

Every draw is seeded by ``(seed, shape, distribution, attack)``; a rule gets a fresh instance
per aggregation (cclip's centre starts at 0). A rule that refuses a shape (its precondition)
shows ``refuses``. For every Gram-space rule it also measures the Byzantine rows' share of
the weight, ``sum_B w_i / sum_i w_i`` with ``w_i = |c_i|`` (``agg = sum_i c_i x_i``) or, for the
rules that weight unit vectors (nmean, FA's reference mode), ``w_i = |c_i| ||x_i||``, over the
cases where the honest rows agree more closely with each other than with them (the largest
honest distance is below the smallest honest-Byzantine one), against ``f / p``.

One JSON line per (rule, shape) on stdout, progress on stderr; ``--out DIR`` writes
``DIR.md`` (the table, the bound beside each column, the weight shares) and ``DIR.png`` (a
heatmap of ``log10(kappa-hat / bound)``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fa_hvd.aggregators import get
from fa_hvd.cli_types import integer_at_least
from fa_hvd.faults import alie_z
from fa_hvd.faults.gradient import ATTACKS, HonestView, tailored_search
from fa_hvd.faults.seeding import derive_seed

SHAPES = ((4, 1), (5, 1), (5, 2), (7, 2), (8, 1), (10, 3), (15, 3), (16, 5), (31, 10), (64, 21))
RULES = {
    "mean": ("mean", {}), "nmean": ("nmean", {}), "median": ("median", {}),
    "trimmed_mean": ("trimmed_mean", {}), "krum": ("krum", {}), "multikrum": ("multikrum", {}),
    "bulyan": ("bulyan", {}), "geomed": ("geomed", {}), "cclip": ("cclip", {}), "mda": ("mda", {}),
    "nnm+multikrum": ("nnm+multikrum", {}), "flag-ref": ("flag", {"mode": "reference"}), "flag": ("flag", {}),
    "flag-mix2f": ("flag", {"neighbours": "p-2f"}), "flag-median": ("flag", {"median_steps": 3}),
}  # fmt: skip
"""Label -> (aggregator name, parameters) of the rules measured by default."""
DISTRIBUTIONS = ("tight", "moderate", "clustered", "split", "bound")
ATTACK_CASES = {
    "gaussian": ("gaussian", {"sigma": 1.0}), "uniform": ("uniform", {}), "signflip": ("signflip", {}),
    "reverse": ("reverse", {"scale": 100.0}), "zero": ("zero", {}), "nan": ("nan", {}),
    "bitflip": ("bitflip", {"rate": 1e-3}), "alie+nf": ("alie", {"sign": 1}), "alie-nf": ("alie", {"sign": -1}),
    "alie+1": ("alie", {"z": 1.0, "sign": 1}), "alie-1": ("alie", {"z": 1.0, "sign": -1}),
    "ipm0.1": ("ipm", {"eps": 0.1}), "ipm4": ("ipm", {"eps": 4.0}), "mimic": ("mimic", {"target": 0}),
    "minmax-std": ("minmax", {"direction": "std"}), "minmax-unit": ("minmax", {"direction": "unit"}),
    "minmax-sign": ("minmax", {"direction": "sign"}), "minsum-std": ("minsum", {"direction": "std"}),
    "minsum-unit": ("minsum", {"direction": "unit"}), "minsum-sign": ("minsum", {"direction": "sign"}),
    "offset": (None, {}),
}  # fmt: skip
"""Label -> (fault kind, parameters) of the fixed attacks (``offset``: the bench's own)."""
WEIGHT_RULES = {"flag": False, "flag-mix2f": False, "flag-median": False, "flag-ref": True, "nmean": True,
                "multikrum": False, "geomed": False}
"""Gram-space rules whose Byzantine weight share is reported -> whether they weight unit vectors."""


# -- command line ----------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register the ``robustness`` subcommand."""
    parser = subparsers.add_parser(
        "robustness",
        help="empirical (f, kappa)-robustness of every rule in every shape",
        description="kappa-hat of every rule per shape p/f: the worst ||F - mean_S||^2 / "
        "(mean_S ||x_i - mean_S||^2) over honest distributions and attacks (the tailored search "
        "included), beside the bound f/(p - 2f); JSON lines on stdout, progress on stderr.",
    )
    parser.add_argument("--shapes", type=_shapes, default=list(SHAPES), metavar="LIST",
                        help="comma list of p/f (default: %s)" % ",".join(f"{p}/{f}" for p, f in SHAPES))
    parser.add_argument("--rules", type=_rules, default=list(RULES), metavar="LIST",
                        help="comma list of rule labels (default: all: %s)" % ",".join(RULES))
    parser.add_argument("--n", type=integer_at_least(1), default=256, help="coordinates per row (default 256)")
    parser.add_argument("--seed", type=integer_at_least(0), default=0, help="seed of every draw (default 0)")
    parser.add_argument("--directions", type=integer_at_least(0), default=2,
                        help="random directions the tailored search adds (default 2)")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="write PATH.md (tables) and PATH.png (heatmap)")
    parser.set_defaults(run=run)


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(x) for x in part.split("/")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected p/f,p/f,..., got {text!r}") from None
    if not all(len(s) == 2 and s[0] > 2 * s[1] >= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"every shape p/f needs p > 2f >= 0, got {text!r}")
    return shapes


def _rules(text: str) -> list[str]:
    labels = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in labels if r not in RULES]
    if unknown or not labels:
        raise argparse.ArgumentTypeError(f"unknown rule(s) {unknown}; known: {', '.join(RULES)}")
    return labels


# -- the cases ---------------------------------------------------------------------------------------
def _unit_noise(count: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(count, n, generator=gen, dtype=torch.float64) / math.sqrt(n)


def honest_rows(distribution: str, q: int, n: int, gen: torch.Generator, f: int = 0) -> torch.Tensor:
    """``q`` honest rows of ``distribution`` (see the module docstring) in a world with ``f``
    Byzantine rows, fp64."""
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    scale = float(a.norm())
    noise = _unit_noise(q, n, gen) * scale
    if distribution == "bound":
        away = torch.nn.functional.normalize(_unit_noise(1, n, gen), dim=1)[0]
        return a + 1e-3 * noise + 0.5 * scale * (torch.arange(q) >= q - f)[:, None] * away
    if distribution == "tight":
        return a + 0.01 * noise
    if distribution == "moderate":
        return a + 0.3 * noise
    if distribution == "clustered":
        k = min(3, q)
        norms = torch.tensor([1.0, 0.5, 2.0][:k], dtype=torch.float64)
        centres = norms[:, None] * (a + 0.7 * scale * _unit_noise(k, n, gen))
        return centres[torch.arange(q) % k] + 0.05 * noise
    tight = (q + 1) // 2
    return torch.cat([a + 1e-3 * noise[:tight], a + 0.5 * noise[tight:]])


def byzantine_rows(attack: str, honest: torch.Tensor, f: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """The ``f`` rows of the fixed ``attack`` against ``honest`` in a world of ``p``."""
    kind, params = ATTACK_CASES[attack]
    mu = honest.mean(dim=0)
    if kind is None:
        return mu + 0.5 * float(mu.norm()) * torch.nn.functional.normalize(_unit_noise(f, mu.numel(), gen), dim=1)
    if kind == "alie" and "z" not in params:
        params = {**params, "z": alie_z(p, f)}
    view = HonestView(honest, tuple(range(honest.shape[0])))
    spread = honest.std(dim=0, correction=1) if honest.shape[0] > 1 else torch.zeros_like(mu)
    out = []
    for _ in range(f):
        own = (mu + spread * torch.randn(mu.shape, generator=gen, dtype=torch.float64)).float()
        out.append(ATTACKS[kind](own, view, gen, params).double())
    return torch.stack(out)


def kappa(out: torch.Tensor, honest: torch.Tensor) -> float:
    """``||out - mean_S||^2 / ((1/|S|) sum ||x_i - mean_S||^2)`` (inf for a non-finite ``out``)."""
    mu = honest.mean(dim=0)
    if not bool(out.isfinite().all()):
        return math.inf
    return float((out - mu).pow(2).sum() / (honest - mu).pow(2).sum(1).mean())


def weight_share(c: torch.Tensor, G: torch.Tensor, byzantine: torch.Tensor, unit: bool) -> float:
    """The Byzantine rows' share of the weight: ``sum_B w_i / sum_i w_i`` with ``w_i = |c_i|``
    (``agg = sum_i c_i x_i``, rules in gradient units) or, for rules that weight unit vectors
    (``unit``), ``w_i = |c_i| ||x_i||``."""
    mass = c.abs() * G.norm(dim=1) if unit else c.abs()
    total = float(mass.sum())
    return float(mass[byzantine].sum()) / total if total > 0 else 0.0


def honest_agree(honest: torch.Tensor, bad: torch.Tensor) -> bool:
    """Whether the largest honest distance is below the smallest honest-Byzantine one."""
    return float(torch.cdist(honest, honest).amax()) < float(torch.cdist(honest, bad).amin())


def build(label: str, f: int):
    name, params = RULES[label]
    return get(name, f=f, **params)


# -- the benchmark -----------------------------------------------------------------------------------
def measure_shape(p: int, f: int, labels: list[str], args: argparse.Namespace) -> tuple[dict, dict]:
    """Per rule: ``(kappa-hat, attack, distribution)`` (None: refuses); per weight rule: the largest share."""
    worst: dict[str, tuple | None] = {}
    for label in labels:
        try:
            build(label, f).check(p, f)
            worst[label] = (0.0, "", "")
        except ValueError:
            worst[label] = None
    shares: dict[str, tuple[float, str]] = {label: (0.0, "") for label in labels if label in WEIGHT_RULES}
    for d, distribution in enumerate(DISTRIBUTIONS):
        gen = torch.Generator().manual_seed(derive_seed(args.seed, p, f, d))
        honest = honest_rows(distribution, p - f, args.n, gen, f)
        cases = []
        for a, attack in enumerate(ATTACK_CASES):
            gen.manual_seed(derive_seed(args.seed, p, f, d, a + 1))
            cases.append((attack, byzantine_rows(attack, honest, f, p, gen)))
        for label in labels:
            if worst[label] is None:
                continue
            gen.manual_seed(derive_seed(args.seed, p, f, d, 0))
            bad = tailored_search(build(label, f), honest, f, args.directions, gen).expand(f, -1)
            for attack, rows in cases + [("tailored", bad)]:
                rule = build(label, f)
                G = torch.cat([honest, rows])
                k = kappa(rule(G), honest)
                if k > worst[label][0] or not worst[label][1]:
                    worst[label] = (k, attack, distribution)
                if label in shares and rule.weights is not None and rule.weights.numel() == p:
                    if honest_agree(honest, rows):
                        share = weight_share(rule.weights, G, torch.arange(p - f, p), WEIGHT_RULES[label])
                        if share > shares[label][0] or not shares[label][1]:
                            shares[label] = (share, f"{attack}/{distribution}")
    return worst, shares


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    results = []
    for p, f in args.shapes:
        start = time.perf_counter()
        worst, shares = measure_shape(p, f, args.rules, args)
        bound = f / (p - 2 * f)
        for label in args.rules:
            record = {"rule": label, "p": p, "f": f, "bound": bound, "n": args.n, "seed": args.seed}
            if worst[label] is None:
                record["refuses"] = True
            else:
                record.update(kappa=worst[label][0], attack=worst[label][1], distribution=worst[label][2])
            if label in shares:
                record.update(byzantine_share=shares[label][0], share_case=shares[label][1], share_bound=f / p)
            results.append(record)
            print(json.dumps(record), flush=True)
        print(f"robustness: p={p} f={f} done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    if args.out is not None:
        write_report(results, args)
    return 0


# -- the report --------------------------------------------------------------------------------------
def _kappa_text(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def write_report(results: list[dict], args: argparse.Namespace) -> None:
    """``args.out``.md: the kappa-hat table and the weight shares; ``args.out``.png: the heatmap."""
    shapes = list(args.shapes)
    cell = {(r["rule"], r["p"], r["f"]): r for r in results}
    head = ["rule"] + [f"{p}/{f} (bound {f / (p - 2 * f):.3g})" for p, f in shapes]
    lines = [
        "# Empirical (f, kappa)-robustness",
        "",
        f"`fa-hvd-bench robustness --n {args.n} --seed {args.seed} --directions {args.directions}"
        f"{' --out ' + str(args.out)}` (module docstring: `fa_hvd/bench/robustness.py`). Cell: the worst "
        "kappa-hat over honest distributions and attacks, and the attack/distribution that reached it; "
        "the column head gives p/f and the lower bound f/(p - 2f) that no rule beats.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label in args.rules:
        row = [label]
        for p, f in shapes:
            r = cell[(label, p, f)]
            row.append("refuses" if r.get("refuses") else
                       f"{_kappa_text(r['kappa'])} ({r['attack']}/{r['distribution']})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Smallest kappa-hat per shape: " + ", ".join(
        f"{p}/{f}: {min((cell[(label, p, f)]['kappa'], label) for label in args.rules if not cell[(label, p, f)].get('refuses'))[1]}"
        for p, f in shapes) + "."]
    weight_labels = [label for label in args.rules if label in WEIGHT_RULES]
    if weight_labels:
        lines += [
            "",
            "## The Byzantine rows' share of the weight",
            "",
            "Largest `sum_B w_i / sum_i w_i` (`w_i = |c_i|` for `agg = sum_i c_i x_i`; `|c_i| ||x_i||`, the "
            "weight of a unit vector, for nmean and flag-ref) over the cases where the honest rows agree "
            "more closely with each other than with the Byzantine rows (largest honest distance < smallest "
            "honest-Byzantine distance); the bar is f/p (the column head). Cell: share (attack/distribution).",
            "",
            "| " + " | ".join(["rule"] + [f"{p}/{f} (f/p {f / p:.3g})" for p, f in shapes]) + " |",
            "|" + "---|" * (len(shapes) + 1),
        ]
        for label in weight_labels:
            row = [label]
            for p, f in shapes:
                r = cell[(label, p, f)]
                row.append("refuses" if r.get("refuses") else f"{r['byzantine_share']:.3g} ({r['share_case']})")
            lines.append("| " + " | ".join(row) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    heatmap(cell, args.rules, shapes, args.out.with_suffix(".png"))


def heatmap(cell: dict, labels: list[str], shapes: list[tuple[int, int]], path: Path) -> None:
    """``log10(kappa-hat / bound)`` per rule and shape (grey: refuses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.full((len(labels), len(shapes)), np.nan)
    for i, label in enumerate(labels):
        for j, (p, f) in enumerate(shapes):
            r = cell[(label, p, f)]
            if not r.get("refuses"):
                values[i, j] = math.log10(max(r["kappa"], 1e-12) / r["bound"]) if math.isfinite(r["kappa"]) else 12
    shown = np.clip(values, -1, 12)
    fig, ax = plt.subplots(figsize=(1.0 * len(shapes) + 2.5, 0.45 * len(labels) + 1.5))
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, aspect="auto", vmin=-1, vmax=12)
    for i in range(len(labels)):
        for j in range(len(shapes)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 6 else "black")
    ax.set_xticks(range(len(shapes)), [f"{p}/{f}" for p, f in shapes])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("p / f")
    ax.set_title("log10(kappa-hat / (f / (p - 2f))): 0 is the bound (grey: refuses)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
