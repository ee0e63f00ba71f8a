"""The study's claims C1-C6 and each preset's decisions, as data, and the rules text made
from them: CLAIMS (metrics, contrasts, directions, parts), SMALLEST_EFFECTS, DECLARATIONS (one
per preset of run_all.sh, recorded in its results folder as study.json before any number
exists), CONTRASTS and GENERAL_RULES (how report.py judges). report.py reads them; docs/PROTOCOL.md
holds the text `python report.py --rules` prints. Standard library only.
"""
import math

from stats import ALPHA, EXACT_MAX_N, MONTE_CARLO

MIN_SEEDS = 3         # seeds level: seeds with a run at every eps (df = 1 is no noise estimate)
MIN_MODEL_EPS = 4     # models level: the fewest eps at which a rank test can reject (1/4! < ALPHA)
VERDICTS = ("holds", "contradicted", "not shown", "undetermined")
HOLDS = {"holds": True, "contradicted": False, "not shown": False, "undetermined": None}

# The smallest effect of interest of each part, in the claimed direction, fixed before any
# number is seen: metric -> (value, unit, why). A trend's is its change over the grid (from
# the smallest to the largest eps), judged as that change / the grid's eps range per unit eps.
SMALLEST_EFFECTS = {
    "clean_acc": (0.01, "over the grid", "a cost below 1 point of clean accuracy across the "
                  "whole grid would be no trade-off worth a claim"),
    "robust_acc": (0.02, "per robust model", "robust training that adds under 2 points of "
                   "accuracy under attack has not made a robust model"),
    "transfer": (0.01, "at an eps", "1 point of target accuracy: below it a gain is smaller than "
                 "what a probe's settings move (docs/FEW_SHOT.md)"),
    "weights_trace": (math.log(1.25), "over the grid", "a 20% fall (ln 1.25) of a quantity that "
                      "varies by orders of magnitude between models"),
    "input_trace": (math.log(1.25), "over the grid", "as for tr F_w"),
    "input_lambda_max": (math.log(1.25), "over the grid", "as for tr F_w"),
    "ssim": (0.02, "over the grid", "an SSIM rise below 0.02 across the grid is not visible in "
             "the reconstructions"),
    "ssim_gain": (0.005, "mean over robust models", "half a hundredth of SSIM, about a third of "
                  "the TV prior's own gain"),
}


def declared(radius, transfer, transfer_eps=None):
    """One preset's decisions, fixed before its numbers are seen. transfer_eps: the eps > 0
    whose models C2 compares with eps 0 (None: every eps > 0, Holm over them)."""
    return {"reference_radius": dict(radius), "primary_transfer": transfer,
            "transfer_eps": transfer_eps,
            "inversion_method": "baseline",  # the Engstrom et al. recipe
            "noise_pairs": [["noise", "baseline"], ["noise-tv", "tv"]],  # (with noise, without)
            "smallest_effects": {k: v[0] for k, v in SMALLEST_EFFECTS.items()}}


