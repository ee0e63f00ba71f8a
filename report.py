"""Judge the paper's claims C1-C6 on one results folder: report.md, summary.json, plots.

    python report.py --declare quick results/quick   # study.json: the preset's decisions
    python report.py results/quick                   # report.md, summary.json, *.png
    python report.py --rules                         # the rules block of docs/PROTOCOL.md

Every subfolder with a metrics.json is a run; a folder whose name starts with `judge` (the
inversion's helper classifier) is listed but part of no claim. The eps = 0 runs are the
baseline of every training-norm group. Each claim is data (CLAIMS: metrics, contrast,
direction, parts) filled in by the study's declaration (DECLARATIONS, or DIR/study.json), and
one engine judges them all at one of two levels (seeds, models); every rules text is generated
from CLAIMS. numpy and the standard library only (matplotlib, if present, for the plots).
"""
import functools
import itertools
import json
import math
import zipfile
from pathlib import Path
from statistics import NormalDist

import numpy as np

from common import ArgumentParser, UserError, atomic_save, mean_se, provenance, user_errors

ALPHA = 0.05          # one-sided level of every test
MIN_SEEDS = 3         # seeds level: seeds with a run at every eps (df = 1 is no noise estimate)
MIN_MODEL_EPS = 4     # models level: the fewest eps at which a rank test can reject (1/4! < ALPHA)
EXACT_MAX_N = 8       # tied values: every order enumerated up to this many models ...
MONTE_CARLO = 100000  # ... beyond, this many random orders (generator seed 0)
EPS_TOL = 1e-6        # eps and radii are floats (8/255): equal when closer than this
FISHER_KEYS = ("weights_trace", "weights_trace_empirical", "input_trace", "input_lambda_max",
               "repr_trace", "repr_lambda_max", "repr_trace_normalized")
REQUIRED_METRICS = ("norm", "eps", "clean_acc", "robust_acc", "seed")


def declared(radius, transfer):
    """One preset's decisions, fixed before its numbers are seen."""
    return {"reference_radius": dict(radius), "primary_transfer": transfer,
            "inversion_method": "baseline",  # the Engstrom et al. recipe
            "noise_pairs": [["noise", "baseline"], ["noise-tv", "tv"]]}  # (with noise, without)


ROBUSTBENCH_RADII = {"l2": 0.5, "linf": 8 / 255}
DECLARATIONS = {
    "quick": declared({"l2": 0.5}, "fashion-mnist:5-9+invert 10-shot"),
    "paper": declared(ROBUSTBENCH_RADII, "cifar100"),
    "paper-smoke": declared(ROBUSTBENCH_RADII, "synthetic:0-4 2-shot"),
    "imagenet": declared(ROBUSTBENCH_RADII, "cifar100"),
    "imagenet-smoke": declared(ROBUSTBENCH_RADII, "synthetic:0-4 2-shot"),
}

