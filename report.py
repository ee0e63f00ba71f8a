"""Judge the paper's claims C1-C6 on one results folder: report.md, summary.json, plots.

    python report.py --declare quick results/quick   # study.json: the preset's decisions
    python report.py --declare quick results/quick --redeclare  # replace them (recorded)
    python report.py results/quick                   # report.md, summary.json, *.png
    python report.py --rules                         # the rules block of docs/PROTOCOL.md

The runs are read by collect.py (a folder whose name starts with `judge`, the inversion's
helper classifier, is listed but part of no claim); the eps = 0 runs are the baseline of every
training-norm group. Each claim is data in claims.py (CLAIMS: metrics, contrasts, directions,
parts) filled in by the study's declaration (DECLARATIONS, or DIR/study.json), and one engine
here judges them all at one of two levels (seeds, models) with the tests of stats.py, giving
one of four verdicts (claims.VERDICTS); plots.py draws the figures. numpy and the standard
library only (matplotlib, if present, for the plots).
"""
import json
import math
import time
from pathlib import Path

import numpy as np

from claims import (CLAIMS, DECLARATIONS, HOLDS, METRICS, MIN_MODEL_EPS, MIN_SEEDS,
                    MODELS_SENTENCE, RULES_BEGIN, RULES_END, ci_text, eps_list, fmt, number,
                    rule_text, rules_markdown)
from collect import FISHER_KEYS, collect_rows, read_declaration, read_incomplete, read_json
from common import ArgumentParser, UserError, atomic_save, mean_se, provenance, user_errors
import plots
from stats import (ALPHA, example_test, holm, kendall_margin_p, kendall_mde, kendall_test,
                   mde_normal, mde_t, normal_margin_p, one_sided_t, sen_slope, slope, t_margin_p,
                   two_proportions)

EPS_TOL = 1e-6        # eps and radii are floats (8/255): equal when closer than this


# ----------------------------------------------------------------------------- rows and groups

def same(a, b):
    return abs(a - b) < EPS_TOL


def attacks_at(row, norm, radius):
    """The run's attack records at (norm, radius)."""
    return [r for r in row["robust_acc"] if r["norm"] == norm and number(r["eps"]) is not None
            and same(r["eps"], radius) and number(r["acc"]) is not None]


def recipe(row, norm, radius):
    """The attacks recorded at (norm, radius), as a sorted tuple of (attack, steps, restarts)."""
    return tuple(sorted({(str(r.get("attack")), r.get("steps"), r.get("restarts"))
                         for r in attacks_at(row, norm, radius)}, key=str))


def robust_acc(row, norm, radius):
    """Accuracy of the run under attack at (norm, radius): the worst attack recorded there."""
    accs = [number(r["acc"]) for r in attacks_at(row, norm, radius)]
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
    """The spec part with its argument from the declaration (one part per noise pair); C2's
    part also takes the declared eps family (transfer_eps)."""
    key = METRICS[part["metric"]][1]
    if key == "reference_radius":
        radius = decisions[key].get(norm)
        return [with_arg(part, None if radius is None else (norm, radius))]
    if key == "primary_transfer":
        part = dict(part, only_eps=decisions["transfer_eps"])
    args = [None] if key is None else [tuple(p) for p in decisions[key]] if key == "noise_pairs" \
        else [decisions[key]]
    return [with_arg(part, a) for a in args]


def alternatives(rows, part, norm):
    """The part on the other radii, transfer measures or inversion methods of the runs (and a
    declared transfer measure over every eps > 0 when its family is a declared list)."""
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
    out = [with_arg(part, a) for a in found]
    if part.get("only_eps"):
        out.insert(0, dict(part, only_eps=None, name=part["name"] + " (every eps > 0)"))
    return out


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

def result(verdict, evidence, level=None, n=0, test=None):
    """A verdict with its evidence (and its test's numbers): every claim, group and part."""
    out = {"verdict": verdict, "holds": HOLDS[verdict],
           "level": None if verdict == "undetermined" else level, "evidence": evidence,
           "test": "", "p": None, "p_margin": None, "effect": None, "ci": None,
           "smallest_effect": None, "mde": None,
           "n_seeds": n if level == "seeds" else 0, "n_models": n if level == "models" else 0}
    out.update({k: v for k, v in (test or {}).items() if k in out and k != "test"})
    return out


