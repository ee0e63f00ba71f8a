"""Collect one results folder into report.md, summary.json and plots; judge claims C1-C6.

    python report.py results/quick        # after `bash run_all.sh`
    python report.py results/paper

Every subfolder with a metrics.json is a run; the helper classifier of the inversion (a
folder whose name starts with `judge`) is listed in the table but is part of no claim.
Runs are grouped by their training norm; the eps = 0 runs (standard training) are the
baseline of every norm group, whatever norm they were filed under.

How claims are judged (rules fixed before the numbers were seen; RULES below states the
metric, contrast, test and threshold of every claim):

- Seed s of every eps shares initialisation and data order, so every test is on per-seed
  paired contrasts: a one-sided paired t-test (Student t, seeds - 1 degrees of freedom),
  alpha = 0.05. Only seeds that have the metric at every eps of the grid count.
- A trend ("X falls with eps") is the per-seed least-squares slope of the metric on eps over
  the norm's whole grid (eps 0 included); of log(metric) for Fisher quantities.
- Effects come with a 90% two-sided t confidence interval, so "the CI excludes 0 on the
  claimed side" is the same event as "the one-sided 5% test rejects".
- Fewer than 3 complete seeds, or missing data, give "undetermined", never "holds".

This module needs only numpy and the standard library (matplotlib, if present, for plots).
"""
import functools
import json
import math
from pathlib import Path

import numpy as np

from common import ArgumentParser, UserError, atomic_save, format_eps, mean_se, user_errors

ALPHA = 0.05        # one-sided level of every test
MIN_SEEDS = 3       # fewer complete seeds: undetermined (df = 1 gives no usable noise estimate)
EPS_TOL = 1e-6      # eps and radii are floats (8/255): equal when closer than this
# The radius at which C1's robust accuracy is judged, fixed in advance: RobustBench's
# standard CIFAR radii. Other radii are evidence only.
REFERENCE_RADIUS = {"l2": 0.5, "linf": 8 / 255}
# C2 is decided on the first of these transfer measures present in the runs; the others are
# evidence. A measure is a target's full-data probe ("cifar100"), its K-shot probe ("... 10-shot",
# mean over the draws) or its fine-tuning ("... fine-tuned"). Rule 3 (README, "History of the
# rules"), fixed before its numbers were seen: the quick preset decides on the contrast-inverted
# Fashion-MNIST 5-9 at 10 labelled examples per class; the paper and imagenet presets on
# CIFAR-100 (imagenet, without its data offline: CIFAR-10, then Fashion-MNIST).
PRIMARY_TARGETS = ["fashion-mnist:5-9+invert 10-shot", "fashion-mnist:5-9", "cifar100", "cifar10", "fashion-mnist",
                   "synthetic:0-4"]
DECIDING_METHOD = "baseline"  # C5: the Engstrom et al. recipe; other methods are evidence
# C6: (method with the noise-averaged objective, the same method without it)
NOISE_PAIRS = [("noise", "baseline"), ("noise-tv", "tv")]
FISHER_KEYS = ("weights_trace", "weights_trace_empirical", "input_trace", "input_lambda_max",
               "repr_trace", "repr_lambda_max", "repr_trace_normalized")
REQUIRED_METRICS = ("norm", "eps", "clean_acc", "robust_acc", "seed")

