"""``fa-hvd-bench aggregators``: wall-clock time of the aggregation rules.

For every ``(n, p)`` one seeded ``G`` (``p`` honest gradients: a common mean plus
noise) is generated and every rule is timed on it: ``warmup`` untimed calls, then
``repeats`` timed ones (``time.perf_counter``, ``torch.cuda.synchronize`` around each
on CUDA), in rounds of one call of each rule, so that load on a shared machine
falls on every rule alike. One JSON line per rule goes to stdout with the median,
the minimum and the maximum.

Two floors are timed in every run, on the same ``G`` and in the same rounds:
``mean`` (torch's ``G.mean(0)``, one pass over ``G``: the limit of a Gram-space rule at
small ``p``) and
``syrk`` (the fp32 symmetric product ``G G^T`` as the BLAS computes it: the limit at
large ``p``). Every other row carries ``vs_mean`` and ``vs_syrk`` (its median / the
floor's median). The bench runs ``--threads`` threads (default 1): on a shared
machine, every extra OpenMP thread waits at each barrier for the slowest one, which
turned a 23 ms Gram into 67 ms and, with the machine busier, into seconds.

FA runs in both modes, ``flag[default]`` and ``flag[reference]``, and Multi-Krum is
always timed with it: FA rows carry ``vs_multikrum`` (FA median / Multi-Krum
median, same ``G``).
With ``--direct`` the direct formulation of the released FA
(:func:`fa_hvd.aggregators.flag_direct.flag_direct`) is timed once on the same ``G``
(``direct_s``, ``direct_repeats``, ``speedup_vs_direct`` = direct / FA median), and
``flag[reference]``, which computes the same aggregate, gets ``max_rel_diff`` =
``||fa - direct|| / ||direct||`` from a second run of both on ``G.double()``. A
summary line per ``(n, p)`` holds every rule's ``vs_mean`` and ``vs_syrk`` and the bar
checks: ``fa_within_1_5x_multikrum`` and ``fa_100x_faster_than_direct`` for every FA
mode measured, ``coordinatewise_within_3x_mean`` for median and trimmed mean, and for
``flag[default]`` ``fa_within_2x_mean`` (``p`` < 15) or ``fa_within_1_3x_syrk`` (``p`` >=
15). With ``--gram-floor`` :func:`fa_hvd.aggregators.geometry.gram` alone is timed too
(row ``gram``: the product every Gram-space rule computes) and FA rows carry ``vs_gram``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from fa_hvd.aggregators import get, names
from fa_hvd.aggregators.flag import DEFAULT_ITERATIONS, default_rank
from fa_hvd.aggregators.flag_direct import flag_direct
from fa_hvd.aggregators.geometry import gram
from fa_hvd.cli_types import integer_at_least, number_at_least

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "fp64": torch.float64,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
NOISE = 0.5
"""Standard deviation of each worker's noise around the common N(0, 1) mean."""
FLAG_MODES = ("default", "reference")
DIRECT = {"lambda_": 1.0, "iterations": 4}
"""FA's settings under ``--direct`` unless given."""
CHECKS = (
    ("vs_multikrum", "fa_within_1_5x_multikrum", lambda ratio: ratio <= 1.5),
    ("speedup_vs_direct", "fa_100x_faster_than_direct", lambda speedup: speedup >= 100),
)
"""(FA row key, summary check, bar) for the summary line."""
FLOORS = ("mean", "syrk")
"""Timed in every run: every other row carries ``vs_mean`` and ``vs_syrk``."""
COORDINATEWISE_BAR = ("median", "trimmed_mean")
"""Rules whose ``vs_mean`` must be <= 3 (``coordinatewise_within_3x_mean``)."""
FLOOR_BARS = (("fa_within_2x_mean", "vs_mean", 2.0, lambda p: p < 15),
              ("fa_within_1_3x_syrk", "vs_syrk", 1.3, lambda p: p >= 15))
"""(summary check, ratio, bar, the sizes it applies to) for ``flag[default]``."""


