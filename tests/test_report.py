"""report.py: its statistics against brute force (against scipy: test_references.py),
verdicts on simulated studies of known truth at both levels (seeds, models), the declaration,
the spec driving the verdicts and the rules text, and the command line end to end with its
user errors."""
import copy
import itertools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

import claims
import report
import stats
from conftest import ROOT, assert_user_error, run_main

GRID = [0.0, 0.25, 0.5, 1.0, 2.0]  # four eps > 0: C2 chooses among four, Holm must hold the line
GRID10 = [0.0, 0.01, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0]  # a published L2 grid
CLAIMS = ["C1", "C2", "C3", "C4", "C5", "C6"]
QUICK = report.DECLARATIONS["quick"]
TARGET = QUICK["primary_transfer"]  # "<target> 10-shot"
FULL = TARGET.rpartition(" ")[0]  # the same target's full-data probe
DRAWS, N_EXAMPLES, N_IMAGES = 5, 300, 32
# Every null-rate check: at most NULL_BOUND rejections in REPLICATES simulated studies. A true
# rate of 5% exceeds it with probability 0.0055, a true 7% stays within it with probability
# 0.044 (test_binomial_margin): the bound fails a rate 2 points above its target 95% of the time.
REPLICATES, NULL_BOUND = 2500, 153


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("t, df", [(2.919986, 2), (6.313752, 1), (1.812461, 10)])
def test_t_cdf_at_tabulated_critical_values(t, df):
    """One-sided 5% critical values of Student's t (printed tables)."""
    assert stats.t_cdf(-t, df) == pytest.approx(0.05, abs=1e-6)
    assert stats.t_cdf(t, df) == pytest.approx(0.95, abs=1e-6)


def test_t_cdf_limits_and_symmetry():
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert stats.t_cdf(1.3, 4) + stats.t_cdf(-1.3, 4) == pytest.approx(1.0)
    assert stats.t_cdf(math.inf, 2) == 1.0 and stats.t_cdf(-math.inf, 2) == 0.0
    # df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t) / pi
    assert stats.t_cdf(0.7, 1) == pytest.approx(0.5 + math.atan(0.7) / math.pi, rel=1e-12)
    for t in (-2.5, -1.0, 0.4, 1.96):  # large df approaches the standard normal
        assert stats.t_cdf(t, 1e6) == pytest.approx(0.5 * math.erfc(-t / math.sqrt(2)), abs=1e-6)


def test_t_quantile_inverts_the_cdf():
    for df in (1, 2, 5, 30):
        for q in (0.01, 0.05, 0.5, 0.9, 0.95, 0.999):
            assert stats.t_cdf(stats.t_quantile(q, df), df) == pytest.approx(q, abs=1e-10)
    assert stats.t_quantile(0.95, 2) == pytest.approx(2.919986, abs=1e-6)


def test_one_sided_t_ci_agrees_with_the_test():
    """The 90% CI excludes 0 on the claimed side exactly when the one-sided 5% test rejects."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.normal(0.5, 1.0, size=3)
        assert (stats.one_sided_t(v, +1)["ci"][0] > 0) == (stats.one_sided_t(v, +1)["p"] < 0.05)
        assert (stats.one_sided_t(v, -1)["ci"][1] < 0) == (stats.one_sided_t(v, -1)["p"] < 0.05)


def test_holm_hand_worked():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4. Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03;
    0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 (monotone). In the given order:
    (0.03, 0.06, 0.06, 0.02). A product above 1 is capped: (0.6, 0.5) -> (1.0, 1.0)."""
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.6, 0.5]) == [1.0, 1.0] and stats.holm([0.2]) == [0.2]


def test_slope():
    assert stats.slope([0, 1, 2, 4], [1, 3, 5, 9]) == pytest.approx(2.0)


def brute_kendall_p(y):
    """P(S >= S(y)) over every order of y, by enumeration (ties included)."""
    y = np.asarray(y, float)
    i, j = np.triu_indices(len(y), 1)
    orders = np.array(list(itertools.permutations(y)))
    return np.mean(np.sign(orders[:, j] - orders[:, i]).sum(1) >= np.sign(y[j] - y[i]).sum())


def test_inversion_counts_are_the_mahonian_numbers():
    assert stats.inversion_pmf(4) * 24 == pytest.approx([1, 3, 5, 6, 5, 3, 1])  # OEIS A008302
    for n in (2, 5, 7):
        counts = np.bincount([sum(a > b for a, b in itertools.combinations(p, 2))
                              for p in itertools.permutations(range(n))])
        assert stats.inversion_pmf(n) == pytest.approx(counts / math.factorial(n), abs=1e-15)


def test_kendall_test_against_enumeration():
    rng = np.random.default_rng(1)
    for n in (4, 5, 6, 7):
        for _ in range(10):
            y = rng.normal(size=n) + 0.5 * np.arange(n)
            assert stats.kendall_test(y, +1)["p"] == pytest.approx(brute_kendall_p(y))
            assert stats.kendall_test(y, -1)["p"] == pytest.approx(brute_kendall_p(-y))
            tied = np.round(y)  # ties: enumeration of the n! orders
            assert stats.kendall_test(tied, +1)["p"] == pytest.approx(brute_kendall_p(tied))
    assert stats.kendall_test([1, 2, 3], +1)["p_min"] == pytest.approx(1 / 6)  # cannot reject
    assert stats.kendall_test([1, 2, 3, 4], +1)["p"] == pytest.approx(1 / 24)


def test_kendall_monte_carlo_with_ties_beyond_exact():
    """n = 9 with ties: the Monte Carlo p agrees with enumerating all 9! orders."""
    y = np.array([0, 1, 1, 2, 0, 3, 3, 4, 2], float)
    res = stats.kendall_test(y, +1)
    assert res["method"].startswith("Monte Carlo")
    assert res["p"] == pytest.approx(brute_kendall_p(y), abs=0.004)  # 4 SE of 100000 orders


def test_sen_interval_agrees_with_the_kendall_test():
    rng = np.random.default_rng(2)
    x = np.array(GRID10)
    for _ in range(100):
        y = rng.normal(size=len(x)) + rng.uniform(-0.5, 0.5) * np.log1p(x)
        _, (lo, hi) = stats.sen_slope(x, y)
        assert (lo > 0) == (stats.kendall_test(y, +1)["p"] < 0.05)
        assert (hi < 0) == (stats.kendall_test(y, -1)["p"] < 0.05)