RULES = {
    "C1": {"claim": "robustness costs source accuracy",
           "metric": "clean source accuracy; PGD accuracy at the reference radius (l2 0.5, linf 8/255)",
           "contrast": "per-seed least-squares slope on eps over the norm's grid (eps 0 included)",
           "test": "one-sided paired t per metric (clean slope < 0, robust slope > 0); "
                   "intersection-union, p = max of the two",
           "threshold": "both p < 0.05"},
    "C2": {"claim": "adversarial training improves linear transferability",
           "metric": "linear-probe accuracy on the primary transfer measure, the first present of "
                     + ", ".join(PRIMARY_TARGETS) + " (K-shot: the mean over seeded draws of probes fitted "
                     "on K labelled examples per class)",
           "contrast": "per-seed difference acc(eps) - acc(0), for every eps > 0",
           "test": "one-sided paired t per eps (difference > 0), Holm step-down over the eps > 0 family; "
                   "p = smallest Holm-adjusted p",
           "threshold": "some eps with Holm-adjusted p < 0.05"},
    "C3": {"claim": "adversarial training reduces the Fisher information of the weights",
           "metric": "tr F_w (weights_trace)",
           "contrast": "per-seed least-squares slope of ln(metric) on eps over the norm's grid",
           "test": "one-sided paired t, slope < 0",
           "threshold": "p < 0.05"},
    "C4": {"claim": "adversarial training reduces the Fisher information about the input",
           "metric": "tr F_x (input_trace) and lambda_max F_x (input_lambda_max)",
           "contrast": "per-seed least-squares slope of ln(metric) on eps over the norm's grid",
           "test": "one-sided paired t per metric (slope < 0); intersection-union, p = max of the two",
           "threshold": "both p < 0.05"},
    "C5": {"claim": "robust representations are more invertible",
           "metric": "reconstruction SSIM of the baseline method (Engstrom et al. recipe)",
           "contrast": "per-seed least-squares slope on eps over the norm's grid",
           "test": "one-sided paired t, slope > 0",
           "threshold": "p < 0.05; undetermined if invert.json says its images were not disjoint "
                        "from the tuning images"},
    "C6": {"claim": "the paper's insight (noise averaging = a Fisher penalty) improves inversion",
           "metric": "reconstruction SSIM, robust runs (eps > 0)",
           "contrast": "per seed, mean over eps > 0 of SSIM(noise) - SSIM(baseline), and of "
                       "SSIM(noise-tv) - SSIM(tv)",
           "test": "one-sided paired t per contrast (> 0); intersection-union, p = max of the two",
           "threshold": "both p < 0.05; same disjointness rule as C5"},
}

GENERAL_RULES = [
    "Seed s of every eps shares initialisation and data order: tests are one-sided paired t-tests "
    f"on per-seed contrasts, seeds - 1 degrees of freedom, alpha = {ALPHA}.",
    "Only seeds with the metric at every eps of the norm's grid count (complete cases); fewer than "
    f"{MIN_SEEDS} such seeds, no eps = 0 run, fewer than 2 eps values or an absent key: undetermined.",
    f"Effects carry a {100 * (1 - 2 * ALPHA):.0f}% two-sided t confidence interval: it excludes 0 on the "
    "claimed side exactly when the one-sided test rejects (C2: the CI is not adjusted for the family; "
    "Holm decides).",
    "Intersection-union tests and several norm groups: the claim holds only if every part holds; it does "
    "not hold if any part does not; p, effect and CI are those of the deciding part (the largest p).",
    "Robust accuracy at a radius is the lowest accuracy among the attacks recorded at that radius.",
]


# ----------------------------------------------------------------------------- statistics

def betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz),
    using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a, b, x, tol=1e-15, tiny=1e-300, max_terms=100000):
    """The continued fraction of I_x(a, b), evaluated by Lentz's method."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),              # even term
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd term
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < tol:
            return h
    raise ArithmeticError(f"incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom, from
    P(T > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 = (1 - I_{t^2 / (df + t^2)}(1 / 2, df / 2)) / 2."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if t * t < df:  # near 0, the complementary form keeps precision: P(|T| < |t|) = I_y(1/2, df/2)
        tail = 0.5 - 0.5 * betainc(0.5, df / 2, t * t / (df + t * t))
    else:
        tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=None)  # the same few (q, df) are asked for by every test
def t_quantile(q, df):
    """The t with P(T <= t) = q (0 < q < 1), by bisection on t_cdf."""
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2


def one_sided_t(values, direction):
    """One-sample t-test of mean(values) > 0 (direction +1) or < 0 (direction -1).
    Returns {n, mean, se, t, df, p, ci}; ci is the 90% two-sided interval, which excludes 0 on
    the claimed side exactly when p < 0.05."""
    v = np.asarray(values, dtype=np.float64)
    n, mean = len(v), float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(n))
    df = n - 1
    if se > 0:
        t = mean / se
        p = t_cdf(-direction * t, df)
    else:  # identical values: no noise; significant only if strictly on the claimed side
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if direction * mean > 0 else 1.0
    half = t_quantile(1 - ALPHA, df) * se
    return {"n": n, "mean": mean, "se": se, "t": t, "df": df, "p": p, "ci": [mean - half, mean + half]}


def holm(pvalues):
    """Holm step-down adjusted p-values (same order as given): the k-th smallest p times
    (m - k + 1), made monotone; rejecting adjusted p < alpha controls the family-wise error."""
    m = len(pvalues)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def slope(x, y):
    """Least-squares slope of y on x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = x - x.mean()
    return float(dx @ (y - y.mean()) / (dx @ dx))


# ----------------------------------------------------------------------------- collection