def verdict_of(p, p_margin):
    """holds (the direction shown), else contradicted (the smallest effect excluded), else not
    shown."""
    if p < ALPHA:
        return "holds"
    return "contradicted" if p_margin is not None and p_margin < ALPHA else "not shown"


def combine(parts, label=lambda key: ""):
    """Parts or norm groups into one verdict (intersection-union, GENERAL_RULES): undetermined
    if any is; holds if all hold; contradicted if some contradiction p, Bonferroni-adjusted
    over the parts, is below alpha; else not shown."""
    items = list(parts.items()) if isinstance(parts, dict) else list(enumerate(parts))
    found = [r for _, r in items]
    levels = {r["level"] for r in found if r["level"]}
    level = "models" if "models" in levels else "seeds" if levels else None
    out = result("undetermined", "; ".join(f"{label(k)}{r['evidence']}" for k, r in items))
    out["n_seeds"] = min((r["n_seeds"] for r in found if r["level"] == "seeds"), default=0)
    out["n_models"] = min((r["n_models"] for r in found if r["level"] == "models"), default=0)
    if not found or any(r["verdict"] == "undetermined" for r in found):
        return out
    margins = [r["p_margin"] for r in found]
    p_margin = None if None in margins else min(1.0, len(found) * min(margins))
    out["verdict"] = "holds" if all(r["verdict"] == "holds" for r in found) else \
        verdict_of(1.0, p_margin)
    deciding = min(found, key=lambda r: r["p_margin"]) if out["verdict"] == "contradicted" \
        else max(found, key=lambda r: r["p"])
    out.update({k: deciding[k] for k in ("effect", "ci", "smallest_effect", "mde")},
               p=max(r["p"] for r in found), p_margin=p_margin, holds=HOLDS[out["verdict"]],
               level=level)
    return out


def t_part(s, direction, smallest, what, unit, extra=""):
    """A one-sided t-test (one_sided_t) as a part's test, with its contradiction p against the
    smallest effect and its MDE, both signed in the claimed direction."""
    if s["p"] is None:
        return {"p": None, "text": f"{what}: identical over the {s['n']} {unit}, no noise estimate"}
    mde = mde_t(s["se"], s["df"])
    return {"p": s["p"], "p_margin": t_margin_p(s["mean"], s["se"], s["df"], direction, smallest),
            "effect": s["mean"], "ci": s["ci"], "mde": direction * mde,
            "smallest_effect": direction * smallest,
            "text": f"{what} {fmt(s['mean'], True)} {ci_text(s['ci'])}, t({s['df']}) = "
                    f"{fmt(s['t'])}, p = {fmt(s['p'])}, MDE {fmt(direction * mde, True)} "
                    f"({s['n']} {unit}{extra})"}


def eps_item(s, direction, smallest, m):
    """One eps of a versus_eps0 family: its test s (t, McNemar, two proportions) with its
    contradiction p and its MDE at alpha (mde1) and at alpha / m (mdem)."""
    if s["p"] is None or not s["se"] > 0:
        return None
    if "df" in s:
        margin = t_margin_p(s["mean"], s["se"], s["df"], direction, smallest)
        mde1, mdem = (mde_t(s["se"], s["df"], a) for a in (ALPHA, ALPHA / m))
    else:
        margin = normal_margin_p(s["mean"], s["se"], direction, smallest)
        mde1, mdem = (mde_normal(s["se"], a) for a in (ALPHA, ALPHA / m))
    return dict(s, margin=margin, mde1=mde1, mdem=mdem)