# -- command line ------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register the ``aggregators`` subcommand."""
    parser = subparsers.add_parser(
        "aggregators",
        help="time the aggregation rules on generated (p, n) gradients",
        description="Time every aggregation rule on seeded honest gradients G (p x n): one JSON "
        "line per (rule, n, p) on stdout, then a summary line per (n, p) with FA's bar checks "
        "(FA within 1.5x of Multi-Krum; with --direct, FA 100x faster than the direct FA); "
        "progress and a table of median times on stderr.",
    )
    parser.add_argument(
        "--rules", type=_rules, default=names(), metavar="LIST",
        help="comma list of rules (default: all: %s); flag runs in both modes, "
        "flag[default] and flag[reference], and brings multikrum along; the floors mean and syrk "
        "(fp32 G G^T) are always timed" % ",".join(names()),
    )
    parser.add_argument("--n", type=_sizes, default=[1_000_000], metavar="LIST",
                        help="comma list of gradient lengths n, e.g. 1e5,1e6 (default: 1000000)")
    parser.add_argument("--p", type=_sizes, default=[15], metavar="LIST",
                        help="comma list of worker counts p (default: 15)")
    parser.add_argument("--f", type=integer_at_least(0), default=3,
                        help="Byzantine count f given to every rule; a rule whose precondition fails "
                        "for a p is skipped with a note on stderr (default: 3)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", metavar="DTYPE",
                        help="dtype of G: float32, float64, float16, bfloat16 or fp32, fp64, fp16, bf16 "
                        "(default: float32; the rules compute fp16 and bf16 in fp32)")
    parser.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=integer_at_least(1), default=5,
                        help="timed calls per rule; rows report their median, minimum and maximum (default: 5)")
    parser.add_argument("--threads", type=integer_at_least(1), default=1,
                        help="torch threads (default: 1; more threads on a shared machine wait on each "
                        "other at every barrier)")
    parser.add_argument("--warmup", type=integer_at_least(0), default=1,
                        help="untimed calls per rule before the timed ones (default: 1)")
    parser.add_argument("--direct", action="store_true",
                        help="also run the direct, slow formulation of the released FA (an SVD of the "
                        "n x (p + p(p-1)) stacked matrix per IRLS step; O(n p^2) memory) once per "
                        "(n, p): its time and FA's speedup and fp64 accuracy against it (default: off)")
    parser.add_argument("--gram-floor", action="store_true",
                        help="also time the Gram product G G^T alone (the floor of FA and every Gram-space "
                        "rule); FA rows then report vs_gram (default: off)")
    parser.add_argument("--lambda", dest="lambda_", type=number_at_least(0.0), default=None, metavar="LAMBDA",
                        help="FA's pair weight lambda_ (default: 1.0 with --direct, else FA's own, 0)")
    parser.add_argument("--iterations", type=integer_at_least(1), default=None, metavar="T",
                        help="FA's IRLS step limit T (default: 4 with --direct, else FA's own: "
                        f"1 in reference mode, {DEFAULT_ITERATIONS} in default mode)")
    parser.add_argument("--r", type=integer_at_least(1), default=None,
                        help="FA's subspace rank r (default: FA's own, ceil(p/2) below p - f)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated gradients (default: 0)")
    parser.set_defaults(run=run)