# metric -> (what it is, the declaration key that names its argument, or None)
METRICS = {
    "clean_acc": ("clean source test accuracy", None),
    "robust_acc": ("accuracy under attack at the declared reference radius of the norm",
                   "reference_radius"),
    "transfer": ("accuracy on the declared primary transfer measure", "primary_transfer"),
    "weights_trace": ("tr F_w", None),
    "input_trace": ("tr F_x", None),
    "input_lambda_max": ("lambda_max F_x", None),
    "ssim": ("reconstruction SSIM of the declared inversion method", "inversion_method"),
    "ssim_gain": ("SSIM(a) - SSIM(b) of each declared noise pair (a, b)", "noise_pairs"),
}
# The claims. contrast: trend (over eps), versus_eps0 (some eps > 0 against eps 0, Holm) or
# mean_gain (over the robust runs); parts are combined by intersection-union.
CLAIMS = {
    "C1": {"claim": "robustness costs source accuracy", "contrast": "trend",
           "parts": [{"metric": "clean_acc", "direction": -1},
                     {"metric": "robust_acc", "direction": +1}]},
    "C2": {"claim": "adversarial training improves linear transferability",
           "contrast": "versus_eps0", "parts": [{"metric": "transfer", "direction": +1}]},
    "C3": {"claim": "it reduces the Fisher information of the weights", "contrast": "trend",
           "parts": [{"metric": "weights_trace", "direction": -1, "log": True}]},
    "C4": {"claim": "it reduces the Fisher information about the input", "contrast": "trend",
           "parts": [{"metric": "input_trace", "direction": -1, "log": True},
                     {"metric": "input_lambda_max", "direction": -1, "log": True}]},
    "C5": {"claim": "robust representations are invertible", "contrast": "trend",
           "disjoint": True, "parts": [{"metric": "ssim", "direction": +1}]},
    "C6": {"claim": "the paper's insight (low input Fisher) improves inversion",
           "contrast": "mean_gain", "disjoint": True,
           "parts": [{"metric": "ssim_gain", "direction": +1}]},
}
CONTRASTS = {
    "trend": {
        "part": {+1: "{m} rises with eps", -1: "{m} falls with eps"},
        "seeds": "per seed, the least-squares slope of the metric on eps over the norm's grid "
                 "(eps 0 included); one-sided paired t on the slopes; effect: the mean slope "
                 "per unit eps.",
        "models": "Kendall's tau between eps and the metric over the grid's models (eps 0 "
                  "included), one-sided permutation test: with distinct values exact, from the "
                  "inversion-count (Mahonian) distribution of S = sum over eps_i < eps_j of "
                  "sign(y_j - y_i); with tied values exact by enumerating all n! orders for n <= "
                  f"{EXACT_MAX_N}, else {MONTE_CARLO} random orders from seed 0, p = (1 + count) / "
                  f"(1 + {MONTE_CARLO}). Under no association every assignment of the models' "
                  "values to the eps is equally likely. Undetermined when even the most extreme "
                  "order of these values could not give p < 0.05 (fewer than 4 distinct values). "
                  "Effect: Sen's slope (median pairwise slope) per unit eps, its 90% interval the "
                  "pairwise slopes at Kendall's critical value."},
    "versus_eps0": {
        "part": {+1: "{m} is higher at some eps > 0 than at eps 0",
                 -1: "{m} is lower at some eps > 0 than at eps 0"},
        "seeds": "per seed and eps > 0, metric(eps) - metric(0); one-sided paired t per eps, "
                 "Holm step-down over the eps > 0 family; p: the smallest Holm-adjusted p; "
                 "effect: that eps's mean difference.",
        "models": "per eps > 0, that model against the eps 0 model on the same target test "
                  "examples (transfer.json `correct`). Full-data probe and fine-tuning: exact "
                  "one-sided McNemar test (Binomial(b + c, 1/2) tail, b and c the examples only "
                  "one of the two gets right), Wald interval. Few-shot probe (the same D seeded "
                  "draws for every model): d[k, i] the correctness difference on draw k and "
                  "example i, effect the mean of d, SE^2 = var_k(mean_i d) / D + var_i(mean_k d) "
                  "/ N, because the draws and the examples are both random: under a two-way "
                  "(draw, example) model this sum exceeds the variance of the mean by one "
                  "interaction term, so it is conservative; one-sided t with Welch-Satterthwaite "
                  "degrees of freedom (rounded down). Holm over the eps > 0 family."},
    "mean_gain": {
        "part": {+1: "{m} is above 0 over the robust runs (eps > 0)",
                 -1: "{m} is below 0 over the robust runs (eps > 0)"},
        "seeds": "per seed, the mean over eps > 0 of the run's value; one-sided paired t over "
                 "the seeds.",
        "models": "per image (the same images for every model, invert.json `per_image`), the "
                  "mean over the robust models of the per-image value; one-sided paired t over "
                  "the images."},
}
GENERAL_RULES = [
    f"Levels. `seeds`: at least {MIN_SEEDS} seeds have a run at every eps of the norm's grid; "
    "seed s of every eps shares initialisation and data order, so tests are one-sided paired "
    "t-tests over those seeds (seeds - 1 degrees of freedom), and a verdict speaks of training "
    f"runs with these settings. `models`: fewer complete seeds, at least {MIN_MODEL_EPS} eps in "
    "the norm's grid (the fewest at which the rank test can reject, 1/4! < 0.05: one rule for "
    "every claim, so a grid too small for a trend decides nothing); each eps's model is its run "
    "of the smallest seed; tests are conditional "
    "on those models (their randomness: test examples, images, few-shot draws), and a verdict "
    "holds for these checkpoints only. Where both are possible, seeds decides; neither: "
    "undetermined.",
    f"alpha = {ALPHA}, one-sided, for every test. Effects carry a 90% two-sided interval; the "
    "t and Sen intervals exclude 0 on the claimed side exactly when the test rejects (C2: not "
    "adjusted for the family; Holm decides).",
    "Each norm group (the robust runs of a training norm plus every eps = 0 run) is judged on "
    "its own. Parts and norm groups combine by intersection-union: the claim holds only if "
    "every part holds, does not hold if any part does not, else is undetermined; p, effect and "
    "interval are the deciding part's (the largest p).",
    "Missing data give undetermined with the reason, never another measure: a declared measure "
    "absent, no eps = 0 run, fewer than 2 eps, fewer complete seeds (seeds), a model without "
    "the metric or its per-example or per-image records (models).",
    "C5 and C6: undetermined if an invert.json says its images were not disjoint from those "
    "the inversion was tuned on.",
    "Robust accuracy at a radius is the lowest among the attacks recorded there. Other radii, "
    "transfer measures and inversion methods get the same test as evidence only.",
]
MODELS_SENTENCE = ("A `models` verdict holds for these checkpoints (these models, test examples "
                   "and images); it says nothing about other training runs with the same "
                   "settings, which only a `seeds` verdict speaks of.")


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
    """P(T <= t) for Student's t with df degrees of freedom, from P(T > |t|) =
    I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 = (1 - I_{t^2 / (df + t^2)}(1 / 2, df / 2)) / 2."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if t * t < df:  # near 0 the complementary form keeps precision: P(|T| < |t|) = I_y(1/2, df/2)
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


def t_test(mean, se, df, direction):
    """One-sided t-test that mean > 0 (direction +1) or < 0 (-1) with its 90% interval, which
    excludes 0 on the claimed side exactly when p < 0.05. se 0: p 0 or 1 by the sign."""
    if se > 0:
        t = mean / se
        p = t_cdf(-direction * t, df)
    else:  # identical values: no noise; significant only if strictly on the claimed side
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if direction * mean > 0 else 1.0
    half = t_quantile(1 - ALPHA, df) * se
    return {"mean": mean, "se": se, "t": t, "df": df, "p": p, "ci": [mean - half, mean + half]}


def one_sided_t(values, direction):
    """One-sample t-test of mean(values) > 0 (direction +1) or < 0 (direction -1).
    Returns {n, mean, se, t, df, p, ci}; ci is the 90% two-sided interval."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v)))
    return {"n": len(v), **t_test(float(v.mean()), se, len(v) - 1, direction)}


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


def kendall_s(y):
    """Kendall's S of values y [..., n] listed in increasing eps: sum_{i<j} sign(y_j - y_i)."""
    i, j = np.triu_indices(y.shape[-1], 1)
    return np.sign(y[..., j] - y[..., i]).sum(-1)


@functools.lru_cache(maxsize=None)
def inversion_pmf(n):
    """P(k inversions), k = 0 .. n(n-1)/2, in a uniform random order of n distinct values (the
    Mahonian numbers / n!): S = n(n-1)/2 - 2 k. A product of uniforms on 0..m-1 (Lehmer code)."""
    pmf = np.ones(1)
    for m in range(2, n + 1):
        pmf = np.convolve(pmf, np.ones(m) / m)
    return pmf


@functools.lru_cache(maxsize=None)
def all_orders(n):
    return np.array(list(itertools.permutations(range(n))))