def family_part(grid, tests, family, direction, smallest, unit):
    """The versus_eps0 family (grid[0] = 0, tests one per eps > 0) as a part's test: `some`
    (Holm) or `every` (intersection-union), by CONTRASTS["versus_eps0"]."""
    m = len(tests)
    items = [eps_item(s, direction, smallest, m) for s in tests]
    if None in items:
        return {"p": None, "text": f"no noise estimate at eps {fmt(grid[items.index(None) + 1])}"}
    p_min = [s.get("p_min", 0.0) for s in items]
    if (min(p_min) * m if family == "some" else max(p_min)) >= ALPHA:
        return {"p": None, "text": f"the family of {m} eps cannot reach p < {ALPHA} (best "
                                   f"possible p by eps: {', '.join(fmt(p) for p in p_min)})"}
    if family == "some":
        adjusted = holm([s["p"] for s in items])
        b = int(np.argmin(adjusted))
        p, p_margin = adjusted[b], max(s["margin"] for s in items)
        mde = max(s["mdem"] for s in items)
    else:
        adjusted = [s["p"] for s in items]
        b = int(np.argmax(adjusted))
        p, p_margin = adjusted[b], min(holm([s["margin"] for s in items]))
        mde = max(s["mde1"] for s in items)
    s = items[b]
    each = ", ".join(f"eps {fmt(e)}: {fmt(t['mean'], True)} {ci_text(t['ci'], '')} (p = "
                     f"{fmt(t['p'])})" for e, t in zip(grid[1:], items))
    return {"p": p, "p_margin": p_margin, "effect": s["mean"], "ci": s["ci"],
            "mde": direction * mde, "smallest_effect": direction * smallest,
            "text": f"minus eps 0 at eps {fmt(grid[b + 1])}: {fmt(s['mean'], True)} "
                    f"{ci_text(s['ci'])}, {'Holm-adjusted ' if family == 'some' and m > 1 else ''}"
                    f"p = {fmt(p)}, MDE {fmt(direction * mde, True)} ({s['n']} {unit}, "
                    f"{s['test'] if 'test' in s else 't'}, family {family} of {m}: {each})"}


def seeds_test(part, grid, Y, smallest):
    """The seeds-level test of a part's contrast on Y [seeds, eps] (complete seeds)."""
    d, contrast = part["direction"], part["contrast"]
    if contrast == "trend":
        means = ", ".join(f"{fmt(e)}: {fmt(m)}" for e, m in zip(grid, Y.mean(0)))
        return t_part(one_sided_t([slope(grid, y) for y in Y], d), d,
                      smallest / (grid[-1] - grid[0]), "slope per unit eps", "seeds",
                      f"; means by eps {means}")
    if contrast == "versus_eps0":
        tests = [dict(one_sided_t(Y[:, j] - Y[:, 0], d), test="paired t")
                 for j in range(1, len(grid))]
        out = family_part(grid, tests, part["family"], d, smallest, "seeds")
        out["text"] += f"; eps 0 mean {fmt(Y[:, 0].mean())}"
        return out
    return t_part(one_sided_t(Y.mean(1), d), d, smallest, "mean over eps > 0", "seeds")


def models_test(part, grid, models, smallest):
    """The models-level test of a part's contrast on one model per eps (p None: cannot
    decide, with the reason in text)."""
    d, contrast = part["direction"], part["contrast"]
    if contrast == "trend":
        y = np.array([part_value(part)(m) for m in models])
        k, (sen, ci) = kendall_test(y, d), sen_slope(grid, y)
        values = ", ".join(f"{fmt(e)}: {fmt(v)}" for e, v in zip(grid, y))
        if k["p_min"] >= ALPHA:
            return {"p": None, "text": f"the rank test on these {len(y)} models cannot reach "
                                       f"p < {ALPHA} (best possible p = {fmt(k['p_min'])})"}
        residual = y - np.polyval(np.polyfit(grid, y, 1), grid)
        sigma = math.sqrt(residual @ residual / (len(y) - 2)) if len(y) > 2 else 0.0
        per_unit = smallest / (grid[-1] - grid[0])
        mde = kendall_mde(grid, sigma)
        return {"p": k["p"], "p_margin": kendall_margin_p(grid, y, d, per_unit), "effect": sen,
                "ci": ci, "mde": d * mde, "smallest_effect": d * per_unit,
                "text": f"Sen slope per unit eps {fmt(sen, True)} {ci_text(ci)}, Kendall tau "
                        f"{fmt(k['tau'], True)}, p = {fmt(k['p'])}, MDE {fmt(d * mde, True)} "
                        f"({k['method']}; {len(y)} models; values by eps {values})"}
    if contrast == "versus_eps0":
        if part["metric"] == "robust_acc":  # no per-example records: two proportions
            tests = [two_proportions(part_value(part)(m), part_value(part)(models[0]),
                                     min(m["test_size"], models[0]["test_size"]), d)
                     for m in models[1:]]
            return family_part(grid, tests, part["family"], d, smallest, "test examples")
        items = [metric_items(m, part["metric"], part["arg"]) for m in models]
        tests = [example_test(a, items[0], d) for a in items[1:]]
        return family_part(grid, tests, part["family"], d, smallest, "test examples")
    items = [metric_items(m, part["metric"], part["arg"]) for m in models]
    return t_part(one_sided_t(np.mean(items, 0), d), d, smallest, "mean over robust models",
                  "images")