def read_json(path, required=False):
    """The JSON object in path; None when the file is absent (and not required)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        if required:
            raise UserError(f"{path} not found")
        return None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def number(value):
    """value as a finite float, or None (absent, null, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def robust_records(path, records):
    """The robust_acc list of metrics.json: records {norm, eps, acc, ...}; unknown keys dropped."""
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"norm", "eps", "acc"} <= set(r)
                                                for r in records):
        raise UserError(f"{path}: robust_acc must be a list of {{norm, eps, acc, ...}} records")
    keep = ("norm", "eps", "attack", "steps", "restarts", "acc")
    return [{k: r[k] for k in keep if k in r} for r in records]


def transfer_measures(transfer):
    """{measure: accuracy} of a transfer.json: per target (an entry holding `acc`), its full-data
    probe ("target"), its K-shot probes ("target K-shot") and its fine-tuning ("target fine-tuned")."""
    measures = {}
    for target, v in transfer.items():
        if not isinstance(v, dict) or number(v.get("acc")) is None:
            continue
        measures[target] = number(v["acc"])
        for shots, few in (v.get("few_shot") or {}).items():
            if isinstance(few, dict) and number(few.get("acc")) is not None:
                measures[f"{target} {shots}-shot"] = number(few["acc"])
        if isinstance(v.get("finetune"), dict) and number(v["finetune"].get("acc")) is not None:
            measures[f"{target} fine-tuned"] = number(v["finetune"]["acc"])
    return measures


def collect_run(run):
    """One row (nested dict) for the run folder `run`."""
    path = run / "metrics.json"
    m = read_json(path, required=True)
    missing = [k for k in REQUIRED_METRICS if k not in m]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a metrics.json of advtrain.py")
    if number(m["eps"]) is None or number(m["eps"]) < 0 or number(m["clean_acc"]) is None:
        raise UserError(f"{path}: eps and clean_acc must be numbers (eps >= 0)")
    row = {"run": run.name, "role": "judge" if run.name.startswith("judge") else "study",
           "norm": m["norm"], "eps": float(m["eps"]), "seed": m["seed"],
           "clean_acc": float(m["clean_acc"]), "robust_acc": robust_records(path, m["robust_acc"])}
    row.update({k: m[k] for k in ("arch", "dataset", "classes", "epochs", "train_seconds") if k in m})
    fisher = read_json(run / "fisher.json") or {}
    row["fisher"] = {k: number(fisher[k]) for k in FISHER_KEYS if number(fisher.get(k)) is not None}
    row["transfer"] = transfer_measures(read_json(run / "transfer.json") or {})
    invert = read_json(run / "invert.json") or {}
    row["invert"] = {meth: {k: number(v.get(k)) for k in ("ssim", "psnr", "judge_acc")}
                     for meth, v in invert.items() if isinstance(v, dict) and "ssim" in v}
    row["invert_disjoint"] = invert.get("disjoint") if isinstance(invert.get("disjoint"), bool) else None
    return row


def collect_rows(results_dir):
    """One row per run folder (a subfolder holding metrics.json), in folder-name order."""
    return [collect_run(p.parent) for p in sorted(Path(results_dir).glob("*/metrics.json"))]


# ----------------------------------------------------------------------------- metrics of a row

def same(a, b):
    return abs(a - b) < EPS_TOL


def robust_acc(row, norm, radius):
    """Accuracy of the run under attack at (norm, radius); the worst of the attacks recorded there."""
    accs = [number(r["acc"]) for r in row["robust_acc"]
            if r["norm"] == norm and number(r["eps"]) is not None and same(r["eps"], radius)]
    accs = [a for a in accs if a is not None]
    return min(accs) if accs else None


def clean_acc(row):
    return row["clean_acc"]


def robust_at(norm, radius):
    return lambda row: robust_acc(row, norm, radius)


def fisher_of(key):
    return lambda row: row["fisher"].get(key)


def transfer_to(target):
    return lambda row: row["transfer"].get(target)


def ssim_of(method):
    return lambda row: row["invert"].get(method, {}).get("ssim")


def ssim_gain(method, reference):
    """SSIM(method) - SSIM(reference) of one run, or None when either is absent."""
    def gain(row):
        a, b = ssim_of(method)(row), ssim_of(reference)(row)
        return None if a is None or b is None else a - b
    return gain


# ----------------------------------------------------------------------------- groups and seeds

def study_rows(rows):
    return [r for r in rows if r["role"] == "study"]


def norm_groups(rows):
    """The training norms of the robust study runs (eps 0 runs belong to every group); the
    eps 0 runs' own norms when no robust run exists."""
    study = study_rows(rows)
    return sorted({r["norm"] for r in study if not same(r["eps"], 0)} or {r["norm"] for r in study})