def kendall_test(y, direction):
    """Exact one-sided permutation test of Kendall's tau between position (increasing eps) and
    y: tau > 0 (direction +1) or < 0 (-1). Returns {tau, p, p_min, method}; p_min is the p of
    the most extreme order of these values (the test cannot reject when p_min >= alpha)."""
    y = direction * np.asarray(y, dtype=np.float64)
    n, pairs = len(y), len(y) * (len(y) - 1) // 2
    s, best = kendall_s(y), kendall_s(np.sort(y))
    if len(np.unique(y)) == n:
        cdf = np.cumsum(inversion_pmf(n))
        p, p_min, method = cdf[round((pairs - s) / 2)], cdf[0], "exact, inversion counts"
    elif n <= EXACT_MAX_N:
        null = kendall_s(y[all_orders(n)])
        p, p_min, method = np.mean(null >= s - 0.5), np.mean(null >= best - 0.5), "exact, n! orders"
    else:
        orders = np.random.default_rng(0).permuted(np.tile(y, (MONTE_CARLO, 1)), axis=1)
        null = kendall_s(orders)
        p, p_min = [(1 + np.sum(null >= v - 0.5)) / (1 + MONTE_CARLO) for v in (s, best)]
        method = f"Monte Carlo, {MONTE_CARLO} orders"
    ties = sum(c * (c - 1) // 2 for c in np.unique(y, return_counts=True)[1])
    tau = direction * s / math.sqrt(pairs * (pairs - ties)) if pairs > ties else 0.0
    return {"tau": float(tau), "p": float(p), "p_min": float(p_min), "method": method}


def sen_slope(x, y):
    """Sen's slope of y on x (the median pairwise slope) and its 90% interval: the pairwise
    slopes of ranks k + 1 and N - k, k the largest inversion count with null CDF < alpha."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), 1)
    slopes = np.sort((y[j] - y[i]) / (x[j] - x[i]))
    below = np.flatnonzero(np.cumsum(inversion_pmf(len(x))) < ALPHA)
    ci = [float(slopes[below[-1]]), float(slopes[-1 - below[-1]])] if len(below) else None
    return float(np.median(slopes)), ci


def example_test(a, b, direction):
    """Paired one-sided test that model a is more (direction +1) or less accurate than b on
    the same test examples. a, b: 0/1 correctness [N] (exact McNemar, Wald interval) or
    [draws, N] (few-shot probes on the same draws: t with the draws-plus-examples SE)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean, n = float(d.mean()), d.shape[-1]
    if d.ndim == 1:
        wins, losses = int(np.sum(direction * d > 0)), int(np.sum(direction * d < 0))
        p = betainc(wins, losses + 1, 0.5) if wins else 1.0  # P(Bin(wins + losses, 1/2) >= wins)
        se = math.sqrt(max(wins + losses - n * mean ** 2, 0)) / n  # of the mean of d in {-1, 0, 1}
        half = NormalDist().inv_cdf(1 - ALPHA) * se
        return {"n": n, "mean": mean, "p": p, "ci": [mean - half, mean + half], "test": "McNemar"}
    parts = [(d.mean(1).var(ddof=1) / len(d), len(d) - 1) if len(d) > 1 else (0.0, 0),
             (d.mean(0).var(ddof=1) / n, n - 1)]
    var = sum(v for v, _ in parts)
    df = var ** 2 / sum(v ** 2 / k for v, k in parts if v > 0) if var > 0 else n - 1
    return {"n": n, **t_test(mean, math.sqrt(var), max(1, math.floor(df)), direction),
            "test": f"{len(d)} draws"}


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
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and {"norm", "eps", "acc"} <= set(r) for r in records):
        raise UserError(f"{path}: robust_acc must be a list of {{norm, eps, acc, ...}} records")
    keep = ("norm", "eps", "attack", "steps", "restarts", "acc")
    return [{k: r[k] for k in keep if k in r} for r in records]


def transfer_measures(transfer):
    """{measure: accuracy} of a transfer.json: per target (an entry holding `acc`), its full-data
    probe ("target"), its K-shot probes ("target K-shot") and fine-tuning ("target fine-tuned")."""
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


def per_example(run, transfer):
    """{measure: 0/1 correctness} from the .npz files that transfer.json names under `correct`:
    "probe" [N] -> "target", "<K>-shot" [draws, N] -> "target K-shot", "fine-tuned" [N]."""
    out = {}
    for target, v in transfer.items():
        if not isinstance(v, dict) or not isinstance(v.get("correct"), str):
            continue
        path = run / v["correct"]
        if not path.is_file():
            continue
        try:
            with np.load(path) as npz:
                out.update({target if k == "probe" else f"{target} {k}": npz[k] for k in npz.files})
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"{path} is not a readable .npz ({e})")
    return out


def inversion(v):
    """One method of invert.json: ssim, psnr, judge_acc and per-image SSIM (None when absent)."""
    out = {k: number(v.get(k)) for k in ("ssim", "psnr", "judge_acc")}
    images = v["per_image"].get("ssim") if isinstance(v.get("per_image"), dict) else None
    ok = isinstance(images, list) and images and all(number(x) is not None for x in images)
    out["per_image_ssim"] = [float(x) for x in images] if ok else None
    return out


def collect_run(run):
    """One row (nested dict) for the run folder `run`."""
    path = run / "metrics.json"
    m = read_json(path, required=True)
    missing = [k for k in REQUIRED_METRICS if k not in m]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a metrics.json of advtrain.py")
    if number(m["eps"]) is None or number(m["eps"]) < 0 or number(m["clean_acc"]) is None \
            or not isinstance(m["seed"], int):
        raise UserError(f"{path}: eps and clean_acc must be numbers (eps >= 0), seed an integer")
    row = {"run": run.name, "role": "judge" if run.name.startswith("judge") else "study",
           "norm": m["norm"], "eps": float(m["eps"]), "seed": m["seed"],
           "clean_acc": float(m["clean_acc"]), "robust_acc": robust_records(path, m["robust_acc"])}
    row.update({k: m[k] for k in ("arch", "dataset", "classes", "epochs", "train_seconds")
                if k in m})
    fisher = read_json(run / "fisher.json") or {}
    row["fisher"] = {k: number(fisher[k]) for k in FISHER_KEYS if number(fisher.get(k)) is not None}
    transfer = read_json(run / "transfer.json") or {}
    row["transfer"], row["correct"] = transfer_measures(transfer), per_example(run, transfer)
    invert = read_json(run / "invert.json") or {}
    row["invert"] = {meth: inversion(v) for meth, v in invert.items()
                     if isinstance(v, dict) and "ssim" in v}
    disjoint = invert.get("disjoint")
    row["invert_disjoint"] = disjoint if isinstance(disjoint, bool) else None
    return row