def models_problem(part, models, value, name):
    """Why one model per eps cannot decide the part (None when it can)."""
    lacking = [m["run"] for m in models if value(m) is None]
    if lacking:
        return f"{', '.join(lacking)} lack {name}"
    if part["contrast"] == "trend":
        return None
    if part["metric"] == "robust_acc":
        lacking = [m["run"] for m in models if not isinstance(m.get("test_size"), int)]
        return f"{', '.join(lacking)} lack test_size" if lacking else None
    if part["metric"] == "transfer" and part["arg"].endswith("fine-tuned"):
        return ("one fine-tuning run per model cannot measure fine-tuning's own randomness, "
                "which a test over the test examples would need")
    items = [metric_items(m, part["metric"], part["arg"]) for m in models]
    what = "per-example records" if part["metric"] == "transfer" else "per-image SSIM"
    lacking = [m["run"] for m, a in zip(models, items) if a is None]
    if lacking:
        return f"{', '.join(lacking)} lack the {what} of {name}"
    if len({np.shape(a) for a in items}) > 1:
        return f"the {what} of {name} differ in shape"
    if np.ndim(items[0]) == 2 and np.shape(items[0])[0] < 2:
        return f"{name} has fewer than 2 few-shot draws (no estimate of the draws' variance)"
    return None


def judge_part(rows, part, level, smallest):
    """One part at one level: the missing-data rules, then the level's test."""
    name, value, contrast = part["name"], part_value(part), part["contrast"]
    if part["arg"] is None and METRICS[part["metric"]][1]:
        return result("undetermined", f"{name}: no reference radius declared for this norm", level)
    if contrast == "mean_gain":
        rows = [r for r in rows if not same(r["eps"], 0)]
    if part.get("only_eps"):
        absent = [e for e in part["only_eps"] if not any(same(r["eps"], e) for r in rows)]
        if absent:
            return result("undetermined", f"{name}: no run at the declared eps "
                                          f"{', '.join(fmt(e) for e in absent)}", level)
        rows = [r for r in rows if any(same(r["eps"], e) for e in [0.0, *part["only_eps"]])]
    grid = eps_grid(rows)
    reason = missing_data(rows, value, grid, name, need_zero=contrast != "mean_gain")
    if not reason and part["metric"] == "robust_acc":
        recipes = {recipe(r, *part["arg"]) for r in rows if value(r) is not None}
        if len(recipes) > 1:
            reason = "models attacked with different attacks there: " + " vs ".join(
                "/".join(f"{a} {s} steps {r} restarts" for a, s, r in rec) for rec in recipes)
    if level == "seeds":
        seeds, Y = paired(rows, value, grid)
        n = len(seeds)
        if not reason and n < MIN_SEEDS:
            reason = f"{n} seed(s) have {name} at every eps {eps_list(grid)} (needs {MIN_SEEDS})"
    else:
        models = [min((r for r in rows if same(r["eps"], e)), key=lambda r: r["seed"])
                  for e in grid]
        n = len(models)
        reason = reason or models_problem(part, models, value, name)
    if reason:
        return result("undetermined", f"{name}: undetermined at level {level}, {reason}", level, n)
    test = seeds_test(part, grid, Y, smallest) if level == "seeds" \
        else models_test(part, grid, models, smallest)
    if test["p"] is None:
        return result("undetermined", f"{name}: undetermined at level {level}, {test['text']}",
                      level, n)
    verdict = verdict_of(test["p"], test["p_margin"])
    small = verdict == "holds" and test["p_margin"] is not None and test["p_margin"] < ALPHA
    return result(verdict, f"{name}: {verdict}{' (below the smallest effect of interest)' * small}"
                           f", {test['text']}", level, n, test)