def group_rows(rows, norm):
    """The study runs of a norm group: its robust runs plus every eps = 0 run."""
    return [r for r in study_rows(rows) if same(r["eps"], 0) or r["norm"] == norm]


def distinct(values):
    """The sorted distinct values (values within EPS_TOL merged)."""
    out = []
    for v in sorted(values):
        if not out or not same(out[-1], v):
            out.append(v)
    return out


def eps_grid(rows):
    """The sorted distinct training eps values of rows."""
    return distinct(r["eps"] for r in rows)


def radii(rows, norm):
    """The sorted distinct radii at which rows were attacked in norm."""
    return distinct(r["eps"] for row in rows for r in row["robust_acc"]
                    if r["norm"] == norm and number(r["eps"]) is not None)


def paired(rows, value, grid):
    """(seeds, Y): Y[i, j] = value of seed i's run at grid[j], for the seeds that have a value at
    every eps of the grid (complete cases). Duplicate runs of one (seed, eps) are averaged."""
    cells = {}
    for r in rows:
        v = value(r)
        j = next((j for j, e in enumerate(grid) if same(e, r["eps"])), None)
        if v is not None and j is not None:
            cells.setdefault(r["seed"], {}).setdefault(j, []).append(v)
    seeds = sorted((s for s, c in cells.items() if len(c) == len(grid)), key=str)
    Y = np.array([[np.mean(cells[s][j]) for j in range(len(grid))] for s in seeds]).reshape(len(seeds), len(grid))
    return seeds, Y


def missing_data(rows, value, grid, n_complete, name, need_zero=True):
    """Why the data cannot decide (None when they can): the rules' missing-data cases."""
    if not any(value(r) is not None for r in rows):
        return f"no run reports {name}"
    if need_zero and not (grid and same(grid[0], 0)):
        return "no eps = 0 run"
    if len(grid) < (2 if need_zero else 1):
        return "fewer than 2 eps values" if need_zero else "no eps > 0 run"
    if n_complete < MIN_SEEDS:
        return f"{n_complete} seed(s) have {name} at every eps {eps_list(grid)} (needs {MIN_SEEDS})"
    return None


# ----------------------------------------------------------------------------- verdicts

VERDICTS = {True: "holds", False: "does not hold", None: "undetermined"}


def result(holds, evidence, n_seeds, p=None, effect=None, ci=None, test=""):
    """A verdict with its evidence; the shape of every claim, norm group and test part."""
    return {"verdict": VERDICTS[holds], "holds": holds, "evidence": evidence, "test": test,
            "p": p, "effect": effect, "ci": ci, "n_seeds": n_seeds}


def from_test(s, name, evidence):
    """The verdict of one one-sided t-test s (from one_sided_t) on the contrast `name`."""
    holds = s["p"] < ALPHA
    text = f"{name} {s['mean']:+.3g} [90% CI {s['ci'][0]:+.3g}, {s['ci'][1]:+.3g}], t({s['df']}) = {s['t']:.3g}, " \
           f"p = {s['p']:.2g} ({s['n']} seeds{evidence})"
    return result(holds, text, s["n"], s["p"], s["mean"], s["ci"])


def log_of(value):
    """ln(value) of a row; a non-positive value cannot be logged and counts as absent."""
    def log(row):
        v = value(row)
        return math.log(v) if v is not None and v > 0 else None
    return log


def trend(rows, value, name, direction, log=False):
    """C1, C3, C4, C5: does `value` fall (direction -1) or rise (+1) with eps? One-sided t on the
    per-seed least-squares slopes over the whole grid (eps 0 included), of ln(value) if log."""
    if log:
        value, name = log_of(value), f"ln {name}"
    grid = eps_grid(rows)
    seeds, Y = paired(rows, value, grid)
    reason = missing_data(rows, value, grid, len(seeds), name)
    if reason:
        return result(None, f"{name}: undetermined, {reason}", len(seeds))
    slopes = [slope(grid, y) for y in Y]
    means = ", ".join(f"{format_eps(e)}: {m:.4g}" for e, m in zip(grid, Y.mean(0)))
    return from_test(one_sided_t(slopes, direction), f"{name} slope per unit eps", f"; means {means}")