def test_mcnemar_is_the_exact_binomial_tail():
    a = np.array([1] * 9 + [0] * 3 + [1] * 20 + [0] * 8)  # 9 only a right, 3 only b right
    b = np.array([0] * 9 + [1] * 3 + [1] * 20 + [0] * 8)
    brute = sum(math.comb(12, k) for k in range(9, 13)) / 2 ** 12
    res = stats.example_test(a, b, +1)
    assert res["p"] == pytest.approx(brute, rel=1e-12) and res["mean"] == pytest.approx(6 / 40)
    assert stats.example_test(b, a, -1)["p"] == pytest.approx(brute, rel=1e-12)
    assert stats.example_test(a, a, +1)["p"] == 1.0


def few_shot_correct(rng, difficulty, shift=0.0, draw_sd=0.3):
    """[draws, examples] 0/1: example difficulty shared by every model, an effect per
    (model, draw) (which labelled examples a draw picked), a planted logit shift."""
    logit = 1.0 + shift - difficulty[None, :] + rng.normal(0, draw_sd, size=(DRAWS, 1))
    return (rng.random((DRAWS, len(difficulty))) < 1 / (1 + np.exp(-logit))).astype(np.uint8)


def test_few_shot_test_accounts_for_the_draws():
    """Null with strong draw effects: the draws-plus-examples SE keeps the rate of p < 0.05 at
    5% or less; an SE over the examples alone would not (the draws are random too)."""
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1.5, N_EXAMPLES)
    rejected = naive = 0
    for _ in range(REPLICATES):
        a, b = (few_shot_correct(rng, difficulty, draw_sd=0.4) for _ in range(2))
        rejected += stats.example_test(a, b, +1)["p"] < 0.05
        d = (a.astype(float) - b).mean(0)
        naive += stats.one_sided_t(d, +1)["p"] < 0.05
    assert rejected <= NULL_BOUND and naive > 2 * NULL_BOUND, (rejected, naive)


def test_binomial_margin():
    """P(Bin(2500, 0.05) > 153) < 0.006 and P(Bin(2500, 0.07) <= 153) < 0.045:
    I_p(k, n - k + 1) = P(X >= k)."""
    assert stats.betainc(NULL_BOUND + 1, REPLICATES - NULL_BOUND, 0.05) < 0.006
    assert 1 - stats.betainc(NULL_BOUND + 1, REPLICATES - NULL_BOUND, 0.07) < 0.045


# ----------------------------------------------------------------------------- simulated studies

def make_rows(rng, effect=0.0, n_seeds=3, grid=GRID, noise=0.01, norm="l2", radii=(0.25, 0.5, 1.0),
              zero_norm="l2", disjoint=True, examples=False):
    """A study with known truth. Each seed has its own offset per quantity, shared across eps
    (pairing), plus independent noise per run. effect > 0 plants every claimed effect: clean
    accuracy falls, log Fisher falls, SSIM rises (all by `effect` per unit eps), robust
    accuracy and transfer gain `effect` at every eps > 0, noise averaging gains `effect` SSIM.
    examples: per-example correctness of the 10-shot and full-data probes and per-image SSIM
    too (the same examples and images for every model; the accuracies are their means)."""
    difficulty, image_base, image_gain = (rng.normal(0, s, n) for s, n in
                                          ((1.5, N_EXAMPLES), (0.1, N_IMAGES), (0.01, N_IMAGES)))
    rows = []
    for seed in range(n_seeds):
        off = dict(zip(["clean", "robust", "wt", "it", "il", "transfer", "ssim", "tv"],
                       rng.normal(0.0, 0.05, size=8)))
        for eps in grid:
            def n(size=None):
                return rng.normal(0.0, noise, size)
            base = 0.3 + off["ssim"] + effect * eps + n()
            tv = base + 0.02 + off["tv"] + n()
            gain = effect if eps > 0 else 0.0
            row = {
                "run": f"{norm}_eps{eps}_seed{seed}", "role": "study", "seed": seed, "eps": eps,
                "norm": zero_norm if eps == 0 else norm,
                "clean_acc": 0.9 + off["clean"] - effect * eps + n(),
                "robust_acc": [{"norm": norm, "eps": r, "attack": "pgd", "acc": min(0.99, 0.3 + off[
                                   "robust"] + gain - 0.1 * r + n())} for r in radii],
                "fisher": {"weights_trace": math.exp(3 + off["wt"] - effect * eps + n()),
                           "input_trace": math.exp(1 + off["it"] - effect * eps + n()),
                           "input_lambda_max": math.exp(0.5 + off["il"] - effect * eps + n())},
                "transfer": {TARGET: 0.8 + off["transfer"] + gain + n()}, "correct": {},
                "invert": {"baseline": {"ssim": base}, "tv": {"ssim": tv},
                           "noise": {"ssim": base + gain + n()},
                           "noise-tv": {"ssim": tv + gain + n()}},
                "invert_disjoint": disjoint, "test_size": 1000}
            if examples:
                for measure, draw_sd in ((TARGET, 0.3), (FULL, 0.0)):
                    correct = few_shot_correct(rng, difficulty, 12 * gain, draw_sd)
                    correct = correct if measure == TARGET else correct[0]
                    row["correct"][measure] = correct
                    row["transfer"][measure] = float(correct.mean())
                images = {"baseline": base + image_base + n(N_IMAGES)}
                images["tv"] = images["baseline"] + 0.02 + n(N_IMAGES)
                for method, ref in (("noise", "baseline"), ("noise-tv", "tv")):
                    images[method] = images[ref] + gain + image_gain + n(N_IMAGES)
                for method, values in images.items():
                    row["invert"][method] = {"ssim": float(values.mean()),
                                             "per_image_ssim": list(values)}
            rows.append(row)
    return rows


def holds_rates(effect, studies, seed, decisions=None, **kwargs):
    rng = np.random.default_rng(seed)
    counts, levels = {c: 0 for c in CLAIMS}, set()
    for _ in range(studies):
        claims = report.judge_claims(make_rows(rng, effect, **kwargs), decisions)
        for c in CLAIMS:
            counts[c] += claims[c]["holds"] is True
            levels.add(claims[c]["level"])
    return counts, levels


@pytest.fixture(scope="module")
def seed_planted():
    return holds_rates(0.1, 200, seed=2)


@pytest.fixture(scope="module")
def model_planted():
    return holds_rates(0.1, 100, seed=12, n_seeds=1, grid=GRID10, examples=True)