def judge_group(spec, rows, decisions, norm):
    """One claim on one norm group: its level, its parts (intersection-union), and the same
    test on the alternatives of each declared argument as evidence only."""
    level, complete = study_level(rows)
    if level is None:
        return result("undetermined", f"{complete} complete seed(s) (seeds level needs "
                                      f"{MIN_SEEDS}) and {len(eps_grid(rows))} eps (models level "
                                      f"needs {MIN_MODEL_EPS})", "seeds", complete)
    if spec.get("disjoint") and any(r["invert"] and r["invert_disjoint"] is not True
                                    for r in rows):
        bad = ", ".join(r["run"] for r in rows if r["invert"] and r["invert_disjoint"] is not True)
        return result("undetermined", f"invert.json of {bad} does not say that its evaluation "
                                      "images were disjoint from the images the inversion was "
                                      "tuned on", level)
    smallest = decisions["smallest_effects"]
    parts = [p for part in spec["parts"] for p in expand(part, decisions, norm)]
    res = combine([judge_part(rows, p, level, smallest[p["metric"]]) for p in parts])
    extra = [judge_part(rows, alt, level, smallest[alt["metric"]])["evidence"]
             for p in parts for alt in alternatives(rows, p, norm)]
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
            else result("undetermined", "no study run")
        for r in [claim, *by_norm.values()]:
            r["test"] = rule_text(cid)
        claims[cid] = dict(claim, by_norm=by_norm)
    return claims


# ----------------------------------------------------------------------------- report.md


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


def count_text(c):
    """'3 seeds', '5 models' or both (norm groups judged at different levels)."""
    counts = [f"{c[f'n_{k}']} {k}" for k in ("seeds", "models") if c[f"n_{k}"]]
    return ", ".join(counts) or "n/a"


def study_notes(rows, declaration, incomplete):
    """report.md's lines under the declaration: the steps that did not finish (their cells are
    judged on what they hold), where and in what precision the runs ran, and every
    re-declaration of the folder."""
    lines = []
    if incomplete:
        cells = sorted({s["cell"] for s in incomplete})
        lines += ["", f"**Did not finish: {len(incomplete)} steps of {len(cells)} cells "
                  f"({', '.join(cells)})**; the verdicts judge the runs present. Rerun (or "
                  "resubmit) the study to finish them:", ""]
        lines += [f"- {s['cell']}: {s['step']} ({s['log'] or 'no log'}: {s['last']})"
                  for s in incomplete]
    ran = {}
    for r in rows:
        key = (r.get("device", "not recorded"), r.get("precision", "not recorded"))
        ran[key] = ran.get(key, 0) + 1
    lines += ["", "Ran on: " + "; ".join(f"{device}, {precision} ({n} runs)"
                                         for (device, precision), n in sorted(ran.items())) + "."]
    for r in declaration.get("redeclared", []):
        lines += ["", f"**Re-declared {r['when']}**: {', '.join(r['changed'])} changed after "
                  "the folder was first declared (study.json keeps the old and new decisions)."]
    return lines


def part_unit(part, claim, decisions):
    """The unit of a part's effect, smallest effect and MDE in the claims table; for a trend,
    its smallest effect per unit eps read back as the declared change over the grid."""
    name = METRICS[part["metric"]][0]
    if part["contrast"] == "versus_eps0":
        return f"{name} at an eps > 0 minus at eps 0"
    if part["contrast"] == "mean_gain":
        return f"{name}, mean over the robust models"
    unit = f"{'ln ' if part.get('log') else ''}{name} per unit eps"
    smallest, declared = claim["smallest_effect"], decisions["smallest_effects"][part["metric"]]
    if smallest is None:
        return unit
    way = "fall" if part["direction"] < 0 else "rise"
    change = (f"a {fmt(100 * abs(1 - math.exp(part['direction'] * declared)))}% {way} (a "
              f"factor {fmt(math.exp(declared))})" if part.get("log") else
              f"a {way} of {fmt(declared)}")
    return (f"{unit} ({fmt(smallest, True)} is {change} over the grid's eps range "
            f"{fmt(declared / abs(smallest))})")


def units_line(claims, decisions):
    """The line under the claims table: each row's unit (the deciding part's: the part of the
    claimed direction that the smallest effect's sign names), accuracies as fractions."""
    texts = []
    for cid, c in claims.items():
        parts = CLAIMS[cid]["parts"]
        if c["smallest_effect"] is not None:
            parts = [p for p in parts if p["direction"] * c["smallest_effect"] > 0] or parts
        units = dict.fromkeys(part_unit(p, c, decisions) for p in parts)
        texts.append(f"{cid} {' or '.join(units)}")
    return ("Units: a row's effect, smallest effect and MDE share its unit and are signed in the "
            "claimed direction; accuracies and SSIM as fractions. " + "; ".join(texts) + ".")