def combine(parts, label=lambda key: ""):
    """Several parts (an intersection-union test, or norm groups) into one verdict: does not hold
    if any part does not; else undetermined if any is; else holds. p, effect and CI: those of the
    deciding part (the largest p among the failing parts, or among all when every part holds)."""
    items = list(parts.items()) if isinstance(parts, dict) else list(enumerate(parts))
    holds_all = [r["holds"] for _, r in items]
    holds = False if False in holds_all else None if None in holds_all else True
    evidence = "; ".join(f"{label(k)}{r['evidence']}" for k, r in items)
    n_seeds = min((r["n_seeds"] for _, r in items), default=0)
    if holds is None:
        return result(None, evidence, n_seeds)
    deciding = max((r for _, r in items if r["holds"] is holds), key=lambda r: r["p"])
    return result(holds, evidence, n_seeds, deciding["p"], deciding["effect"], deciding["ci"])


def with_extra(res, extra):
    """res with evidence-only lines appended (they never change the verdict)."""
    if extra:
        res["evidence"] += "; evidence only: " + "; ".join(extra)
    return res


def judge_c1(rows, norm):
    """C1: clean accuracy falls and robust accuracy at the reference radius rises with eps."""
    g = group_rows(rows, norm)
    clean = trend(g, clean_acc, "clean acc", -1)
    if norm not in REFERENCE_RADIUS:
        robust = result(None, f"no reference radius fixed for norm {norm}", 0)
    else:
        radius = REFERENCE_RADIUS[norm]
        robust = trend(g, robust_at(norm, radius), f"robust acc ({norm} {format_eps(radius)})", +1)
    # other radii at which every run was attacked (a training radius attacked on its own run
    # only has no paired contrast): evidence only
    common = [e for e in radii(g, norm) if all(robust_acc(r, norm, e) is not None for r in g)]
    others = [e for e in common if not same(e, REFERENCE_RADIUS.get(norm, -1.0))]
    extra = [trend(g, robust_at(norm, e), f"robust acc ({norm} {format_eps(e)})", +1)["evidence"]
             for e in others]
    return with_extra(combine([clean, robust]), extra)


def primary_target(rows):
    """The first of PRIMARY_TARGETS that some study run transferred to, or None."""
    present = {t for r in study_rows(rows) for t in r["transfer"]}
    return next((t for t in PRIMARY_TARGETS if t in present), None)


def eps_contrasts(rows, target):
    """C2 on one target: per eps > 0, the one-sided paired t of acc(eps) - acc(0), Holm over
    the eps > 0 family. Returns (result, grid, Y) with Y the complete seeds' accuracies."""
    value, name = transfer_to(target), f"{target} acc"
    grid = eps_grid(rows)
    seeds, Y = paired(rows, value, grid)
    reason = missing_data(rows, value, grid, len(seeds), name)
    if reason:
        return result(None, f"{name}: undetermined, {reason}", len(seeds)), grid, Y
    tests = [one_sided_t(Y[:, j] - Y[:, 0], +1) for j in range(1, len(grid))]
    adjusted = holm([s["p"] for s in tests])
    best = int(np.argmin(adjusted))
    s = tests[best]
    lines = ", ".join(f"eps {format_eps(e)}: {t['mean']:+.3g} (p = {t['p']:.2g}, Holm {a:.2g})"
                      for e, t, a in zip(grid[1:], tests, adjusted))
    text = (f"{name} minus eps 0 at eps {format_eps(grid[best + 1])}: {s['mean']:+.3g} "
            f"[90% CI {s['ci'][0]:+.3g}, {s['ci'][1]:+.3g}], Holm-adjusted p = {adjusted[best]:.2g} "
            f"({s['n']} seeds; eps 0 acc {Y[:, 0].mean():.4g}; per eps: {lines})")
    return result(adjusted[best] < ALPHA, text, s["n"], adjusted[best], s["mean"], s["ci"]), grid, Y


def tradeoff(rows, grid, Y):
    """C2's trade-off, evidence only: does target accuracy fall again after the best eps, and
    what does the best eps cost in clean source accuracy?"""
    if len(grid) < 2 or not len(Y):
        return []
    means = Y.mean(0)
    best = 1 + int(np.argmax(means[1:]))
    falls = "below" if means[-1] < means[best] else "not below"
    clean = {j: mean_se([r["clean_acc"] for r in rows if same(r["eps"], grid[j])])[0] for j in (0, best)}
    return [f"trade-off: target acc at the largest eps {format_eps(grid[-1])} ({means[-1]:.4g}) is {falls} "
            f"the best eps {format_eps(grid[best])} ({means[best]:.4g}); clean source acc at the best eps "
            f"{clean[best]:.4g} vs {clean[0]:.4g} at eps 0"]