# Null studies (no effect anywhere), REPLICATES of each level, every claim judged on each. The
# models level declares C2 on the full-data probe (exact McNemar per eps, Holm); C2's few-shot
# form at both levels is simulated at the quick study's own regime in test_regime.py.
NULL_LEVELS = {"seeds": dict(seed=1),
               "models": dict(seed=11, n_seeds=1, grid=GRID10, examples=True,
                              decisions=dict(QUICK, primary_transfer=FULL))}


@pytest.fixture(scope="module", params=NULL_LEVELS)
def null_counts(request):
    return request.param, holds_rates(0.0, REPLICATES, **NULL_LEVELS[request.param])


@pytest.mark.slow
@pytest.mark.parametrize("claim", CLAIMS)
def test_null_studies_rarely_hold(null_counts, claim):
    """`holds` in at most NULL_BOUND of REPLICATES null studies per claim and level (C2: the
    best of four eps, Holm-corrected; two-part claims: intersection-union)."""
    level, (counts, levels) = null_counts
    assert counts[claim] <= NULL_BOUND and levels <= {level, None}, counts


@pytest.mark.parametrize("claim", CLAIMS)
def test_seeds_level_power(seed_planted, claim):
    counts, levels = seed_planted
    assert counts[claim] >= 180 and levels == {"seeds"}, counts


def test_models_level_c2_on_a_full_data_probe():
    """C2 declared on a full-data probe (exact McNemar per eps): a planted gain holds."""
    counts, _ = holds_rates(0.1, 100, seed=13, n_seeds=1, grid=GRID10, examples=True,
                            decisions=dict(QUICK, primary_transfer=FULL))
    assert counts["C2"] >= 95, counts


@pytest.mark.parametrize("claim", CLAIMS)
def test_models_level_power(model_planted, claim):
    counts, levels = model_planted
    assert counts[claim] >= 95 and levels == {"models"}, counts


def test_a_null_claim_does_not_hold_rather_than_undetermined():
    claims = report.judge_claims(make_rows(np.random.default_rng(3), effect=0.0))
    for c in CLAIMS:
        assert claims[c]["holds"] in (True, False), (c, claims[c]["evidence"])
        assert claims[c]["n_seeds"] == 3 and claims[c]["level"] == "seeds"


def test_two_model_grid_decides_nothing():
    rows = make_rows(np.random.default_rng(4), effect=1.0, n_seeds=1, grid=[0.0, 0.5],
                     examples=True)
    claims = report.judge_claims(rows)
    for c in CLAIMS:
        assert claims[c]["holds"] is None and claims[c]["level"] is None, c
        assert claims[c]["p"] is None and "needs 4" in claims[c]["evidence"]


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_fewer_than_three_seeds_decide_at_level_models(n_seeds):
    rows = make_rows(np.random.default_rng(5), effect=1.0, n_seeds=n_seeds)
    claims = report.judge_claims(rows)
    for c in ("C1", "C3", "C4", "C5"):  # trends: five models, p = 1/120
        assert claims[c]["holds"] is True and claims[c]["level"] == "models", c
        assert claims[c]["n_models"] == 5 and claims[c]["p"] == pytest.approx(1 / 120)
    for c in ("C2", "C6"):  # no per-example or per-image records
        assert claims[c]["holds"] is None and claims[c]["level"] is None, c
    assert "per-example records" in claims["C2"]["evidence"]
    assert "per-image SSIM" in claims["C6"]["evidence"]


def test_incomplete_seeds_fall_to_the_models_level():
    """A third seed without one eps leaves two complete seeds: the first seed's models decide."""
    rows = make_rows(np.random.default_rng(6), effect=1.0)
    rows = [r for r in rows if not (r["seed"] == 2 and r["eps"] == 1.0)]
    c3 = report.judge_claims(rows)["C3"]
    assert c3["level"] == "models" and c3["holds"] is True and "5 models" in c3["evidence"]


def test_missing_data_is_undetermined():
    rng = np.random.default_rng(7)
    no_zero = [r for r in make_rows(rng, effect=1.0) if r["eps"] > 0]
    claims = report.judge_claims(no_zero)
    for c in ("C1", "C2", "C3", "C4", "C5"):
        assert claims[c]["holds"] is None and "no eps = 0 run" in claims[c]["evidence"], c
    one_eps = make_rows(rng, effect=1.0, grid=[0.0])
    assert all(report.judge_claims(one_eps)[c]["holds"] is None for c in CLAIMS)
    bare = make_rows(rng, effect=1.0)
    for r in bare:
        r["fisher"], r["transfer"], r["invert"] = {}, {}, {}
    claims = report.judge_claims(bare)
    assert claims["C1"]["holds"] is True
    for c in ("C2", "C3", "C4", "C5", "C6"):
        assert claims[c]["holds"] is None, c
    no_radius = make_rows(rng, effect=1.0, radii=(0.25, 1.0))  # reference radius 0.5 absent
    assert report.judge_claims(no_radius)["C1"]["holds"] is None


def test_not_disjoint_inversion_is_undetermined():
    claims = report.judge_claims(make_rows(np.random.default_rng(8), effect=1.0, disjoint=False))
    for c in ("C5", "C6"):
        assert claims[c]["verdict"] == "undetermined" and "disjoint" in claims[c]["evidence"]
    assert claims["C3"]["holds"] is True


def test_versus_eps0_families_on_known_p_values():
    """family_part on four paired t-tests of known p: `some` reports the Holm-adjusted smallest
    p (4 x the smallest), `every` the largest raw p (intersection-union), each with its eps's
    effect; the contradiction p: `some` the largest margin p, `every` Holm's smallest."""
    rng = np.random.default_rng(31)
    tests = [dict(stats.one_sided_t(rng.normal(mu, 0.01, 3), +1), test="paired t")
             for mu in (0.02, 0.002, -0.004, 0.01)]
    p = [t["p"] for t in tests]
    margins = [stats.t_margin_p(t["mean"], t["se"], t["df"], +1, 0.01) for t in tests]
    some = report.family_part(GRID, tests, "some", +1, 0.01, "seeds")
    assert some["p"] == pytest.approx(min(1.0, 4 * min(p)))
    assert some["effect"] == tests[int(np.argmin(p))]["mean"]
    assert some["p_margin"] == pytest.approx(max(margins))
    every = report.family_part(GRID, tests, "every", +1, 0.01, "seeds")
    assert every["p"] == pytest.approx(max(p))
    assert every["effect"] == tests[int(np.argmax(p))]["mean"]
    assert every["p_margin"] == pytest.approx(min(stats.holm(margins)))


