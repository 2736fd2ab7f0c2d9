"""Replay one grid cell with the simulation engine, the default `flag` in charge, and compare at
every step, on the same p rows, FA with other rules (the measurement behind ../fa-worst-cases.md).

    python docs/results/fa-worst-cases/replay.py configs/eval/extended.yaml iid/p4f1/flag/alie-1/s0

Per step, with H the honest rows (the first p - f), hm their mean, var their mean squared distance
to hm and sigma their coordinate-wise standard deviation:
  kappa       ||out - hm||^2 / var (the (f, kappa) ratio of fa-hvd-bench robustness);
  sigma-err   (out - hm) . (-sigma) / ||sigma||^2 (ALIE mu - sigma's direction, in its units);
  norm        ||out|| / ||hm||;
  byz, byz13  the Byzantine rows' share of FA's coefficients c after step 4 and after steps 1-3;
  honest      the smallest and largest honest coefficient of c over the steps;
  gate        step 4's separation gate.
Prints medians over steps 1-30, 31-70 and 71-100 (of a 100-step cell; the same fractions of a longer
one). Measurement only: it wraps Flag._combine, in which default mode's aggregate() and
aggregate_if_finite() (the path a call takes first) both end.
"""
import statistics as st
import sys

from fa_hvd.aggregators import flag as flagmod, get
from fa_hvd.eval import simulate as sim
from fa_hvd.eval.grid import load_grid

grid_path, key = sys.argv[1], sys.argv[2]
cell = next(c for c in load_grid(grid_path).cells if c.key == key)
p, f = cell.p, cell.f
rules = {n: get(n, f=f) for n in ("mean", "median", "geomed", "nmean")}
rules["flag-ref"] = get("flag", f=f, mode="reference")
log = []
combine = flagmod.Flag._combine


def recorded(self, G, K, f_):
    out = combine(self, G, K, f_)
    H = G.double()[: p - f]
    hm, sd = H.mean(0), -H.std(0)
    var = float(((H - hm) ** 2).sum(1).mean())
    K = self.gram.double()
    c = self.coefficients(K, f_)
    centre = self.centre(K.cpu(), f_)
    row = {"byz": float(c[p - f:].sum()), "byz13": float(centre.c[p - f:].sum()), "gate": centre.gate,
           "honest": (float(c[: p - f].min()), float(c[: p - f].max()))}
    for name, o in [("flag", out)] + [(n, rule(G)) for n, rule in rules.items()]:
        o = o.double()
        row[name] = (float(((o - hm) ** 2).sum()) / var, float((o - hm) @ sd / (sd @ sd)),
                     float(o.norm() / hm.norm()))
    log.append(row)
    return out


flagmod.Flag._combine = recorded
result = sim.simulate(cell, curve=True)
print(f"{key} ({grid_path}): accuracy {100 * result['test_accuracy']:.1f} %, final train loss "
      f"{result['train_loss']:.3f}, loss at steps 25/50/75/{len(result['losses'])} "
      f"{[round(result['losses'][i], 3) for i in (24, 49, 74, len(result['losses']) - 1)]}")
print(f"  honest coefficients over all steps: {min(r['honest'][0] for r in log):.3f} to "
      f"{max(r['honest'][1] for r in log):.3f} (1/p {1 / p:.3f})")
names = ["flag"] + list(rules)
scale = len(log) / 100  # the windows of a 100-step cell, stretched to the cell's steps
for lo, hi in ((round(scale * a), round(scale * b)) for a, b in ((0, 30), (30, 70), (70, 100))):
    part = log[lo:hi]
    print(f"  steps {lo + 1}-{hi}: byz {st.median(r['byz'] for r in part):.3f} (f/p {f / p:.3f}), "
          f"byz13 {st.median(r['byz13'] for r in part):.3f}, gate {st.median(r['gate'] for r in part):.2f}")
    for index, what in enumerate(("kappa", "sigma-err", "norm")):
        print(f"    {what:9s}", ", ".join(f"{n} {st.median(r[n][index] for r in part):.3f}" for n in names))