def judge_c2(rows, norm):
    """C2: linear-probe accuracy on the primary target at some eps > 0 beats eps 0 (Holm)."""
    g = group_rows(rows, norm)
    primary = primary_target(rows)
    others = sorted({t for r in g for t in r["transfer"]} - {primary})
    extra = [eps_contrasts(g, t)[0]["evidence"] for t in others]
    if primary is None:
        return with_extra(result(None, "none of the primary targets " + ", ".join(PRIMARY_TARGETS)
                                 + " is present", 0), extra)
    res, grid, Y = eps_contrasts(g, primary)
    return with_extra(res, tradeoff(g, grid, Y) + extra)


def judge_c3(rows, norm):
    """C3: tr F_w falls with eps (slope of its log < 0)."""
    return trend(group_rows(rows, norm), fisher_of("weights_trace"), "weights_trace", -1, log=True)


def judge_c4(rows, norm):
    """C4: the input Fisher's trace and largest eigenvalue both fall with eps (slopes of logs < 0)."""
    g = group_rows(rows, norm)
    return combine([trend(g, fisher_of(k), k, -1, log=True) for k in ("input_trace", "input_lambda_max")])


def not_disjoint(rows):
    """The C5/C6 disjointness rule: an undetermined result when some invert.json says its images
    were not disjoint from the tuning images, else None."""
    bad = [r["run"] for r in rows if r["invert_disjoint"] is False]
    if bad:
        return result(None, "invert.json of " + ", ".join(bad) + " says its evaluation images were not "
                      "disjoint from the images the inversion was tuned on", 0)
    return None


def disjoint_note(rows):
    unknown = [r["run"] for r in rows if r["invert"] and r["invert_disjoint"] is None]
    return [f"{len(unknown)} run(s) do not record whether the inverted images were disjoint from the "
            "tuning images"] if unknown else []


def judge_c5(rows, norm):
    """C5: the baseline method's reconstruction SSIM rises with eps."""
    g = group_rows(rows, norm)
    others = sorted({m for r in g for m in r["invert"]} - {DECIDING_METHOD})
    extra = [trend(g, ssim_of(m), f"{m} ssim", +1)["evidence"] for m in others] + disjoint_note(g)
    res = not_disjoint(g) or trend(g, ssim_of(DECIDING_METHOD), f"{DECIDING_METHOD} ssim", +1)
    return with_extra(res, extra)


def mean_gain(rows, method, reference):
    """Per seed, the mean over the robust runs (eps > 0) of SSIM(method) - SSIM(reference);
    one-sided t that it is > 0."""
    robust = [r for r in rows if not same(r["eps"], 0)]
    value, name = ssim_gain(method, reference), f"ssim {method} - {reference}"
    grid = eps_grid(robust)
    seeds, Y = paired(robust, value, grid)
    reason = missing_data(robust, value, grid, len(seeds), name, need_zero=False)
    if reason:
        return result(None, f"{name}: undetermined, {reason}", len(seeds))
    return from_test(one_sided_t(Y.mean(1), +1), f"{name}, mean over eps > 0,", "")


def judge_c6(rows, norm):
    """C6: the noise-averaged objective beats the same method without it (both pairs)."""
    g = group_rows(rows, norm)
    tv = mean_gain(g, "tv", "baseline")["evidence"]
    extra = [f"the TV prior's own effect, not the paper's insight: {tv}"] + disjoint_note(g)
    res = not_disjoint(g) or combine([mean_gain(g, a, b) for a, b in NOISE_PAIRS])
    return with_extra(res, extra)


JUDGES = {"C1": judge_c1, "C2": judge_c2, "C3": judge_c3, "C4": judge_c4, "C5": judge_c5, "C6": judge_c6}


def rule_text(cid):
    r = RULES[cid]
    return f"{r['contrast']}; {r['test']}; holds if {r['threshold']}"


def judge_claims(rows):
    """{claim id: verdict with by_norm} for C1-C6, each norm group judged on its own."""
    norms = norm_groups(rows)
    claims = {}
    for cid, judge in JUDGES.items():
        by_norm = {norm: judge(rows, norm) for norm in norms}
        for r in by_norm.values():
            r["test"] = rule_text(cid)
        claim = combine(by_norm, label=lambda norm: f"[{norm}] ") if by_norm else result(None, "no study run", 0)
        claim["test"] = rule_text(cid)
        claim["by_norm"] = by_norm
        claims[cid] = claim
    return claims


# ----------------------------------------------------------------------------- tables