ROBUSTBENCH_RADII = {"l2": 0.5, "linf": 8 / 255}
DECLARATIONS = {
    # rule 5 (docs/PROTOCOL.md): C2 at the reference radius's model, 10-shot probes over
    # 100 draws seeded by the training seed (run_all.sh)
    "quick": declared({"l2": 0.5}, "fashion-mnist:5-9+invert 10-shot", [0.5]),
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
# The claims. contrast: trend (over eps), versus_eps0 (eps > 0 against eps 0; family "some":
# at some eps, Holm; "every": at every eps, intersection-union) or mean_gain (over the robust
# runs); parts are combined by intersection-union.
CLAIMS = {
    "C1": {"claim": "robustness costs source accuracy",
           "parts": [{"metric": "clean_acc", "direction": -1, "contrast": "trend"},
                     {"metric": "robust_acc", "direction": +1, "contrast": "versus_eps0",
                      "family": "every"}]},
    "C2": {"claim": "adversarial training improves linear transferability",
           "parts": [{"metric": "transfer", "direction": +1, "contrast": "versus_eps0",
                      "family": "some"}]},
    "C3": {"claim": "it reduces the Fisher information of the weights",
           "parts": [{"metric": "weights_trace", "direction": -1, "log": True,
                      "contrast": "trend"}]},
    "C4": {"claim": "it reduces the Fisher information about the input",
           "parts": [{"metric": "input_trace", "direction": -1, "log": True, "contrast": "trend"},
                     {"metric": "input_lambda_max", "direction": -1, "log": True,
                      "contrast": "trend"}]},
    "C5": {"claim": "robust representations are invertible", "disjoint": True,
           "parts": [{"metric": "ssim", "direction": +1, "contrast": "trend"}]},
    "C6": {"claim": "the paper's insight (low input Fisher) improves inversion", "disjoint": True,
           "parts": [{"metric": "ssim_gain", "direction": +1, "contrast": "mean_gain"}]},
}
CONTRASTS = {
    "trend": {
        "part": {+1: "{m} rises with eps", -1: "{m} falls with eps"},
        "seeds": "per seed, the least-squares slope of the metric on eps over the norm's grid "
                 "(eps 0 included); one-sided paired t on the slopes; effect: the mean slope "
                 "per unit eps; contradicted when the t test of the slope against the smallest "
                 "effect rejects; MDE (t_{0.95} + t_{0.8}) SE.",
        "models": "Kendall's tau between eps and the metric over the grid's models (eps 0 "
                  "included), one-sided permutation test: with distinct values exact, from the "
                  "inversion-count (Mahonian) distribution of S = sum over eps_i < eps_j of "
                  "sign(y_j - y_i); with tied values exact by enumerating all n! orders for n <= "
                  f"{EXACT_MAX_N}, else {MONTE_CARLO} random orders from seed 0, p = (1 + count) / "
                  f"(1 + {MONTE_CARLO}). Under no association every assignment of the models' "
                  "values to the eps is equally likely. Undetermined when even the most extreme "
                  "order of these values could not give p < 0.05 (its p computed, ties counted). "
                  "Effect: Sen's slope (median pairwise slope) per unit eps, its 90% interval the "
                  "pairwise slopes at the distinct-values critical value (with tied values it "
                  "may disagree with the test, which decides). Contradicted: the same exact "
                  "test, for a falling trend of the residuals direction * y - smallest * eps "
                  "(exchangeable when the slope is the smallest effect). MDE: the slope at which "
                  "the test rejects with 80% probability under y = b eps + normal noise of the "
                  "least-squares residuals' SD (simulated)."},
    "versus_eps0": {
        "part": {(+1, "some"): "{m} is higher at some eps > 0 than at eps 0",
                 (-1, "some"): "{m} is lower at some eps > 0 than at eps 0",
                 (+1, "every"): "{m} is higher at every eps > 0 than at eps 0",
                 (-1, "every"): "{m} is lower at every eps > 0 than at eps 0"},
        "seeds": "per seed and eps > 0, metric(eps) - metric(0); one-sided paired t per eps. "
                 "Family `some`: holds when Holm's step-down over the eps > 0 family rejects "
                 "for some eps (p: the smallest adjusted p, effect that eps's mean difference); "
                 "contradicted when every eps's test against the smallest effect rejects "
                 "(intersection-union); MDE at alpha / (family size). Family `every`: holds when "
                 "every eps's test rejects (p: the largest, effect that eps's); contradicted "
                 "when some eps's test against the smallest effect rejects after Holm; MDE at "
                 "alpha, the largest over eps. A declared list of eps (transfer_eps) is the "
                 "family.",
        "models": "per eps > 0, that model against the eps 0 model on the same target test "
                  "examples (transfer.json `correct`; source robust accuracy has no per-example "
                  "record, so its part is undetermined at this level). Full-data probe: exact "
                  "one-sided McNemar test (Binomial(b + c, 1/2) tail, b and c the examples only "
                  "one of the two gets right), Wald interval and MDE; a family whose best "
                  "possible p (every discordant example a win) cannot reach alpha is "
                  "undetermined. Few-shot probe (the same D seeded draws for every model, D >= "
                  "2): d[k, i] the correctness difference on draw k and example i, effect the "
                  "mean of d, SE^2 = var_k(mean_i d) / D + var_i(mean_k d) / N (draws and "
                  "examples both random: conservative by one interaction term); one-sided t with "
                  "D - 1 degrees of freedom. A fine-tuned measure is undetermined: one "
                  "fine-tuning run per model cannot measure fine-tuning's own randomness, which "
                  "the test would need. Families as at level seeds."},
    "mean_gain": {
        "part": {+1: "{m} is above 0 over the robust runs (eps > 0)",
                 -1: "{m} is below 0 over the robust runs (eps > 0)"},
        "seeds": "per seed, the mean over eps > 0 of the run's value; one-sided paired t over "
                 "the seeds; contradicted and MDE as for a trend.",
        "models": "per image (the same images for every model, invert.json `per_image`), the "
                  "mean over the robust models of the per-image value; one-sided paired t over "
                  "the images; contradicted and MDE as for a trend."},
}
GENERAL_RULES = [
    "Four verdicts. `holds`: the claimed direction shown at alpha 0.05. `contradicted`: not "
    "shown, and the data exclude the claim's smallest effect of interest (declared per part "
    "before the study: the table below), by a one-sided test at alpha 0.05 of the hypothesis "
    "that the effect is at least that large. `not shown`: neither; a failure to reject is not "
    "evidence against the claim, and the minimum detectable effect (MDE, 80% power at the "
    "part's level from its observed variances) says what the study could have seen. "
    "`undetermined`: missing data, or a design whose test cannot reach alpha. summary.json's "
    "`holds` is true for holds, false for contradicted and not shown, null for undetermined.",
    f"Levels. `seeds`: at least {MIN_SEEDS} seeds have a run at every eps of the norm's grid; "
    "seed s of every eps shares initialisation and data order (and, for few-shot probes, its "
    "draws, seeded by the training seed), so tests are one-sided paired t-tests over those "
    "seeds (seeds - 1 degrees of freedom), conditional on the target's test examples, and a "
    f"verdict speaks of training runs with these settings. `models`: fewer complete seeds, at "
    f"least {MIN_MODEL_EPS} eps in the norm's grid (the fewest at which the rank test can "
    "reject, 1/4! < 0.05: one rule for every claim); each eps's model is its run of the smallest "
    "seed; tests are conditional on those models (their randomness: test examples, images, "
    "few-shot draws), and a verdict holds for these checkpoints only. Where both are possible, "
    "seeds decides; neither: undetermined.",
    f"alpha = {ALPHA}, one-sided, for every test. Effects carry a 90% two-sided interval; the "
    "t intervals exclude 0 on the claimed side exactly when the test rejects (a family's "
    "intervals are not adjusted; Holm decides).",
    "Each norm group (the robust runs of a training norm plus every eps = 0 run) is judged on "
    "its own, and parts and norm groups combine (intersection-union) as coded: undetermined if "
    "any is undetermined; else holds if every one holds (p: the largest p); else contradicted "
    "if some one's contradiction test rejects after Bonferroni over them (a claim that needs "
    "every part fails if one part is excluded); else not shown. p, effect, interval, smallest "
    "effect and MDE are the deciding part's (holds, not shown: the largest p; contradicted: the "
    "smallest contradiction p).",
    "Missing data give undetermined with the reason, never another measure and never not shown "
    "or contradicted: a declared measure absent, no eps = 0 run, fewer than 2 eps, fewer "
    "complete seeds (seeds), a model without the metric or its per-example or per-image records "
    "(models), a part whose test has no noise estimate (identical values over seeds).",
    "C5 and C6: undetermined unless every invert.json of the group says its images were "
    "disjoint from those the inversion was tuned on (`disjoint: true`; null is unknown).",
    "Robust accuracy at a radius is the lowest among the attacks recorded there, compared only "
    "when every model of the group was attacked there with the same attacks (name, steps, "
    "restarts); else undetermined with the recipes. Other radii, transfer measures and "
    "inversion methods get the same test as evidence only.",
]
MODELS_SENTENCE = ("A `models` verdict holds for these checkpoints (these models, test examples "
                   "and images); it says nothing about other training runs with the same "
                   "settings, which only a `seeds` verdict speaks of. `not shown` is not "
                   "evidence against a claim: read it with its MDE.")


def declaration_problem(d):
    """What is wrong with the decisions of a study.json (None when they are well formed)."""
    keys = DECLARATIONS["quick"]
    if not isinstance(d, dict) or set(d) != set(keys):
        return f"\"decisions\" must be an object with keys {', '.join(keys)}"
    radius, pairs, eps = d["reference_radius"], d["noise_pairs"], d["transfer_eps"]
    if not isinstance(radius, dict) or not all(number(v) and v > 0 for v in radius.values()):
        return "reference_radius must map norm names to radii > 0"
    if not all(isinstance(d[k], str) and d[k] for k in ("primary_transfer", "inversion_method")):
        return "primary_transfer and inversion_method must be non-empty strings"
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, list) and len(p) == 2
                                                           and all(isinstance(m, str) for m in p)
                                                           for p in pairs):
        return "noise_pairs must be a non-empty list of [method with noise, method without]"
    if eps is not None and not (isinstance(eps, list) and eps
                                and all(number(e) and e > 0 for e in eps)):
        return "transfer_eps must be null (every eps > 0) or a non-empty list of eps > 0"
    smallest = d["smallest_effects"]
    if not isinstance(smallest, dict) or set(smallest) != set(SMALLEST_EFFECTS) or not all(
            number(v) and v > 0 for v in smallest.values()):
        return f"smallest_effects must map each of {', '.join(SMALLEST_EFFECTS)} to a number > 0"
    return None