def collect_rows(results_dir):
    """One row per run folder (a subfolder holding metrics.json): study runs in numeric eps
    order (then norm, seed), the judge runs last."""
    rows = [collect_run(p.parent) for p in Path(results_dir).glob("*/metrics.json")]
    return sorted(rows, key=lambda r: (r["role"] != "study", r["eps"], r["norm"], r["seed"]))


def declaration_problem(d):
    """What is wrong with the decisions of a study.json (None when they are well formed)."""
    keys = DECLARATIONS["quick"]
    if not isinstance(d, dict) or set(d) != set(keys):
        return f"\"decisions\" must be an object with keys {', '.join(keys)}"
    radius, pairs = d["reference_radius"], d["noise_pairs"]
    if not isinstance(radius, dict) or not all(number(v) and v > 0 for v in radius.values()):
        return "reference_radius must map norm names to radii > 0"
    if not all(isinstance(d[k], str) and d[k] for k in ("primary_transfer", "inversion_method")):
        return "primary_transfer and inversion_method must be non-empty strings"
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, list) and len(p) == 2
                                                           and all(isinstance(m, str) for m in p)
                                                           for p in pairs):
        return "noise_pairs must be a non-empty list of [method with noise, method without]"
    return None


def read_declaration(results):
    """{preset, decisions, source} from results/study.json; without one, the quick preset's."""
    path = results / "study.json"
    if not path.is_file():
        print(f"no study.json in {results}: applying the defaults, DECLARATIONS[\"quick\"]",
              flush=True)
        return {"preset": "quick", "decisions": DECLARATIONS["quick"], "source": "defaults"}
    study = read_json(path, required=True)
    problem = declaration_problem(study.get("decisions"))
    if problem:
        raise UserError(f"{path}: {problem}")
    return {"preset": study.get("preset"), "decisions": study["decisions"], "source": "study.json"}


# ----------------------------------------------------------------------------- rows and groups

def same(a, b):
    return abs(a - b) < EPS_TOL


def robust_acc(row, norm, radius):
    """Accuracy of the run under attack at (norm, radius): the worst attack recorded there."""
    accs = [number(r["acc"]) for r in row["robust_acc"]
            if r["norm"] == norm and number(r["eps"]) is not None and same(r["eps"], radius)]
    accs = [a for a in accs if a is not None]
    return min(accs) if accs else None


def metric_value(row, metric, arg):
    """The number a part reads from a run (None when absent)."""
    if metric == "clean_acc":
        return row["clean_acc"]
    if metric == "robust_acc":
        return robust_acc(row, *arg)
    if metric == "transfer":
        return row["transfer"].get(arg)
    if metric == "ssim":
        return row["invert"].get(arg, {}).get("ssim")
    if metric == "ssim_gain":
        a, b = (metric_value(row, "ssim", method) for method in arg)
        return None if a is None or b is None else a - b
    return row["fisher"].get(metric)


def metric_items(row, metric, arg):
    """The per-example (transfer) or per-image (ssim_gain) values of a run, or None."""
    if metric == "transfer":
        return row["correct"].get(arg)
    a, b = (row["invert"].get(method, {}).get("per_image_ssim") for method in arg)
    return None if a is None or b is None or len(a) != len(b) else np.subtract(a, b)


def part_value(part):
    """row -> the part's number: its natural log where the spec says log (None if not > 0)."""
    def value(row):
        v = metric_value(row, part["metric"], part["arg"])
        if part.get("log"):
            return math.log(v) if v is not None and v > 0 else None
        return v
    return value


def with_arg(part, arg):
    """The part with its argument and its name in the evidence ('ln weights_trace')."""
    metric = part["metric"]
    if metric == "robust_acc":
        name = f"robust acc ({arg[0]} {fmt(arg[1])})" if arg else "robust acc"
    elif metric == "ssim_gain":
        name = f"ssim {arg[0]} - {arg[1]}"
    else:
        name = {"clean_acc": "clean acc", "transfer": f"{arg} acc", "ssim": f"{arg} ssim"}.get(
            metric, metric)
    return dict(part, arg=arg, name=("ln " if part.get("log") else "") + name)


def expand(part, decisions, norm):
    """The spec part with its argument from the declaration (one part per noise pair)."""
    key = METRICS[part["metric"]][1]
    if key == "reference_radius":
        radius = decisions[key].get(norm)
        return [with_arg(part, None if radius is None else (norm, radius))]
    args = [None] if key is None else [tuple(p) for p in decisions[key]] if key == "noise_pairs" \
        else [decisions[key]]
    return [with_arg(part, a) for a in args]


def alternatives(rows, part, norm):
    """The part on the other radii, transfer measures or inversion methods of the runs."""
    key = METRICS[part["metric"]][1]
    if key == "reference_radius":
        found = [(norm, e) for e in radii(rows, norm)
                 if all(robust_acc(r, norm, e) is not None for r in rows)]
        found = [a for a in found if part["arg"] is None or not same(a[1], part["arg"][1])]
    elif key in ("primary_transfer", "inversion_method"):
        found = sorted({k for r in rows for k in r["transfer" if key[0] == "p" else "invert"]}
                       - {part["arg"]})
    else:
        found = []
    return [with_arg(part, a) for a in found]


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
    seeds = sorted(s for s, c in cells.items() if len(c) == len(grid))
    Y = np.array([[np.mean(cells[s][j]) for j in range(len(grid))] for s in seeds])
    return seeds, Y.reshape(len(seeds), len(grid))