def test_iut_fails_when_one_part_fails():
    """C1 needs both slopes: robust accuracy rising alone is not enough."""
    rows = make_rows(np.random.default_rng(9), effect=0.1)
    for r in rows:
        r["clean_acc"] = 0.9 + 0.05 * r["eps"] + 0.001 * r["seed"]  # rises instead of falling
    c1 = report.judge_claims(rows)["C1"]
    assert c1["holds"] is False and c1["p"] > 0.05


def test_c2_never_falls_back_to_another_measure():
    """The declared measure is absent: undetermined, however clear another measure is."""
    rng = np.random.default_rng(10)
    rows = make_rows(rng, effect=0.1)
    for r in rows:
        r["transfer"] = {"cifar100": 0.5 + 0.01 * r["seed"] - 0.01 * r["eps"] + rng.normal(0, 0.01),
                         "svhn": 0.5 + r["eps"] + rng.normal(0, 0.01)}
    c2 = report.judge_claims(rows)["C2"]
    assert c2["holds"] is None and f"no run reports {TARGET}" in c2["evidence"]
    assert "evidence only" in c2["evidence"] and "svhn" in c2["evidence"]


def test_the_spec_drives_the_verdicts_and_the_rules(monkeypatch):
    """Flipping C3's direction in CLAIMS flips its verdict on the same data and its rules text;
    switching the declaration's inversion method moves C5 to that method."""
    rows = make_rows(np.random.default_rng(11), effect=0.1)
    assert report.judge_claims(rows)["C3"]["holds"] is True
    assert "ln tr F_w falls with eps" in report.rules_markdown()
    flipped = copy.deepcopy(report.CLAIMS)
    flipped["C3"]["parts"][0]["direction"] = +1
    monkeypatch.setattr(report, "CLAIMS", flipped)
    monkeypatch.setattr(claims, "CLAIMS", flipped)
    assert report.judge_claims(rows)["C3"]["holds"] is False
    assert "ln tr F_w rises with eps" in report.rules_markdown()
    for r in rows:
        r["invert"]["tv"]["ssim"] = 0.5 - 0.1 * r["eps"] + 0.01 * r["seed"]  # falls
    assert report.judge_claims(rows)["C5"]["holds"] is True
    assert report.judge_claims(rows, dict(QUICK, inversion_method="tv"))["C5"]["holds"] is False


def test_two_norm_groups_share_the_eps0_baseline():
    """Paper layout: eps 0 filed under l2 and attacked in both norms; linf runs attacked in linf.
    The linf study mirrors the l2 one (same seeds, so the eps 0 baseline pairs with both)."""
    rows = make_rows(np.random.default_rng(12), effect=0.1, grid=[0.0, 0.25, 0.5, 1.0])
    to_linf = {0.25: 2 / 255, 0.5: 4 / 255, 1.0: 8 / 255}  # training eps
    radius_to_linf = {0.25: 4 / 255, 0.5: 8 / 255, 1.0: 16 / 255}  # reference onto reference

    def linf_records(row):
        return [dict(r, norm="linf", eps=radius_to_linf[r["eps"]]) for r in row["robust_acc"]]

    mirrored = []
    for r in rows:
        if r["eps"] > 0:
            m = copy.deepcopy(r)
            m.update(norm="linf", eps=to_linf[r["eps"]], run=r["run"].replace("l2", "linf"),
                     robust_acc=linf_records(r))
            mirrored.append(m)
        else:
            r["robust_acc"] = r["robust_acc"] + linf_records(r)
    rows += mirrored
    assert report.norm_groups(rows) == ["l2", "linf"]
    assert len(report.group_rows(rows, "linf")) == 12
    claims = report.judge_claims(rows, report.DECLARATIONS["paper"])
    for norm in ("l2", "linf"):
        assert claims["C1"]["by_norm"][norm]["holds"] is True, claims["C1"]["by_norm"][norm]
        assert claims["C1"]["by_norm"][norm]["n_seeds"] == 3
    assert claims["C1"]["holds"] is True
    # the same numbers on an eps axis shrunk by 8/255: slopes 255/8 times larger, the same p
    l2, linf = claims["C3"]["by_norm"]["l2"], claims["C3"]["by_norm"]["linf"]
    assert linf["effect"] / l2["effect"] == pytest.approx(255 / 8)
    assert linf["p"] == pytest.approx(l2["p"])


def part(verdict, level="seeds", n=3, p=0.01, p_margin=0.5, effect=1.0):
    return report.result(verdict, verdict, level, n, {"p": p, "p_margin": p_margin,
                                                       "effect": effect, "ci": [0.5, 1.5]})


def test_norm_groups_combine():
    """Intersection-union as coded: undetermined beats everything (missing data never give not
    shown or contradicted), then all-hold, then a contradiction Bonferroni-adjusted over the
    items, else not shown; counts per level."""
    holds, shown_not = part("holds"), part("not shown", "models", 5, p=0.3, effect=0.1)
    assert report.combine({"l2": holds, "linf": part("undetermined")})["verdict"] == "undetermined"
    missing_beside_failing = report.combine([part("contradicted", p=0.6, p_margin=0.001),
                                             part("undetermined")])
    assert missing_beside_failing["verdict"] == "undetermined"
    combined = report.combine({"l2": holds, "x": shown_not})
    assert combined["verdict"] == "not shown" and combined["p"] == 0.3
    assert combined["effect"] == 0.1 and combined["level"] == "models"
    assert combined["n_seeds"] == 3 and combined["n_models"] == 5  # one group at each level
    assert report.count_text(combined) == "3 seeds, 5 models"
    assert report.combine([holds, holds])["verdict"] == "holds"
    # a contradiction p of 0.03 among two parts is 0.06 after Bonferroni: not shown
    assert report.combine([holds, part("not shown", p=0.4, p_margin=0.03)])["verdict"] == \
        "not shown"
    c = report.combine([holds, part("contradicted", p=0.4, p_margin=0.02, effect=-2.0)])
    assert c["verdict"] == "contradicted" and c["p_margin"] == 0.04 and c["effect"] == -2.0
    assert c["holds"] is False and report.combine([holds])["holds"] is True


# ----------------------------------------------------------------------------- files and CLI