# ----------------------------------------------------------------------------- rules text

def part_text(part):
    """'ln tr F_w falls with eps': the part's claim in words, from the spec."""
    what = ("ln " if part.get("log") else "") + METRICS[part["metric"]][0]
    key = (part["direction"], part["family"]) if "family" in part else part["direction"]
    return CONTRASTS[part["contrast"]]["part"][key].format(m=what)


def rule_text(cid):
    parts = " and ".join(f"{part_text(p)} ({p['contrast']})" for p in CLAIMS[cid]["parts"])
    return f"{parts}: every part, see the rules"


def smallest_text(metric):
    """'0.223 in ln (a factor 1.25) over the grid': a declared smallest effect in words."""
    value, unit, _ = SMALLEST_EFFECTS[metric]
    log = any(p.get("log") for c in CLAIMS.values() for p in c["parts"] if p["metric"] == metric)
    return f"{fmt(value)}{f' in ln (a factor {fmt(math.exp(value))})' if log else ''} {unit}"


def rules_markdown():
    """The rules, generated from CLAIMS, CONTRASTS, GENERAL_RULES, SMALLEST_EFFECTS and
    DECLARATIONS."""
    lines = ["Generated from the specification in claims.py (`python report.py --rules`).", "",
             "| claim | holds when (every part; contrast) | smallest effect of interest |",
             "|---|---|---|"]
    lines += [f"| {cid}: {s['claim']} | " + "; ".join(f"{part_text(p)} ({p['contrast']})"
                                                     for p in s["parts"])
              + " | " + "; ".join(smallest_text(p["metric"]) for p in s["parts"]) + " |"
              for cid, s in CLAIMS.items()]
    lines += ["", "Why these smallest effects (declared in every preset's study.json, before "
              "its numbers; a trend's is judged per unit eps, divided by the grid's eps range):",
              ""] + [f"- {m}: {smallest_text(m)}: {why}." for m, (_, _, why)
                     in SMALLEST_EFFECTS.items()]
    lines += ["", "Contrasts, at each level:", ""]
    for name, c in CONTRASTS.items():
        lines += [f"- **{name}**", f"  - seeds: {c['seeds']}", f"  - models: {c['models']}"]
    lines += ["", "General rules:", ""] + [f"- {text}" for text in GENERAL_RULES]
    lines += ["", "Declarations (DIR/study.json; without one, quick's):", "",
              "| preset | reference radius | primary transfer | C2's eps | inversion method "
              "| noise pairs |", "|---|---|---|---|---|---|"]
    for name, d in DECLARATIONS.items():
        radius = ", ".join(f"{k} {fmt(v)}" for k, v in d["reference_radius"].items())
        pairs = ", ".join(f"{a} vs {b}" for a, b in d["noise_pairs"])
        family = "every eps > 0 (Holm)" if d["transfer_eps"] is None else \
            ", ".join(fmt(e) for e in d["transfer_eps"])
        lines.append(f"| {name} | {radius} | {d['primary_transfer']} | {family} | "
                     f"{d['inversion_method']} | {pairs} |")
    return "\n".join(lines) + "\n"


RULES_BEGIN = "<!-- rules: generated by report.py --rules; do not edit -->"
RULES_END = "<!-- end rules -->"


# ----------------------------------------------------------------------------- numbers

def fmt(x, sign=False):
    """A number at three significant digits ('n/a' for None): the one format of the report."""
    return "n/a" if x is None else f"{x:+.3g}" if sign else f"{x:.3g}"


def ci_text(ci, label="90% CI "):
    return f"[{label}n/a]" if ci is None else f"[{label}{fmt(ci[0], True)}, {fmt(ci[1], True)}]"


def eps_list(grid):
    return "(" + ", ".join(fmt(e) for e in grid) + ")"


def number(value):
    """value as a finite float, or None (absent, null, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