def study_level(rows):
    """'seeds' when MIN_SEEDS seeds have a run at every eps of the group's grid, else 'models'
    when the grid has MIN_MODEL_EPS eps, else None; with the number of complete seeds."""
    grid = eps_grid(rows)
    complete = len(paired(rows, lambda r: 1.0, grid)[0])
    return ("seeds" if complete >= MIN_SEEDS else "models" if len(grid) >= MIN_MODEL_EPS
            else None), complete


def missing_data(rows, value, grid, name, need_zero):
    """Why the data cannot decide at either level (None when they can)."""
    if not any(value(r) is not None for r in rows):
        return f"no run reports {name}"
    if need_zero and not (grid and same(grid[0], 0)):
        return "no eps = 0 run"
    if len(grid) < (2 if need_zero else 1):
        return "fewer than 2 eps values" if need_zero else "no eps > 0 run"
    return None


# ----------------------------------------------------------------------------- the engine

VERDICTS = {True: "holds", False: "does not hold", None: "undetermined"}


def result(holds, evidence, level=None, n=0, p=None, effect=None, ci=None):
    """A verdict with its evidence: the shape of every claim, norm group and part."""
    return {"verdict": VERDICTS[holds], "holds": holds, "level": None if holds is None else level,
            "evidence": evidence, "test": "", "p": p, "effect": effect, "ci": ci,
            "n_seeds": n if level == "seeds" else 0, "n_models": n if level == "models" else 0}


def combine(parts, label=lambda key: ""):
    """Parts (intersection-union) or norm groups into one verdict: does not hold if any part
    does not; else undetermined if any is; else holds. p, effect and CI are those of the
    deciding part (the largest p among the failing parts, or among all when all hold)."""
    items = list(parts.items()) if isinstance(parts, dict) else list(enumerate(parts))
    found = [r["holds"] for _, r in items]
    holds = False if False in found else None if None in found or not items else True
    level = "models" if any(r["level"] == "models" for _, r in items) else "seeds"
    out = result(holds, "; ".join(f"{label(k)}{r['evidence']}" for k, r in items), level)
    out["n_seeds"] = min((r["n_seeds"] for _, r in items), default=0)
    out["n_models"] = min((r["n_models"] for _, r in items), default=0)
    if holds is not None:
        deciding = max((r for _, r in items if r["holds"] is holds), key=lambda r: r["p"])
        out.update(p=deciding["p"], effect=deciding["effect"], ci=deciding["ci"])
    return out


def t_summary(s, what, unit, extra=""):
    return {"p": s["p"], "effect": s["mean"], "ci": s["ci"],
            "text": f"{what} {fmt(s['mean'], True)} {ci_text(s['ci'])}, t({s['df']}) = "
                    f"{fmt(s['t'])}, p = {fmt(s['p'])} ({s['n']} {unit}{extra})"}


def holm_family(grid, tests, unit, extra=""):
    """C2's family: one test per eps > 0 against eps 0, Holm-adjusted; the best eps decides."""
    adjusted = holm([t["p"] for t in tests])
    b = int(np.argmin(adjusted))
    t = tests[b]
    each = ", ".join(f"eps {fmt(e)}: {fmt(s['mean'], True)} (p = {fmt(s['p'])}, Holm {fmt(a)})"
                     for e, s, a in zip(grid[1:], tests, adjusted))
    return {"p": adjusted[b], "effect": t["mean"], "ci": t["ci"],
            "text": f"minus eps 0 at eps {fmt(grid[b + 1])}: {fmt(t['mean'], True)} "
                    f"{ci_text(t['ci'])}, Holm-adjusted p = {fmt(adjusted[b])} ({t['n']} {unit}"
                    f"{extra}; per eps: {each})"}


def seeds_test(contrast, grid, Y, direction):
    """The seeds-level test of a contrast on Y [seeds, eps] (complete seeds)."""
    if contrast == "trend":
        means = ", ".join(f"{fmt(e)}: {fmt(m)}" for e, m in zip(grid, Y.mean(0)))
        return t_summary(one_sided_t([slope(grid, y) for y in Y], direction),
                         "slope per unit eps", "seeds", f"; means by eps {means}")
    if contrast == "versus_eps0":
        tests = [one_sided_t(Y[:, j] - Y[:, 0], direction) for j in range(1, len(grid))]
        return holm_family(grid, tests, "seeds", f"; eps 0 mean {fmt(Y[:, 0].mean())}")
    return t_summary(one_sided_t(Y.mean(1), direction), "mean over eps > 0", "seeds")


def models_test(contrast, grid, models, part):
    """The models-level test of a contrast on one model per eps (p None: cannot decide)."""
    d = part["direction"]
    if contrast == "trend":
        y = [part_value(part)(m) for m in models]
        k, (sen, ci) = kendall_test(y, d), sen_slope(grid, y)
        values = ", ".join(f"{fmt(e)}: {fmt(v)}" for e, v in zip(grid, y))
        if k["p_min"] >= ALPHA:
            return {"p": None, "text": f"the rank test on these {len(y)} models cannot reach "
                                       f"p < {ALPHA} (best possible p = {fmt(k['p_min'])})"}
        return {"p": k["p"], "effect": sen, "ci": ci,
                "text": f"Sen slope per unit eps {fmt(sen, True)} {ci_text(ci)}, Kendall tau "
                        f"{fmt(k['tau'], True)}, p = {fmt(k['p'])} ({k['method']}; "
                        f"{len(y)} models; values by eps {values})"}
    items = [metric_items(m, part["metric"], part["arg"]) for m in models]
    if contrast == "versus_eps0":
        tests = [example_test(a, items[0], d) for a in items[1:]]
        return holm_family(grid, tests, f"test examples, {tests[0]['test']}")
    return t_summary(one_sided_t(np.mean(items, 0), d), "mean over robust models", "images")