def write_run(folder, eps, seed, clean, norm="l2", disjoint=True, examples=False, rng=None):
    """The files of one run as the scripts write them; examples: per-example .npz and per-image
    SSIM too (one model per eps: a clear planted effect)."""
    folder.mkdir(parents=True)
    robust = [{"norm": "l2", "eps": r, "attack": "pgd", "steps": 20, "restarts": 1,
               "acc": min(0.95, 0.2 + eps - 0.1 * r + 0.003 * seed)} for r in (0.25, 0.5)]
    (folder / "metrics.json").write_text(json.dumps({
        "clean_acc": clean, "robust_acc": robust, "eps": eps, "norm": norm, "seed": seed,
        "arch": "cnn", "dataset": "fashion-mnist", "classes": [0, 1, 2, 3, 4], "epochs": 2,
        "train_seconds": 1.0, "test_size": 200,
        "provenance": {"settings": {}, "settings_hash": "x"}}))
    trace = math.exp(2 - eps + 0.01 * seed)
    (folder / "fisher.json").write_text(json.dumps({
        "weights_trace": trace, "weights_trace_se": 0.1, "weights_trace_empirical": None,
        "input_trace": trace / 2, "input_trace_se": 0.1, "input_lambda_max": trace / 4, "n": 64}))
    far = {"acc": 0.8 + 0.05 * eps + 0.002 * seed, "l2": 1e-3, "n_train": 100, "n_test": 50,
           "feature_dim": 32, "few_shot": {"10": {"acc": 0.5 + 0.01 * eps + 0.001 * seed}},
           "finetune": {"acc": 0.9}}
    ssim = 0.3 + 0.1 * eps + 0.004 * seed
    invert = {"baseline": {"psnr": 12.0, "ssim": ssim, "judge_acc": None, "n_images": 8},
              "noise": {"psnr": 13.0, "ssim": ssim + 0.02 + 0.001 * seed, "judge_acc": 0.5},
              "images": {"split": "test", "start": 64, "n": 8}, "tuned_on": "user",
              "disjoint": disjoint, "provenance": {}}
    if examples:
        (folder / "correct").mkdir()
        p = 0.6 + 0.05 * min(eps, 2)
        probe, shots = rng.random(200) < p, rng.random((5, 200)) < p - 0.1
        np.savez(folder / "correct" / "fashion-mnist_5-9+invert.npz", probe=probe.astype(np.uint8),
                 **{"10-shot": shots.astype(np.uint8), "fine-tuned": probe.astype(np.uint8)})
        far.update(acc=float(probe.mean()), correct="correct/fashion-mnist_5-9+invert.npz")
        far["few_shot"]["10"]["acc"] = float(shots.mean())
        images = {"baseline": ssim + rng.normal(0, 0.05, 8)}
        images["tv"] = images["baseline"] + 0.03 + rng.normal(0, 0.01, 8)
        for method, ref in (("noise", "baseline"), ("noise-tv", "tv")):
            images[method] = images[ref] + 0.02 + rng.normal(0, 0.005, 8)
        for method, values in images.items():
            invert[method] = {"ssim": float(values.mean()), "judge_acc": None,
                              "per_image": {"ssim": list(values), "psnr": [12.0] * 8}}
        np.save(folder / "recon_baseline.npy", rng.random((8, 1, 28, 28), dtype=np.float32))
        np.save(folder / "originals.npy", rng.random((8, 1, 28, 28), dtype=np.float32))
    (folder / "transfer.json").write_text(json.dumps({
        "fashion-mnist:5-9": {"acc": 0.8 + 0.05 * eps + 0.002 * seed, "l2": 1e-3},
        "fashion-mnist:5-9+invert": far, "provenance": {"settings": {}}}))
    (folder / "invert.json").write_text(json.dumps(invert))


def write_study(root, seeds=(0, 1, 2), grid=(0.0, 0.5, 1.0), examples=False):
    rng = np.random.default_rng(0)
    for seed in seeds:
        for eps in grid:
            clean = 0.9 - 0.1 * eps - 0.003 * seed * eps
            write_run(root / f"l2_eps{eps}_seed{seed}", eps, seed, clean, examples=examples,
                      rng=rng)
    (root / "judge").mkdir()
    (root / "judge" / "metrics.json").write_text(json.dumps(
        {"clean_acc": 0.95, "robust_acc": [], "eps": 0.0, "norm": "l2", "seed": 0}))