def markdown(rows, claims, declaration, figures, incomplete=()):
    d = declaration["decisions"]
    radius = ", ".join(f"{k} {fmt(v)}" for k, v in d["reference_radius"].items())
    lines = ["# Results", "", "| claim | verdict | level | effect [90% CI] | smallest effect | "
             "MDE (80% power) | p | seeds or models |", "|---|---|---|---|---|---|---|---|"]
    for cid, c in claims.items():
        effect = "n/a" if c["effect"] is None else \
            f"{fmt(c['effect'], True)} {ci_text(c['ci'], '')}"
        lines.append(f"| {cid}: {CLAIMS[cid]['claim']} | **{c['verdict']}** | "
                     f"{c['level'] or 'n/a'} | {effect} | {fmt(c['smallest_effect'], True)} | "
                     f"{fmt(c['mde'], True)} | {fmt(c['p'])} | {count_text(c)} |")
    lines += ["", units_line(claims, d), "", MODELS_SENTENCE, "",
              f"Declaration ({declaration['source']}, preset {declaration['preset']}): reference "
              f"radius {radius}; primary transfer `{d['primary_transfer']}` at eps "
              f"{'> 0 (every)' if d['transfer_eps'] is None else eps_list(d['transfer_eps'])}; "
              f"inversion method "
              f"`{d['inversion_method']}`; noise pairs "
              + ", ".join(f"{a} vs {b}" for a, b in d["noise_pairs"]) + "."]
    lines += study_notes(rows, declaration, incomplete)
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


def inversion_strips(rows, results, n_images=8):
    """(strips, labels, first seed): the first n_images inverted test images (originals.npy,
    when a run saved it) and a row per (eps, method) of the first seed's runs (plots.py)."""
    study = [r for r in study_rows(rows) if r["invert"]]
    if not study:
        return [], [], None
    first = min(r["seed"] for r in study)
    strips, labels = [], []
    for r in (r for r in study if r["seed"] == first):
        run = results / r["run"]
        if not strips and (run / "originals.npy").is_file():
            strips.append(plots.image_strip(np.load(run / "originals.npy"), n_images))
            labels.append("originals")
        for method in sorted(r["invert"]):
            if (run / f"recon_{method}.npy").is_file():
                strips.append(plots.image_strip(np.load(run / f"recon_{method}.npy"), n_images))
                labels.append(f"{r['norm']} eps {fmt(r['eps'])}: {method}")
    keep = [i for i, s in enumerate(strips) if s.shape == strips[0].shape]
    return [strips[i] for i in keep], [labels[i] for i in keep], first


def make_figures(rows, results, n_images=8):
    """accuracy_vs_eps.png, fisher_vs_eps.png (log y), transfer_vs_eps.png (full data,
    few-shot, fine-tuned panels per norm), inversions.png, drawn by plots.py; [] without
    matplotlib."""
    groups = [(norm, group_rows(rows, norm)) for norm in norm_groups(rows)]
    if not groups or not plots.available():
        return []

    def kind(measure):
        return "fine-tuned" if measure.endswith("fine-tuned") else \
            "few-shot" if measure.endswith("-shot") else "full data"

    def panel(title, g, curves):  # (title, [(label, eps, means, SEs)], eps > 0 of the grid)
        return title, [(label, *series(g, value)) for label, value in curves], \
            [e for e in eps_grid(g) if e > 0]

    measures = sorted({t for r in rows for t in r["transfer"]})
    fisher = ("weights_trace", "input_trace", "input_lambda_max", "repr_trace_normalized")
    kinds = [k for k in ("full data", "few-shot", "fine-tuned")
             if any(kind(t) == k for t in measures)]
    figures = {  # rows of panels: accuracy and Fisher one row, transfer a row per norm
        "accuracy_vs_eps.png": ("accuracy", False, [[panel(
            f"trained {n}", g, [("clean", metric_of("clean_acc"))] + [
                (f"robust {n} {fmt(e)}", metric_of("robust_acc", (n, e))) for e in radii(g, n)])
            for n, g in groups]]),
        "fisher_vs_eps.png": ("Fisher information (log scale)", True, [[panel(
            f"trained {n}", g, [(k, metric_of(k)) for k in fisher]) for n, g in groups]]),
        "transfer_vs_eps.png": ("target test accuracy", False, [[panel(
            f"{k}, trained {n}", g, [(t, metric_of("transfer", t)) for t in measures
                                     if kind(t) == k]) for k in kinds] for n, g in groups]),
    }
    written = [name for name, (ylabel, log, panels) in figures.items()
               if all(panels) and plots.panels_figure(results / name, panels, ylabel, log)]
    strips, labels, first = inversion_strips(rows, results, n_images)
    if strips and plots.mosaic_figure(results / "inversions.png", strips, labels,
                                      f"the first {n_images} inverted test images (seed {first})"):
        written.append("inversions.png")
    return written