def judge_part(rows, contrast, part, level):
    """One part at one level: the missing-data rules, then the level's test."""
    name, value = part["name"], part_value(part)
    if part["arg"] is None and METRICS[part["metric"]][1]:
        return result(None, f"{name}: no reference radius declared for this norm", level)
    if contrast == "mean_gain":
        rows = [r for r in rows if not same(r["eps"], 0)]
    grid = eps_grid(rows)
    reason = missing_data(rows, value, grid, name, need_zero=contrast != "mean_gain")
    if level == "seeds":
        seeds, Y = paired(rows, value, grid)
        n = len(seeds)
        if not reason and n < MIN_SEEDS:
            reason = f"{n} seed(s) have {name} at every eps {eps_list(grid)} (needs {MIN_SEEDS})"
    else:
        models = [min((r for r in rows if same(r["eps"], e)), key=lambda r: r["seed"])
                  for e in grid]
        n = len(models)
        lacking = [m["run"] for m in models if value(m) is None]
        if contrast != "trend":
            items = [metric_items(m, part["metric"], part["arg"]) for m in models]
            lacking += [m["run"] for m, a in zip(models, items)
                        if a is None and value(m) is not None]
            shapes = {np.shape(a) for a in items if a is not None}
            if not lacking and len(shapes) > 1:
                reason = reason or f"the per-example records of {name} differ in shape"
        what = "per-example records" if part["metric"] == "transfer" else "per-image SSIM"
        if lacking and not reason:
            reason = f"{', '.join(lacking)} lack {name}" + ("" if contrast == "trend"
                                                             else f" or its {what}")
    if reason:
        return result(None, f"{name}: undetermined at level {level}, {reason}", level, n)
    test = seeds_test(contrast, grid, Y, part["direction"]) if level == "seeds" \
        else models_test(contrast, grid, models, part)
    if test["p"] is None:
        return result(None, f"{name}: undetermined at level {level}, {test['text']}", level, n)
    return result(test["p"] < ALPHA, f"{name}: {test['text']}", level, n, test["p"],
                  test["effect"], test["ci"])


def judge_group(spec, rows, decisions, norm):
    """One claim on one norm group: its level, its parts (intersection-union), and the same
    test on the alternatives of its declared argument as evidence only."""
    level, complete = study_level(rows)
    if level is None:
        return result(None, f"undetermined: {complete} complete seed(s) (seeds level needs "
                            f"{MIN_SEEDS}) and {len(eps_grid(rows))} eps (models level needs "
                            f"{MIN_MODEL_EPS})", "seeds", complete)
    if spec.get("disjoint") and any(r["invert_disjoint"] is False for r in rows):
        bad = ", ".join(r["run"] for r in rows if r["invert_disjoint"] is False)
        return result(None, f"invert.json of {bad} says its evaluation images were not "
                            "disjoint from the images the inversion was tuned on", level)
    parts = [p for part in spec["parts"] for p in expand(part, decisions, norm)]
    res = combine([judge_part(rows, spec["contrast"], p, level) for p in parts])
    extra = [judge_part(rows, spec["contrast"], alt, level)["evidence"]
             for alt in alternatives(rows, parts[0], norm)]
    if extra:
        res["evidence"] += "; evidence only: " + "; ".join(extra)
    return res


def judge_claims(rows, decisions=None):
    """{claim id: verdict with by_norm} for every claim of CLAIMS, each norm group on its own,
    under the declared decisions (default: the quick preset's)."""
    decisions = decisions or DECLARATIONS["quick"]
    claims = {}
    for cid, spec in CLAIMS.items():
        by_norm = {norm: judge_group(spec, group_rows(rows, norm), decisions, norm)
                   for norm in norm_groups(rows)}
        claim = combine(by_norm, label=lambda norm: f"[{norm}] ") if by_norm \
            else result(None, "no study run")
        for r in [claim, *by_norm.values()]:
            r["test"] = rule_text(cid)
        claims[cid] = dict(claim, by_norm=by_norm)
    return claims


# ----------------------------------------------------------------------------- rules text

def part_text(contrast, part):
    """'ln tr F_w falls with eps': the part's claim in words, from the spec."""
    what = ("ln " if part.get("log") else "") + METRICS[part["metric"]][0]
    return CONTRASTS[contrast]["part"][part["direction"]].format(m=what)


def rule_text(cid):
    spec = CLAIMS[cid]
    parts = " and ".join(part_text(spec["contrast"], p) for p in spec["parts"])
    return f"{parts} (every part; contrast {spec['contrast']}, see the rules)"


def rules_markdown():
    """The rules, generated from CLAIMS, CONTRASTS, GENERAL_RULES and DECLARATIONS."""
    lines = ["Generated from the specification in report.py (`python report.py --rules`).", "",
             "| claim | holds when (every part) | contrast |", "|---|---|---|"]
    lines += [f"| {cid}: {s['claim']} | " + "; ".join(part_text(s["contrast"], p)
                                                     for p in s["parts"]) + f" | {s['contrast']} |"
              for cid, s in CLAIMS.items()]
    lines += ["", "Contrasts, at each level:", ""]
    for name, c in CONTRASTS.items():
        lines += [f"- **{name}**", f"  - seeds: {c['seeds']}", f"  - models: {c['models']}"]
    lines += ["", "General rules:", ""] + [f"- {text}" for text in GENERAL_RULES]
    lines += ["", "Declarations (DIR/study.json; without one, quick's):", "",
              "| preset | reference radius | primary transfer | inversion method | noise pairs |",
              "|---|---|---|---|---|"]
    for name, d in DECLARATIONS.items():
        radius = ", ".join(f"{k} {fmt(v)}" for k, v in d["reference_radius"].items())
        pairs = ", ".join(f"{a} vs {b}" for a, b in d["noise_pairs"])
        lines.append(f"| {name} | {radius} | {d['primary_transfer']} | {d['inversion_method']} "
                     f"| {pairs} |")
    return "\n".join(lines) + "\n"


RULES_BEGIN = "<!-- rules: generated by report.py --rules; do not edit -->"
RULES_END = "<!-- end rules -->"


# ----------------------------------------------------------------------------- report.md

def fmt(x, sign=False):
    """A number at three significant digits ('n/a' for None): the one format of the report."""
    return "n/a" if x is None else f"{x:+.3g}" if sign else f"{x:.3g}"