def test_cli_end_to_end_seeds_level(tmp_path):
    write_study(tmp_path)
    proc = run_main("report.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("no study.json") and "DECLARATIONS[\"quick\"]" in out[0]
    assert [line.split()[0] for line in out[1:7]] == CLAIMS and out[-1].startswith("wrote")
    assert out[1].startswith("C1 holds (p=") and "level seeds" in out[1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"declaration", "rules", "rows", "claims", "incomplete"}
    assert summary["declaration"] == {"preset": "quick", "decisions": QUICK, "source": "defaults"}
    assert summary["incomplete"] == []  # no incomplete.tsv: nothing run_all.sh found unfinished
    keys = {"verdict", "holds", "level", "evidence", "test", "p", "effect", "ci", "n_seeds",
            "by_norm"}
    for c in CLAIMS:
        assert keys <= set(summary["claims"][c]), c
        assert set(summary["claims"][c]["by_norm"]["l2"]) >= keys - {"by_norm"}
    assert summary["claims"]["C3"]["holds"] is True and summary["claims"]["C3"]["level"] == "seeds"
    assert summary["claims"]["C6"]["holds"] is None  # no noise-tv / tv pair
    assert [r["eps"] for r in summary["rows"]] == [0.0] * 3 + [0.5] * 3 + [1.0] * 3 + [0.0]
    row = next(r for r in summary["rows"] if r["run"] == "l2_eps0.5_seed1")
    # every transfer measure of a target: full data, K-shot, fine-tuned
    assert row["transfer"] == {"fashion-mnist:5-9+invert": pytest.approx(0.827),
                               TARGET: pytest.approx(0.506),
                               "fashion-mnist:5-9+invert fine-tuned": 0.9,
                               "fashion-mnist:5-9": pytest.approx(0.827)}
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Results\n\n| claim | verdict | level | effect [90% CI] | "
                           "smallest effect | MDE (80% power) | p |")
    assert "| C1: robustness costs source accuracy | **holds** | seeds |" in text
    assert text.index("## Plots") < text.index("## Tables") < text.index("## Rules")
    assert "| standard (all norms) | 0 | 3 |" in text and "| l2 | 0.5 | 3 |" in text
    assert report.rules_markdown() in text and report.MODELS_SENTENCE in text
    # one line under the table gives each row's unit; a trend's smallest effect per unit eps
    # is read back as the declared change over the grid (eps 0-1 here); signs agree per row
    units = text.split("\n\n")[2]
    assert units.startswith("Units: ") and "\n" not in units
    assert "C3 ln tr F_w per unit eps (-0.223 is a 20% fall (a factor 1.25) over the grid's eps " \
        "range 1)" in units
    assert "C4 ln tr F_x per unit eps (-0.223" in units and "or ln lambda_max F_x" in units
    assert "C1 clean source test accuracy per unit eps (-0.01 is a fall of 0.01" in units
    assert "C2 accuracy on the declared primary transfer measure at an eps > 0 minus" in units
    for c in summary["claims"].values():
        signs = {math.copysign(1, c[k]) for k in ("effect", "smallest_effect", "mde")
                 if c[k] is not None and c["verdict"] == "holds"}
        assert len(signs) <= 1, c
    decimals = re.findall(r"\d+\.\d+", text.partition("## Rules")[0])
    assert decimals and all(len(d.replace(".", "").lstrip("0")) <= 3 for d in decimals)


def test_cli_end_to_end_models_level(tmp_path):
    """One seed of five eps with the per-example and per-image records: level models."""
    write_study(tmp_path, seeds=(0,), grid=(0.0, 0.25, 0.5, 1.0, 2.0), examples=True)
    assert run_main("report.py", "--declare", "quick", tmp_path).returncode == 0
    proc = run_main("report.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.startswith("no study.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["declaration"]["source"] == "study.json"
    for c in CLAIMS:
        assert summary["claims"][c]["level"] == "models", (c, summary["claims"][c]["evidence"])
        assert summary["claims"][c]["n_models"] >= (2 if c == "C2" else 4)  # C2: eps 0, 0.5
    assert summary["claims"]["C3"]["holds"] is True
    assert "draws" in summary["claims"]["C2"]["evidence"]
    assert "correct" not in summary["rows"][0]
    text = (tmp_path / "report.md").read_text()
    assert "| models |" in text and "![inversions.png](inversions.png)" in text
    pytest.importorskip("matplotlib")
    assert {"inversions.png", "transfer_vs_eps.png", "accuracy_vs_eps.png"} <= {
        p.name for p in tmp_path.glob("*.png")}


def test_an_old_invert_json_is_read_under_the_methods_one_name(tmp_path):
    """invert.json files written before noise-tv had one name hold it as `improved`: C6 reads
    it as noise-tv; a file with both names for one method is refused in one line."""
    import collect
    write_run(tmp_path / "l2_eps0.5_seed0", 0.5, 0, 0.85, examples=True,
              rng=np.random.default_rng(0))
    run = tmp_path / "l2_eps0.5_seed0"
    new = collect.collect_run(run)["invert"]
    invert = json.loads((run / "invert.json").read_text())
    invert["improved"] = invert.pop("noise-tv")
    (run / "invert.json").write_text(json.dumps(invert))
    assert collect.collect_run(run)["invert"] == new
    invert["noise-tv"] = invert["improved"]
    (run / "invert.json").write_text(json.dumps(invert))
    with pytest.raises(report.UserError, match="improved = noise-tv"):
        collect.collect_run(run)


def test_declared_measure_removed_gives_undetermined(tmp_path):
    """The quick study without its declared 10-shot measure: C2 is undetermined, never decided
    on the full-data probe that is still there."""
    write_study(tmp_path)
    for path in tmp_path.glob("*/transfer.json"):
        transfer = json.loads(path.read_text())
        for v in transfer.values():
            v.pop("few_shot", None)
        path.write_text(json.dumps(transfer))
    assert run_main("report.py", "--declare", "quick", tmp_path).returncode == 0
    proc = run_main("report.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    c2 = json.loads((tmp_path / "summary.json").read_text())["claims"]["C2"]
    assert c2["verdict"] == "undetermined" and f"no run reports {TARGET}" in c2["evidence"]


def test_declare_writes_the_preset(tmp_path):
    for name, decisions in report.DECLARATIONS.items():
        assert run_main("report.py", "--declare", name, tmp_path / name).returncode == 0
        study = json.loads((tmp_path / name / "study.json").read_text())
        assert study["preset"] == name and study["decisions"] == decisions  # exact round trip
        assert "provenance" in study
    assert report.DECLARATIONS["paper"]["reference_radius"] == {"l2": 0.5, "linf": 8 / 255}
    assert_user_error(run_main("report.py", "--declare", "huge", tmp_path), "invalid choice")


def test_rules_block_of_the_protocol_is_generated():
    """docs/PROTOCOL.md's rules block is exactly what `report.py --rules` prints."""
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    begin, end = text.index(report.RULES_BEGIN), text.index(report.RULES_END)
    assert text[begin + len(report.RULES_BEGIN) + 1:end] == report.rules_markdown()
    proc = run_main("report.py", "--rules")
    assert proc.stdout == text[begin:end + len(report.RULES_END)] + "\n"


def test_help_has_no_measured_numbers():
    proc = run_main("report.py", "--help")
    assert proc.returncode == 0 and not re.search(r"\d\.\d", proc.stdout)


def test_report_does_not_import_torch():
    code = "import report, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_user_errors(tmp_path):
    assert_user_error(run_main("report.py", tmp_path / "absent"), "not found")
    assert_user_error(run_main("report.py", tmp_path), "no run")
    (tmp_path / "study.json").write_text(json.dumps({"decisions": {"reference_radius": 1}}))
    assert_user_error(run_main("report.py", tmp_path), "decisions")
    bad = dict(QUICK, noise_pairs=[["noise"]])
    (tmp_path / "study.json").write_text(json.dumps({"decisions": bad}))
    assert_user_error(run_main("report.py", tmp_path), "noise_pairs")
    (tmp_path / "study.json").unlink()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{truncated")
    assert_user_error(run_main("report.py", tmp_path), "not valid JSON")
    (tmp_path / "bad" / "metrics.json").write_text('{"eps": 0.5}')
    assert_user_error(run_main("report.py", tmp_path), "lacks norm, clean_acc, robust_acc, seed")
    (tmp_path / "bad" / "metrics.json").write_text(
        '{"eps": 0.5, "norm": "l2", "clean_acc": 0.9, "seed": 0, "robust_acc": {"0.5": 0.3}}')
    assert_user_error(run_main("report.py", tmp_path), "robust_acc")


# ----------------------------------------------------------------------------- four verdicts

def test_a_failure_to_reject_is_not_shown_and_an_excluded_effect_is_contradicted():
    """A null study is `not shown` (or, with tight data, `contradicted`), never "does not hold";
    an effect bounded well below the smallest effect of interest is contradicted; holds maps
    to summary's `holds` true, the other two to false."""
    rows = make_rows(np.random.default_rng(20), effect=0.0, noise=0.05)
    verdicts = {c["verdict"] for c in report.judge_claims(rows).values()}
    assert verdicts <= set(claims.VERDICTS) - {"undetermined"}
    tight = make_rows(np.random.default_rng(21), effect=0.0, noise=1e-4)
    noise = np.random.default_rng(0).normal(0, 1e-4, len(tight))
    for r, e in zip(tight, noise):  # the seeds' offsets removed: every contrast is 0 +- 1e-4
        r["transfer"][TARGET] = 0.8 + e
    c2 = report.judge_claims(tight, dict(QUICK, transfer_eps=None))["C2"]
    assert c2["verdict"] == "contradicted" and c2["holds"] is False and c2["p_margin"] < 0.05
    assert c2["smallest_effect"] == pytest.approx(0.01) and 0 < c2["mde"] < 0.01


def test_mcnemar_family_that_cannot_reach_alpha_is_undetermined():
    """3 wins and 0 losses at every eps: p 1/8 each, Holm over 4 can never reach 0.05."""
    rows = make_rows(np.random.default_rng(22), effect=0.0, n_seeds=1, examples=True)
    for r in rows:
        probe = np.zeros(N_EXAMPLES, np.uint8)
        probe[:3] = r["eps"] > 0
        r["correct"][FULL] = probe
    c2 = report.judge_claims(rows, dict(QUICK, primary_transfer=FULL, transfer_eps=None))["C2"]
    assert c2["verdict"] == "undetermined" and "cannot reach" in c2["evidence"], c2["evidence"]


def test_one_draw_and_fine_tuning_are_undetermined_at_level_models():
    rows = make_rows(np.random.default_rng(23), effect=0.1, n_seeds=1, examples=True)
    one_draw = copy.deepcopy(rows)
    for r in one_draw:
        r["correct"][TARGET] = r["correct"][TARGET][:1]
    c2 = report.judge_claims(one_draw)["C2"]
    assert c2["verdict"] == "undetermined" and "fewer than 2 few-shot draws" in c2["evidence"]
    for r in rows:
        r["transfer"][FULL + " fine-tuned"] = r["transfer"][FULL]
        r["correct"][FULL + " fine-tuned"] = r["correct"][FULL]
    c2 = report.judge_claims(rows, dict(QUICK, primary_transfer=FULL + " fine-tuned"))["C2"]
    assert c2["verdict"] == "undetermined" and "fine-tuning" in c2["evidence"]


def test_robust_accuracy_needs_the_same_attacks():
    rows = make_rows(np.random.default_rng(24), effect=0.1)
    assert report.judge_claims(rows)["C1"]["verdict"] == "holds"
    for r in rows:
        if r["eps"] == 1.0:  # also attacked by APGD: its minimum is not comparable
            r["robust_acc"].append({"norm": "l2", "eps": 0.5, "attack": "apgd", "acc": 0.1})
    c1 = report.judge_claims(rows)["C1"]
    assert c1["verdict"] == "undetermined" and "different attacks" in c1["evidence"]


def test_unknown_disjointness_is_undetermined():
    claims = report.judge_claims(make_rows(np.random.default_rng(25), effect=1.0, disjoint=None))
    assert claims["C5"]["verdict"] == claims["C6"]["verdict"] == "undetermined"
    assert claims["C3"]["verdict"] == "holds"


def test_c1_robust_part_compares_every_robust_model_with_eps0():
    """One model per eps, robust accuracy at L2 0.5 peaking inside the grid (the quick study's
    seed 0: 0.41, 0.80, 0.81, 0.80, 0.76): every robust model is far more robust than the
    standard one, so C1's robust part holds; the old monotone-trend rule gave p = 0.41."""
    rows = make_rows(np.random.default_rng(26), effect=0.1, n_seeds=1)
    for r, acc in zip(rows, (0.41, 0.80, 0.81, 0.80, 0.76)):
        r["robust_acc"] = [{"norm": "l2", "eps": 0.5, "attack": "pgd", "acc": acc}]
    c1 = report.judge_claims(rows)["C1"]
    assert c1["verdict"] == "holds" and c1["level"] == "models", c1["evidence"]
    assert stats.kendall_test([0.41, 0.80, 0.81, 0.80, 0.76], +1)["p"] > 0.05


def test_rules_say_when_sen_and_kendall_may_disagree():
    """Tied values: the tie-aware test rejects (p = 1/30) while Sen's distinct-values interval
    reaches 0; the rules text says so, and no longer claims that fewer than 4 distinct values
    cannot reject ([2, 2, 1, ...] reaches p_min = 1/30)."""
    y = [0.5, 0.5, -1, -1, -2]
    assert stats.kendall_test(y, -1)["p"] == pytest.approx(1 / 30)
    assert stats.sen_slope(GRID, y)[1][1] == 0.0
    assert stats.kendall_test([2, 2, 1, 1, 0], -1)["p_min"] == pytest.approx(1 / 30)
    rules = report.rules_markdown()
    assert "may disagree with the test" in rules and "fewer than 4 distinct" not in rules


def test_mde_has_the_power_it_claims():
    """At a true effect equal to the MDE the tests reject 80% of the time: the t test (3 seeds)
    and the Kendall test (5 models), on 8000 fresh simulations each. Within 0.012 of 0.8:
    2.7 SE of 8000 (a true 80% fails with probability 0.007; with the Kendall MDE's own
    simulation error, 20,000 studies, 0.023), and a true 78% or 82% passes with probability
    at most 0.042 (0.008 / 0.0046 = 1.73 SE)."""
    rng = np.random.default_rng(27)
    sd, sims = 1.0, 8000
    mde = stats.mde_t(sd / math.sqrt(3), 2)
    rejected = np.mean([stats.one_sided_t(v, +1)["p"] < 0.05
                        for v in rng.normal(mde, sd, (sims, 3))])
    assert abs(rejected - 0.8) < 0.012, rejected
    x = np.array(GRID)
    b = stats.kendall_mde(x, 0.5)
    rejected = np.mean([stats.kendall_test(b * x + z, +1)["p"] < 0.05
                        for z in rng.normal(0, 0.5, (sims, 5))])
    assert abs(rejected - 0.8) < 0.012, rejected
    assert stats.kendall_mde([0, 1, 2], 1.0) is None  # 1/3! cannot reach alpha


def test_margin_tests_reject_at_their_level():
    """The contradiction tests at an effect equal to the margin reject at most alpha (the t
    test exactly alpha): below 6% of 4000 studies, which a true 5% exceeds with probability
    0.003 and a true 7% meets with probability 0.005."""
    rng = np.random.default_rng(28)
    x = np.array(GRID)
    t_rate = np.mean([stats.t_margin_p(v.mean(), v.std(ddof=1) / math.sqrt(3), 2, +1, 0.5) < 0.05
                      for v in rng.normal(0.5, 1.0, (4000, 3))])
    k_rate = np.mean([stats.kendall_margin_p(x, 0.5 * x + z, +1, 0.5) < 0.05
                      for z in rng.normal(0, 0.3, (4000, 5))])
    assert t_rate < 0.06 and k_rate < 0.06 and t_rate > 0.04, (t_rate, k_rate)


def test_statistics_at_their_edges():
    """Identical values: no noise estimate (p None, never 0); one value, a [N] against a
    [draws, N] array, or a bad direction: ValueError naming it; McNemar gives its SE."""
    assert stats.one_sided_t([0.3, 0.3], +1)["p"] is None
    for bad in ([0.3], [], [0.1, float("nan")]):
        with pytest.raises(ValueError, match="at least 2 finite values"):
            stats.one_sided_t(bad, +1)
    with pytest.raises(ValueError, match=r"\(5,\) and \(3, 5\)"):
        stats.example_test(np.ones(5), np.ones((3, 5)), +1)
    with pytest.raises(ValueError, match="direction"):
        stats.kendall_test([1, 2, 3], 0)
    res = stats.example_test([1, 1, 0, 0], [0, 1, 0, 1], +1)
    assert res["se"] == pytest.approx(math.sqrt(2) / 4) and res["test"] == "McNemar"
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar([0.5, 1], [0, 1], +1)


@pytest.mark.parametrize("call,names", [
    (lambda: stats.mde_t(-0.1, 3), "se must be a finite number >= 0, got -0.1"),
    (lambda: stats.mde_t(float("nan"), 3), "se must"),
    (lambda: stats.mde_t(0.1, 0), "degrees of freedom"),
    (lambda: stats.kendall_mde([], 1.0), "at least 2 x values"),
    (lambda: stats.kendall_mde([0.0, 1.0, 2.0], -1.0), "sigma >= 0"),
    (lambda: stats.one_sided_t([], 1), "at least 2"),
    (lambda: stats.slope([0, 1, 2], [1, 2]), "one shape"),
    (lambda: stats.example_test(np.ones(5), np.ones(4), 1), "one shape"),
])
def test_power_and_tests_refuse_bad_input_with_a_value_error_naming_it(call, names):
    """A negative MDE would read as an effect of the other sign; no values, no MDE."""
    with pytest.raises(ValueError, match=re.escape(names)):
        call()


def test_a_declaration_is_fixed_once_and_a_redeclaration_is_recorded(tmp_path, monkeypatch):
    """DESIGN.md, Pre-registration: study.json is written by the first declaration; the same
    one again changes nothing; one that differs (claims.py edited after the numbers) is refused
    in one line naming what changed; --redeclare replaces it, recording old, new and when,
    and report.md says so."""
    write_study(tmp_path)
    assert run_main("report.py", "--declare", "quick", tmp_path).returncode == 0
    path = tmp_path / "study.json"
    first = path.read_text()
    proc = run_main("report.py", "--declare", "quick", tmp_path)
    assert proc.returncode == 0 and "unchanged" in proc.stdout and path.read_text() == first
    edited = copy.deepcopy(claims.DECLARATIONS["quick"])
    edited["transfer_eps"] = [1.0]
    monkeypatch.setitem(claims.DECLARATIONS, "quick", edited)
    assert_user_error(run_main("report.py", "--declare", "quick", tmp_path),
                      "declares other decisions", "decisions.transfer_eps [0.5] -> [1.0]",
                      "--redeclare")
    assert path.read_text() == first
    assert_user_error(run_main("report.py", "--declare", "paper", tmp_path), "decisions.",
                      "preset \"quick\" -> \"paper\"")
    proc = run_main("report.py", "--declare", "quick", tmp_path, "--redeclare")
    assert proc.returncode == 0 and "decisions.transfer_eps" in proc.stdout, proc.stderr
    study = json.loads(path.read_text())
    assert study["decisions"]["transfer_eps"] == [1.0] and study["declared"]
    [change] = study["redeclared"]
    assert change["changed"] == ["decisions.transfer_eps"] and change["when"]
    assert change["old"]["decisions"]["transfer_eps"] == [0.5]
    assert change["new"]["decisions"]["transfer_eps"] == [1.0]
    assert run_main("report.py", tmp_path).returncode == 0
    text = (tmp_path / "report.md").read_text()
    assert f"**Re-declared {change['when']}**: decisions.transfer_eps changed" in text


def test_the_report_names_unfinished_steps_and_where_the_runs_ran(tmp_path):
    """run_all.sh's incomplete.tsv (cell, step, log) in report.md and summary.json, with the
    log's last line; the device and precision of every run, counted."""
    write_study(tmp_path)
    for run in ("l2_eps0.5_seed0", "l2_eps1.0_seed0"):
        path = tmp_path / run / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics.update(device="cpu", precision="float32")
        path.write_text(json.dumps(metrics))
    (tmp_path / "l2_eps0.5_seed1" / "fisher.log").write_text("loading\nValueError: boom\n")
    (tmp_path / "l2_eps1.0_seed2" / "train.log").write_text("")
    (tmp_path / "incomplete.tsv").write_text(
        "l2_eps0.5_seed1\tfisher\tl2_eps0.5_seed1/fisher.log\n"
        "l2_eps1.0_seed2\tmetrics\tl2_eps1.0_seed2/train.log\n"
        "l2_eps2.0_seed0\tmetrics\tl2_eps2.0_seed0/train.log\n")
    proc = run_main("report.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "did not finish: l2_eps0.5_seed1 fisher (ValueError: boom)" in proc.stdout
    text = (tmp_path / "report.md").read_text()
    assert "**Did not finish: 3 steps of 3 cells (l2_eps0.5_seed1, l2_eps1.0_seed2, " \
        "l2_eps2.0_seed0)**" in text
    assert "- l2_eps1.0_seed2: metrics (l2_eps1.0_seed2/train.log: empty log: stopped at its " \
        "start)" in text and "l2_eps2.0_seed0/train.log: never ran)" in text
    assert "Ran on: cpu, float32 (2 runs); not recorded, not recorded (8 runs)." in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["cell"] for s in summary["incomplete"]] == \
        ["l2_eps0.5_seed1", "l2_eps1.0_seed2", "l2_eps2.0_seed0"]
    (tmp_path / "incomplete.tsv").write_text("")
    assert run_main("report.py", tmp_path).returncode == 0
    assert "Did not finish" not in (tmp_path / "report.md").read_text()