def eps_list(grid):
    return "(" + ", ".join(format_eps(e) for e in grid) + ")"


def cell(values):
    """'mean ± SE' over the seeds that have the value ('' when none)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    m, se = mean_se(values)
    return f"{m:.4g} ± {se:.2g}" if len(values) > 1 else f"{m:.4g}"


def columns(rows):
    """{table title: [(header, value of a row)]} for every quantity present in some run."""
    accuracy = [("clean acc", clean_acc)]
    for norm in sorted({r["norm"] for row in rows for r in row["robust_acc"]}):
        for e in radii(rows, norm):
            accuracy.append((f"robust {norm} {format_eps(e)}", robust_at(norm, e)))
    fisher = [(k, fisher_of(k)) for k in FISHER_KEYS if any(k in r["fisher"] for r in rows)]
    transfer = [(f"transfer {t}", transfer_to(t)) for t in sorted({t for r in rows for t in r["transfer"]})]
    inversion = []
    for method in sorted({m for r in rows for m in r["invert"]}):
        for k in ("ssim", "psnr", "judge_acc"):
            inversion.append((f"{method} {k}", (lambda m, k: lambda r: r["invert"].get(m, {}).get(k))(method, k)))
    return {"Accuracy": accuracy, "Fisher information": fisher, "Linear transfer": transfer,
            "Inversion": inversion}


def table_cells(rows):
    """One (label, eps, runs) per table row: eps 0 once (the baseline of every norm), then each
    norm's robust eps, then the helper judge runs."""
    study = study_rows(rows)
    cells = [("standard (all norms)", 0.0, [r for r in study if same(r["eps"], 0)])]
    for norm in norm_groups(rows):
        robust = [r for r in study if r["norm"] == norm and not same(r["eps"], 0)]
        cells += [(norm, e, [r for r in robust if same(r["eps"], e)]) for e in eps_grid(robust)]
    cells += [("judge (helper)", r["eps"], [r]) for r in rows if r["role"] == "judge"]
    return [c for c in cells if c[2]]


def results_table(rows):
    """One Markdown table per group of columns; a row per (norm, eps), skipping rows with no value."""
    lines = []
    for title, cols in columns(rows).items():
        if not cols:
            continue
        lines += [f"## {title}", "", "| norm | eps | seeds | " + " | ".join(h for h, _ in cols) + " |",
                  "|" + "---|" * (3 + len(cols))]
        for label, e, runs in table_cells(rows):
            values = [cell([f(r) for r in runs]) for _, f in cols]
            if any(values):
                lines.append(f"| {label} | {format_eps(e)} | {len({r['seed'] for r in runs})} | "
                             + " | ".join(values) + " |")
        lines.append("")
    return lines


def rules_table():
    lines = ["| claim | metric | contrast | test | threshold |", "|---|---|---|---|---|"]
    lines += [f"| {cid}: {r['claim']} | {r['metric']} | {r['contrast']} | {r['test']} | {r['threshold']} |"
              for cid, r in RULES.items()]
    return lines + [""] + [f"- {text}" for text in GENERAL_RULES]


def fmt_p(p):
    return "n/a" if p is None else f"{p:.2g}"


def verdict_lines(cid, c):
    effect = "n/a" if c["effect"] is None else f"{c['effect']:+.3g} [90% CI {c['ci'][0]:+.3g}, {c['ci'][1]:+.3g}]"
    lines = [f"- **{cid} {c['verdict']}**: {RULES[cid]['claim']}.  ",
             f"  Test: {c['test']}. p = {fmt_p(c['p'])}, effect {effect}, {c['n_seeds']} seeds."]
    for norm, r in c["by_norm"].items():
        lines.append(f"  - {norm}: **{r['verdict']}** (p = {fmt_p(r['p'])}). {r['evidence']}")
    return lines


def markdown(rows, claims, plots, grids):
    lines = ["# Results", "", "Mean ± standard error over seeds (seeds: how many seeds the row averages). "
             "Robust accuracy: under PGD at the given norm and radius (settings in each metrics.json). "
             "The judge run only labels reconstructions for invert.py and is part of no claim.", ""]
    lines += results_table(rows)
    lines += ["", "# Rules (fixed before the numbers)", ""] + rules_table()
    failed = [cid for cid, c in claims.items() if c["holds"] is False]
    open_ = [cid for cid, c in claims.items() if c["holds"] is None]
    lines += ["", "# Claims", "",
              f"Did not hold: {', '.join(failed) or 'none'}. Undetermined (too few seeds or missing data): "
              f"{', '.join(open_) or 'none'}.", ""]
    for cid, c in claims.items():
        lines += verdict_lines(cid, c)
    if plots:
        lines += ["", "# Plots", "", "Error bars: ± 1 SE over seeds.", ""] + [f"![{p}]({p})" for p in plots]
    if grids:
        lines += ["", "# Inversions", ""] + [f"![{g}]({g})" for g in grids]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