def ci_text(ci, label="90% CI "):
    return f"[{label}n/a]" if ci is None else f"[{label}{fmt(ci[0], True)}, {fmt(ci[1], True)}]"


def eps_list(grid):
    return "(" + ", ".join(fmt(e) for e in grid) + ")"


def cell(values):
    """'mean ± SE' over the runs that have the value ('' when none)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    m, se = mean_se(values)
    return f"{fmt(m)} ± {fmt(se)}" if len(values) > 1 else fmt(m)


def metric_of(metric, arg=None):
    return lambda row: metric_value(row, metric, arg)


def columns(rows):
    """{table title: [(header, value of a row)]} for every quantity present in some run."""
    norms = sorted({a["norm"] for r in rows for a in r["robust_acc"]})
    measures = sorted({t for r in rows for t in r["transfer"]})
    methods = sorted({m for r in rows for m in r["invert"]})
    return {
        "Accuracy": [("clean acc", metric_of("clean_acc"))] + [
            (f"robust {n} {fmt(e)}", metric_of("robust_acc", (n, e)))
            for n in norms for e in radii(rows, n)],
        "Fisher information": [(k, metric_of(k)) for k in FISHER_KEYS
                               if any(k in r["fisher"] for r in rows)],
        "Linear transfer": [(t, metric_of("transfer", t)) for t in measures],
        "Inversion": [(f"{m} {k}", (lambda m, k: lambda r: r["invert"].get(m, {}).get(k))(m, k))
                      for m in methods for k in ("ssim", "psnr", "judge_acc")]}


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


def results_tables(rows):
    """One Markdown table per group of columns; a row per (norm, eps), skipping empty rows."""
    lines = []
    for title, cols in columns(rows).items():
        if cols:
            lines += [f"### {title}", "", "| norm | eps | seeds | " + " | ".join(h for h, _ in cols)
                      + " |", "|" + "---|" * (3 + len(cols))]
            for label, e, runs in table_cells(rows):
                values = [cell([f(r) for r in runs]) for _, f in cols]
                if any(values):
                    lines.append(f"| {label} | {fmt(e)} | {len({r['seed'] for r in runs})} | "
                                 + " | ".join(values) + " |")
            lines.append("")
    return lines


def markdown(rows, claims, declaration, figures):
    d = declaration["decisions"]
    radius = ", ".join(f"{k} {fmt(v)}" for k, v in d["reference_radius"].items())
    lines = ["# Results", "", "| claim | verdict | level | effect [90% CI] | p | seeds or models |",
             "|---|---|---|---|---|---|"]
    for cid, c in claims.items():
        n = f"{c['n_seeds']} seeds" if c["level"] == "seeds" else \
            f"{c['n_models']} models" if c["level"] == "models" else "n/a"
        effect = "n/a" if c["effect"] is None else \
            f"{fmt(c['effect'], True)} {ci_text(c['ci'], '')}"
        lines.append(f"| {cid}: {CLAIMS[cid]['claim']} | **{c['verdict']}** | "
                     f"{c['level'] or 'n/a'} | {effect} | {fmt(c['p'])} | {n} |")
    lines += ["", MODELS_SENTENCE, "",
              f"Declaration ({declaration['source']}, preset {declaration['preset']}): reference "
              f"radius {radius}; primary transfer `{d['primary_transfer']}`; inversion method "
              f"`{d['inversion_method']}`; noise pairs "
              + ", ".join(f"{a} vs {b}" for a, b in d["noise_pairs"]) + "."]
    if figures:
        lines += ["", "## Plots", "", "Error bars: ± 1 SE over seeds.", ""]
        lines += [f"![{f}]({f})" for f in figures]
    lines += ["", "## Tables", "", "Mean ± SE over seeds (seeds: the runs a row averages). "
              "Robust accuracy: the worst attack recorded at the norm and radius. The judge run "
              "only labels reconstructions and is part of no claim.", ""] + results_tables(rows)
    lines += ["## Evidence", ""]
    for cid, c in claims.items():
        lines.append(f"- **{cid} {c['verdict']}**: {c['test']}")
        lines += [f"  - {norm}: **{r['verdict']}**. {r['evidence']}"
                  for norm, r in c["by_norm"].items()]
    return "\n".join(lines + ["", "## Rules", "", rules_markdown()])


# ----------------------------------------------------------------------------- figures

def series(rows, value):
    """(eps, means, SEs) of value over the rows' eps grid (eps without a value skipped)."""
    out = []
    for e in eps_grid(rows):
        vals = [value(r) for r in rows if same(r["eps"], e) and value(r) is not None]
        if vals:
            out.append((e, *mean_se(vals)))
    return tuple(map(list, zip(*out))) if out else ([], [], [])


def panels_figure(plt, path, panel_rows, ylabel, log=False):
    """Rows of panels (title, runs, [(label, value of a run)]): mean ± SE against eps, the
    legend under each panel; False (nothing written) when no panel has data."""
    ncols = max(len(r) for r in panel_rows)
    fig, axes = plt.subplots(len(panel_rows), ncols, figsize=(4.6 * ncols, 4.4 * len(panel_rows)),
                             squeeze=False)
    for ax_row, panels in zip(axes, panel_rows):
        for ax, (title, rows, curves) in zip(ax_row, panels):
            for label, value in curves:
                eps, means, ses = series(rows, value)
                if eps:
                    ax.errorbar(eps, means, yerr=ses, marker="o", capsize=3, label=label)
            positive = [e for e in eps_grid(rows) if e > 0]
            if positive and max(positive) / min(positive) > 50:  # published grids: 0.01 .. 5
                ax.set_xscale("symlog", linthresh=min(positive))
            ax.set(title=title, xlabel="training eps", ylabel=ylabel,
                   yscale="log" if log else "linear")
            if ax.has_data():
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        for ax in ax_row[len(panels):]:
            ax.set_axis_off()
    drawn = any(ax.has_data() for ax in axes.flat)
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return drawn