def _rules(text: str) -> list[str]:
    """``--rules``: known rule names, in order, without repeats."""
    rules = list(dict.fromkeys(name.strip().lower() for name in text.split(",")))
    unknown = [name for name in rules if name not in names()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rule(s) {unknown}; known: {','.join(names())}")
    return rules


def _sizes(text: str) -> list[int]:
    """``--n``, ``--p``: positive integers, ``1e6`` notation allowed."""
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    if not all(value >= 1 and value.is_integer() for value in values):
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return [int(value) for value in values]


def _device(text: str) -> str:
    """``--device``: cpu, or cuda when available."""
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda is not available")
    return text


# -- the benchmark -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Benchmark every (n, p): JSON lines on stdout, a table of medians on stderr."""
    specs = rule_specs(args)
    torch.set_num_threads(args.threads)
    _log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {_dtype(args)}")
    rows = []
    for n in args.n:
        for p in args.p:
            rows += bench_size(n, p, specs, args)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    _log(table(rows, args))
    return 0


def flag_settings(args: argparse.Namespace) -> dict:
    """FA's ``r``, ``lambda_`` and ``iterations``: as given, else :data:`DIRECT` under ``--direct``."""
    given = {"lambda_": args.lambda_, "iterations": args.iterations}
    chosen = {**(DIRECT if args.direct else {}), **{k: v for k, v in given.items() if v is not None}}
    return {**({"r": args.r} if args.r is not None else {}), **chosen}


def rule_specs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """``(label, params)`` per timed rule; the rule, the label up to ``[``, is ``get(rule, **params)``."""
    rules = list(args.rules)
    if "flag" in rules and "multikrum" not in rules:
        _log("multikrum added: FA rows report vs_multikrum")
        rules.append("multikrum")
    if "mean" not in rules:
        _log("mean added: rows report vs_mean")
        rules.append("mean")
    specs = [("syrk", {})] + ([("gram", {})] if args.gram_floor else [])
    for name in rules:
        if name == "flag":
            flag = {"f": args.f, **flag_settings(args)}
            specs += [(f"flag[{mode}]", {**flag, "mode": mode}) for mode in FLAG_MODES]
        else:
            specs.append((name, {"f": args.f}))
    return specs


def gradients(n: int, p: int, args: argparse.Namespace) -> torch.Tensor:
    """``G`` (``(p, n)``): a common N(0, 1) mean plus N(0, NOISE^2) noise per worker, seeded, drawn on
    ``--device`` (a GPU draws 1e10 values in milliseconds; the CPU would take minutes)."""
    generator = torch.Generator(device=args.device).manual_seed(args.seed)  # drawn where G lives
    mean = torch.randn(n, generator=generator, device=args.device)
    G = torch.randn(p, n, generator=generator, device=args.device).mul_(NOISE).add_(mean)
    return G.to(dtype=DTYPES[args.dtype])


def bench_size(n: int, p: int, specs: list[tuple[str, dict]], args: argparse.Namespace) -> list[dict]:
    """Time every rule on one ``G``; print the rows and the summary line, return the rows."""
    _log(f"n={n} p={p}: generating G")
    G = gradients(n, p, args)
    rules = [(label, params, agg) for label, params in specs if (agg := usable(G, label, params)) is not None]
    times = interleaved([agg for _, _, agg in rules], G, args.repeats, args.warmup)
    rows = [row_of(G, label, params, samples, args) for (label, params, _), samples in zip(rules, times)]
    fa = [row for row in rows if row["rule"].startswith("flag[")]
    multikrum = next((row for row in rows if row["rule"] == "multikrum"), None)
    for row in fa if multikrum else ():
        row["vs_multikrum"] = row["median_s"] / multikrum["median_s"]
    floor = next((row for row in rows if row["rule"] == "gram"), None)
    for row in fa if floor else ():
        row["vs_gram"] = row["median_s"] / floor["median_s"]
    floors = {name: row for row in rows if (name := row["rule"]) in FLOORS}
    timed_rules = [row for row in rows if row["rule"] not in FLOORS]
    for row in timed_rules:
        row.update({f"vs_{name}": row["median_s"] / floor_row["median_s"] for name, floor_row in floors.items()})
    if args.direct and fa:
        compare_direct(G, fa, args)
    for row in rows:
        _emit(row)
    _emit({"bench": "aggregators", "summary": summary(n, p, fa, timed_rules, args)})
    return rows


def usable(G: torch.Tensor, label: str, params: dict):
    """The rule ``label`` built with ``params``; ``None`` (and a note on stderr) when its precondition fails."""
    if label == "gram":
        return gram
    if label == "syrk":
        return syrk
    if label == "mean":
        return one_pass
    aggregator = get(label.split("[")[0], **params)
    try:
        aggregator.check(G.shape[0])
    except ValueError as error:
        _log(f"skip {label}: {error}")
        return None
    return aggregator


def row_of(G: torch.Tensor, label: str, params: dict, times: list[float], args: argparse.Namespace) -> dict:
    row = {
        "bench": "aggregators", "rule": label, "params": params,
        "n": G.shape[1], "p": G.shape[0], "dtype": _dtype(args), "device": args.device,
        "repeats": args.repeats, "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
    }  # fmt: skip
    _log(f"{label}: median {row['median_s'] * 1e3:.4g} ms")
    return row


def interleaved(fns: list, G: torch.Tensor, repeats: int, warmup: int) -> list[list[float]]:
    """Per function, the seconds of ``repeats`` calls on ``G``, taken in rounds (one call of each per
    round) after ``warmup`` untimed calls each, so that machine noise hits every rule alike."""
    for fn in fns:
        for _ in range(warmup):
            fn(G)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            samples += timed(fn, G, repeats=1, warmup=0)
    return times


def timed(fn, G: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` calls ``fn(G)`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn(G)
    times = []
    for _ in range(repeats):
        _synchronize(G)
        start = time.perf_counter()
        fn(G)
        _synchronize(G)
        times.append(time.perf_counter() - start)
    return times


def compare_direct(G: torch.Tensor, fa_rows: list[dict], args: argparse.Namespace) -> None:
    """Time the direct FA once on ``G``; add its time, FA's speedup and (fp64) accuracy to the FA rows."""
    settings = flag_settings(args)

    def direct(X: torch.Tensor) -> torch.Tensor:
        r = settings.get("r") or default_rank(X.shape[0], args.f)
        return flag_direct(X, r, settings["lambda_"], settings["iterations"])

    _log("direct FA: one timed run, then one fp64 run of it and of flag[reference]")
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()  # as the rules compute fp16/bf16
    (direct_s,) = timed(direct, work, repeats=1, warmup=0)
    G64 = G.double()
    expected = direct(G64)
    for row in fa_rows:
        row.update(direct_s=direct_s, direct_repeats=1, speedup_vs_direct=direct_s / row["median_s"])
        if row["params"]["mode"] == "reference":
            actual = get("flag", **row["params"])(G64)
            row["max_rel_diff"] = float((actual - expected).norm() / expected.norm())
    _log(f"direct FA: {direct_s * 1e3:.4g} ms")


def one_pass(G: torch.Tensor) -> torch.Tensor:
    """The floor at small ``p``, row ``mean``: torch's ``G.mean(0)``, one pass over ``G``. (The
    ``mean`` rule sums the rows in order, column block by column block, so that its bits do not
    depend on how the columns are split, :mod:`fa_hvd.aggregators.mean`: up to about 2x this
    at p = 15; the floor is the pass itself.)"""
    return G.mean(dim=0)


def syrk(G: torch.Tensor) -> torch.Tensor:
    """The fp32 floor at large ``p``: ``G G^T`` in fp32, one BLAS product."""
    X = G.float()
    return X @ X.T


def summary(n: int, p: int, fa_rows: list[dict], timed_rows: list[dict], args: argparse.Namespace) -> dict:
    """The FA figures of one ``(n, p)`` by mode, every rule's ratios to the floors, and each bar check."""
    out = {"n": n, "p": p, "dtype": _dtype(args), "device": args.device}
    for key, check, passes in CHECKS:
        values = {row["rule"]: row[key] for row in fa_rows if key in row}
        if values:
            out[key] = values
            out[check] = all(map(passes, values.values()))
    floor = {row["rule"]: row["vs_gram"] for row in fa_rows if "vs_gram" in row}
    if floor:
        out["vs_gram"] = floor
    for key in ("vs_mean", "vs_syrk"):
        ratios = {row["rule"]: row[key] for row in timed_rows if key in row}
        if ratios:
            out[key] = ratios
    barred = [ratio for rule, ratio in out.get("vs_mean", {}).items() if rule in COORDINATEWISE_BAR]
    if barred:
        out["coordinatewise_within_3x_mean"] = all(ratio <= 3 for ratio in barred)
    for check, key, bar, applies in FLOOR_BARS:
        if applies(p) and "flag[default]" in out.get(key, {}):
            out[check] = out[key]["flag[default]"] <= bar
    return out


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """Median milliseconds (min-max) and the ratios to the floors: one line per rule, one column per ``(n, p)``."""
    sizes = list(dict.fromkeys((row["n"], row["p"]) for row in rows))
    rules = list(dict.fromkeys(row["rule"] for row in rows))
    ms = {(row["rule"], row["n"], row["p"]): _cell(row) for row in rows}
    head = f"median ms (min-max) x mean x syrk ({_dtype(args)}, {args.device}, {args.threads} thread(s))"
    lines = [[head] + [f"n={_short(n)} p={p}" for n, p in sizes]]
    lines += [[rule] + [ms.get((rule, n, p), "-") for n, p in sizes] for rule in rules]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])])
        for line in lines
    )


def _cell(row: dict) -> str:
    ms = f"{row['median_s'] * 1e3:.3g} ({row['min_s'] * 1e3:.3g}-{row['max_s'] * 1e3:.3g})"
    ratios = "".join(f" {row[key]:.2f}x" for key in ("vs_mean", "vs_syrk") if key in row)
    return ms + ratios


def _short(n: int) -> str:
    """``100000`` -> ``1e5``, ``11000000`` -> ``1.1e7``."""
    return f"{n:.3g}".replace("e+0", "e").replace("e+", "e")


def _dtype(args: argparse.Namespace) -> str:
    return str(DTYPES[args.dtype]).removeprefix("torch.")


def _synchronize(G: torch.Tensor) -> None:
    if G.device.type == "cuda":
        torch.cuda.synchronize(G.device)


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