def series(rows, value):
    """(eps, means, SEs) of value over the rows' eps grid (eps without a value skipped)."""
    out = []
    for e in eps_grid(rows):
        vals = [value(r) for r in rows if same(r["eps"], e) and value(r) is not None]
        if vals:
            out.append((e, *mean_se(vals)))
    return tuple(map(list, zip(*out))) if out else ([], [], [])


def make_plots(rows, out_dir):
    """accuracy_vs_eps.png, transfer_vs_eps.png, fisher_vs_eps.png (log y) with one panel per
    norm group, and tradeoff.png; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    norms = norm_groups(rows)
    if not norms:
        return []

    def curves(norm):
        g = group_rows(rows, norm)
        return g, {
            "accuracy_vs_eps.png": [("clean", clean_acc)]
            + [(f"robust {norm} {format_eps(e)}", robust_at(norm, e)) for e in radii(g, norm)],
            "transfer_vs_eps.png": [(t, transfer_to(t)) for t in sorted({t for r in g for t in r["transfer"]})],
            "fisher_vs_eps.png": [(k, fisher_of(k)) for k in ("weights_trace", "input_trace", "input_lambda_max",
                                                              "repr_trace_normalized")],
        }

    written = []
    for name in ("accuracy_vs_eps.png", "transfer_vs_eps.png", "fisher_vs_eps.png"):
        fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 3.5), squeeze=False)
        drawn = False
        for ax, norm in zip(axes[0], norms):
            g, all_curves = curves(norm)
            for label, value in all_curves[name]:
                eps, means, ses = series(g, value)
                if eps:
                    ax.errorbar(eps, means, yerr=ses, marker="o", capsize=3, label=label)
                    drawn = True
            ax.set_title(f"trained {norm}")
            ax.set_xlabel("training eps")
            if name.startswith("fisher"):
                ax.set_yscale("log")
            if ax.has_data():
                ax.legend(fontsize=7)
        if drawn:
            fig.tight_layout()
            fig.savefig(Path(out_dir) / name, dpi=100)
            written.append(name)
        plt.close(fig)
    target = primary_target(rows)
    if target:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for norm in norms:
            g = group_rows(rows, norm)
            grid, clean, _ = series(g, clean_acc)
            egrid, acc, _ = series(g, transfer_to(target))
            pts = [(c, a, e) for e, c in zip(grid, clean) for e2, a in zip(egrid, acc) if same(e, e2)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=norm)
                for c, a, e in pts:
                    ax.annotate(f"eps {format_eps(e)}", (c, a), fontsize=7)
        ax.set_title("one point per training eps")
        ax.set_xlabel("source clean accuracy")
        ax.set_ylabel(f"{target} linear-probe accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(out_dir) / "tradeoff.png", dpi=100)
        plt.close(fig)
        written.append("tradeoff.png")
    return written


# ----------------------------------------------------------------------------- script

def get_args(argv=None):
    p = ArgumentParser(description="Summarise a results folder and judge claims C1-C6 "
                       "(rules: the RULES table in report.py, printed in report.md).")
    p.add_argument("results_dir", help="folder whose subfolders hold metrics.json (and fisher/transfer/invert.json)")
    return p.parse_args(argv)


def main(args):
    results = Path(args.results_dir)
    if not results.is_dir():
        raise UserError(f"results folder not found: {results}")
    rows = collect_rows(results)
    if not rows:
        raise UserError(f"no run with a metrics.json under {results}")
    claims = judge_claims(rows)
    plots = make_plots(rows, results)
    grids = sorted(p.relative_to(results).as_posix() for p in results.glob("*/invert.png"))
    atomic_save(results / "summary.json", {"rules": RULES, "rows": rows, "claims": claims})
    atomic_save(results / "report.md", markdown(rows, claims, plots, grids))
    for cid, c in claims.items():
        print(f"{cid} {c['verdict']}" + (f" (p={c['p']:.2g})" if c["p"] is not None else ""), flush=True)
    print(f"wrote {results / 'report.md'}, summary.json and {len(plots)} plots ({len(rows)} runs)", flush=True)


if __name__ == "__main__":
    with user_errors():
        main(get_args())