def image_strip(x, n_images, size=64):
    """[N, C, H, W] in [0, 1] -> [H', n_images * W', 3]: the first images side by side, RGB,
    subsampled to at most size pixels, each with a 1-pixel white frame."""
    x = np.asarray(x[:n_images], dtype=np.float32).clip(0, 1)
    x = x[..., ::-(-x.shape[-2] // size), ::-(-x.shape[-1] // size)]
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1.0)
    x = np.repeat(x, 3, 1) if x.shape[1] == 1 else x[:, :3]
    return x.transpose(2, 0, 3, 1).reshape(x.shape[2], -1, 3)


def inversion_figure(plt, rows, results, n_images=8):
    """inversions.png: the first n_images inverted test images (originals.npy, when a run saved
    it) and a labelled row per (eps, method) from the first seed's runs, eps in numeric order."""
    study = [r for r in study_rows(rows) if r["invert"]]
    if not study:
        return False
    first = min(r["seed"] for r in study)
    strips, labels = [], []
    for r in (r for r in study if r["seed"] == first):
        run = results / r["run"]
        if not strips and (run / "originals.npy").is_file():
            strips.append(image_strip(np.load(run / "originals.npy"), n_images))
            labels.append("originals")
        for method in sorted(r["invert"]):
            if (run / f"recon_{method}.npy").is_file():
                strips.append(image_strip(np.load(run / f"recon_{method}.npy"), n_images))
                labels.append(f"{r['norm']} eps {fmt(r['eps'])}: {method}")
    strips = [(s, lab) for s, lab in zip(strips, labels) if s.shape == strips[0].shape] \
        if strips else []
    if not strips:
        return False
    mosaic = np.concatenate([s for s, _ in strips])
    h = strips[0][0].shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n_images, 0.6 + 0.9 * len(strips)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([h * (i + 0.5) for i in range(len(strips))], [lab for _, lab in strips],
                  fontsize=8)
    ax.set_xticks([])
    ax.set_xlabel(f"the first {n_images} inverted test images (seed {first})")
    fig.savefig(results / "inversions.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def make_figures(rows, results):
    """accuracy_vs_eps.png, fisher_vs_eps.png (log y), transfer_vs_eps.png (full data,
    few-shot, fine-tuned panels per norm), inversions.png; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = [(norm, group_rows(rows, norm)) for norm in norm_groups(rows)]
    if not groups:
        return []

    def kind(measure):
        return "fine-tuned" if measure.endswith("fine-tuned") else \
            "few-shot" if measure.endswith("-shot") else "full data"

    measures = sorted({t for r in rows for t in r["transfer"]})
    fisher = ("weights_trace", "input_trace", "input_lambda_max", "repr_trace_normalized")
    kinds = [k for k in ("full data", "few-shot", "fine-tuned")
             if any(kind(t) == k for t in measures)]
    figures = {  # rows of panels: accuracy and Fisher one row, transfer a row per norm
        "accuracy_vs_eps.png": ("accuracy", False, [[
            (f"trained {n}", g, [("clean", metric_of("clean_acc"))] + [
                (f"robust {n} {fmt(e)}", metric_of("robust_acc", (n, e))) for e in radii(g, n)])
            for n, g in groups]]),
        "fisher_vs_eps.png": ("Fisher information (log scale)", True, [[
            (f"trained {n}", g, [(k, metric_of(k)) for k in fisher]) for n, g in groups]]),
        "transfer_vs_eps.png": ("target test accuracy", False, [[
            (f"{k}, trained {n}", g, [(t, metric_of("transfer", t)) for t in measures
                                      if kind(t) == k]) for k in kinds] for n, g in groups]),
    }
    written = [name for name, (ylabel, log, panels) in figures.items()
               if all(panels) and panels_figure(plt, results / name, panels, ylabel, log)]
    return written + (["inversions.png"] if inversion_figure(plt, rows, results) else [])


# ----------------------------------------------------------------------------- script

def get_args(argv=None):
    p = ArgumentParser(description="Judge claims C1-C6 on a results folder (report.md, "
                       "summary.json, plots), by the study's declaration (DIR/study.json).")
    p.add_argument("results_dir", nargs="?", help="folder whose subfolders hold metrics.json "
                   "(and fisher.json, transfer.json, invert.json)")
    p.add_argument("--declare", choices=sorted(DECLARATIONS), metavar="PRESET",
                   help="write RESULTS_DIR/study.json with the decisions of this preset ("
                   + ", ".join(DECLARATIONS) + ") and judge nothing")
    p.add_argument("--rules", action="store_true", help="print the rules block of docs/PROTOCOL.md")
    return p.parse_args(argv)


def main(args):
    if args.rules:
        print(f"{RULES_BEGIN}\n{rules_markdown()}{RULES_END}")
        return
    if args.results_dir is None:
        raise UserError("give a results folder (or --rules)")
    results = Path(args.results_dir)
    if args.declare:
        decisions = DECLARATIONS[args.declare]
        atomic_save(results / "study.json", {"preset": args.declare, "decisions": decisions,
                                             "provenance": provenance({"preset": args.declare})})
        print(f"wrote {results / 'study.json'} (preset {args.declare})")
        return
    if not results.is_dir():
        raise UserError(f"results folder not found: {results}")
    declaration = read_declaration(results)
    rows = collect_rows(results)
    if not rows:
        raise UserError(f"no run with a metrics.json under {results}")
    claims = judge_claims(rows, declaration["decisions"])
    figures = make_figures(rows, results)
    kept = [{k: v for k, v in r.items() if k != "correct"} for r in rows]
    atomic_save(results / "summary.json", {"declaration": declaration, "rules": rules_markdown(),
                                           "rows": kept, "claims": claims})
    atomic_save(results / "report.md", markdown(rows, claims, declaration, figures))
    for cid, c in claims.items():
        print(f"{cid} {c['verdict']}" + (f" (p={fmt(c['p'])}, level {c['level']})"
                                         if c["p"] is not None else ""), flush=True)
    print(f"wrote {results / 'report.md'}, summary.json and {len(figures)} figures "
          f"({len(rows)} runs)", flush=True)


if __name__ == "__main__":
    with user_errors():
        main(get_args())