# ----------------------------------------------------------------------------- declaration

def changed_keys(old, new, prefix=""):
    """The dotted keys (decisions.C2.shots) whose values differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def declare(results, preset, redeclare=False):
    """Write results/study.json, the preset's decisions, before the study's numbers exist:
    once (DESIGN.md, Pre-registration). A later declaration that differs raises ValueError
    naming what changed, unless redeclare: then the new one replaces it and the change is
    appended to its `redeclared` list ({when, old, new}; report.md shows it). Returns what was
    done, a line."""
    path = Path(results) / "study.json"
    new = json.loads(json.dumps({"preset": preset, "decisions": DECLARATIONS[preset]}))
    study = read_json(path)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if study is None:
        atomic_save(path, {**new, "declared": when, "provenance": provenance({"preset": preset})})
        return f"wrote {path} (preset {preset})"
    old = {"preset": study.get("preset"), "decisions": study.get("decisions")}
    changed = sorted(changed_keys(old, new), key=lambda k: k != "preset")  # the preset first
    if not changed:
        return f"{path}: declared before (preset {preset}), unchanged"
    if not redeclare:
        def value(d, key):
            for part in key.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return json.dumps(d)
        shown = "; ".join(f"{k} {value(old, k)} -> {value(new, k)}" for k in changed[:3])
        raise ValueError(f"{path} declares other decisions than preset {preset} now does "
                         f"({shown}{'; ...' if len(changed) > 3 else ''}): use a new results "
                         f"folder, or re-declare (run_all.sh --redeclare, recorded)")
    history = study.get("redeclared", []) + [{"when": when, "changed": changed, "old": old,
                                              "new": new}]
    atomic_save(path, {**study, **new, "redeclared": history,
                       "provenance": provenance({"preset": preset})})
    return f"re-declared {path} (preset {preset}; changed {', '.join(changed)}; recorded)"


# ----------------------------------------------------------------------------- script

def get_args(argv=None):
    p = ArgumentParser(description="Judge claims C1-C6 on a results folder (report.md, "
                       "summary.json, plots), by the study's declaration (DIR/study.json).")
    p.add_argument("results_dir", nargs="?", help="folder whose subfolders hold metrics.json "
                   "(and fisher.json, transfer.json, invert.json)")
    p.add_argument("--declare", choices=sorted(DECLARATIONS), metavar="PRESET",
                   help="write RESULTS_DIR/study.json with the decisions of this preset ("
                   + ", ".join(DECLARATIONS) + ") and judge nothing; once: a folder declared "
                   "with other decisions is refused")
    p.add_argument("--redeclare", action="store_true", help="with --declare: replace a "
                   "declaration of other decisions (recorded in study.json and report.md)")
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
        print(declare(results, args.declare, args.redeclare))
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
    incomplete = read_incomplete(results)
    atomic_save(results / "summary.json", {"declaration": declaration, "rules": rules_markdown(),
                                           "rows": kept, "claims": claims,
                                           "incomplete": incomplete})
    atomic_save(results / "report.md", markdown(rows, claims, declaration, figures, incomplete))
    for s in incomplete:
        print(f"did not finish: {s['cell']} {s['step']} ({s['last']})", flush=True)
    for cid, c in claims.items():
        print(f"{cid} {c['verdict']}" + (f" (p={fmt(c['p'])}, level {c['level']})"
                                         if c["p"] is not None else ""), flush=True)
    print(f"wrote {results / 'report.md'}, summary.json and {len(figures)} figures "
          f"({len(rows)} runs)", flush=True)


if __name__ == "__main__":
    with user_errors():
        main(get_args())
