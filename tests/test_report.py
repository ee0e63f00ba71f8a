"""report.py: the t distribution, Holm, verdicts on simulated studies with known truth, norm
groups, missing data, the command line end to end and its user errors."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import report
from conftest import ROOT, assert_user_error, run_script

GRID = [0.0, 0.25, 0.5, 1.0, 2.0]  # four eps > 0: C2 chooses among four, Holm must hold the line
CLAIMS = ["C1", "C2", "C3", "C4", "C5", "C6"]
TARGET = report.PRIMARY_TARGETS[0]


# ----------------------------------------------------------------------------- t distribution

@pytest.mark.parametrize("t, df", [(2.919986, 2), (6.313752, 1), (1.812461, 10)])
def test_t_cdf_at_tabulated_critical_values(t, df):
    """One-sided 5% critical values of Student's t (printed tables)."""
    assert report.t_cdf(-t, df) == pytest.approx(0.05, abs=1e-6)
    assert report.t_cdf(t, df) == pytest.approx(0.95, abs=1e-6)


def test_t_cdf_limits_and_symmetry():
    assert report.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert report.t_cdf(1.3, 4) + report.t_cdf(-1.3, 4) == pytest.approx(1.0)
    assert report.t_cdf(math.inf, 2) == 1.0 and report.t_cdf(-math.inf, 2) == 0.0
    # df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t) / pi
    assert report.t_cdf(0.7, 1) == pytest.approx(0.5 + math.atan(0.7) / math.pi, rel=1e-12)
    # large df approaches the standard normal
    for t in (-2.5, -1.0, 0.4, 1.96):
        normal = 0.5 * math.erfc(-t / math.sqrt(2))
        assert report.t_cdf(t, 1e6) == pytest.approx(normal, abs=1e-6)


def test_t_quantile_inverts_the_cdf():
    for df in (1, 2, 5, 30):
        for q in (0.01, 0.05, 0.5, 0.9, 0.95, 0.999):
            assert report.t_cdf(report.t_quantile(q, df), df) == pytest.approx(q, abs=1e-10)
    assert report.t_quantile(0.95, 2) == pytest.approx(2.919986, abs=1e-6)


def test_t_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 25, 400):
        for t in (-8.0, -2.0, -0.3, 0.0, 0.5, 1.7, 4.0, 12.0):
            assert report.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-14)
        assert report.t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.95, df), rel=1e-9)
    v = [0.3, 0.1, 0.25, 0.4]
    res = stats.ttest_1samp(v, 0.0, alternative="greater")
    assert report.one_sided_t(v, +1)["p"] == pytest.approx(res.pvalue, rel=1e-9)
    assert report.one_sided_t(v, -1)["p"] == pytest.approx(1 - res.pvalue, rel=1e-9)


def test_one_sided_t_ci_agrees_with_the_test():
    """The 90% CI excludes 0 on the claimed side exactly when the one-sided 5% test rejects."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.normal(0.5, 1.0, size=3)
        s = report.one_sided_t(v, +1)
        assert (s["ci"][0] > 0) == (s["p"] < 0.05)
        s = report.one_sided_t(v, -1)
        assert (s["ci"][1] < 0) == (s["p"] < 0.05)


def test_holm_hand_worked():
    # sorted p: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert report.holm([0.2]) == pytest.approx([0.2])


def test_slope():
    assert report.slope([0, 1, 2, 4], [1, 3, 5, 9]) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- simulated studies

def make_rows(rng, effect=0.0, n_seeds=3, grid=GRID, noise=0.01, norm="l2", radii=(0.25, 0.5, 1.0),
              zero_norm="l2", disjoint=True):
    """A study with known truth. Each seed has its own offset per quantity, shared across eps
    (pairing), plus independent noise per run. effect > 0 plants every claimed effect: clean
    accuracy falls, robust accuracy rises, log Fisher falls, SSIM rises (all by `effect` per
    unit eps), transfer gains `effect` at every eps > 0, noise averaging gains `effect` SSIM."""
    rows = []
    for seed in range(n_seeds):
        off = dict(zip(["clean", "robust", "wt", "it", "il", "transfer", "ssim", "tv"],
                       rng.normal(0.0, 0.05, size=8)))
        for eps in grid:
            def n():
                return rng.normal(0.0, noise)
            robust_eps = 0.3 + off["robust"] + effect * eps
            base = 0.3 + off["ssim"] + effect * eps + n()
            tv = base + 0.02 + off["tv"] + n()
            noise_gain = effect if eps > 0 else 0.0
            rows.append({
                "run": f"{norm}_eps{eps}_seed{seed}", "role": "study", "seed": seed, "eps": eps,
                "norm": zero_norm if eps == 0 else norm,
                "clean_acc": 0.9 + off["clean"] - effect * eps + n(),
                "robust_acc": [{"norm": norm, "eps": r, "attack": "pgd", "steps": 10, "restarts": 1,
                                "acc": robust_eps - 0.1 * r + n()} for r in radii],
                "fisher": {"weights_trace": math.exp(3 + off["wt"] - effect * eps + n()),
                           "input_trace": math.exp(1 + off["it"] - effect * eps + n()),
                           "input_lambda_max": math.exp(0.5 + off["il"] - effect * eps + n())},
                "transfer": {TARGET: 0.8 + off["transfer"] + (effect if eps > 0 else 0.0) + n()},
                "invert": {"baseline": {"ssim": base}, "tv": {"ssim": tv},
                           "noise": {"ssim": base + noise_gain + n()},
                           "noise-tv": {"ssim": tv + noise_gain + n()}},
                "invert_disjoint": disjoint,
            })
    return rows


def holds_rates(effect, studies=200, seed=0):
    rng = np.random.default_rng(seed)
    counts = {c: 0 for c in CLAIMS}
    for _ in range(studies):
        claims = report.judge_claims(make_rows(rng, effect))
        for c in CLAIMS:
            counts[c] += claims[c]["holds"] is True
    return {c: counts[c] / studies for c in CLAIMS}


@pytest.fixture(scope="module")
def null_rates():
    return holds_rates(effect=0.0, seed=1)


@pytest.fixture(scope="module")
def planted_rates():
    return holds_rates(effect=0.1, seed=2)


@pytest.mark.parametrize("claim", CLAIMS)
def test_false_positive_rate_under_no_effect(null_rates, claim):
    """About 5% at most (C2: best of four eps, Holm-corrected); 0.10 allows simulation noise."""
    assert null_rates[claim] <= 0.10, null_rates


@pytest.mark.parametrize("claim", CLAIMS)
def test_power_under_planted_effects(planted_rates, claim):
    assert planted_rates[claim] >= 0.90, planted_rates


def test_a_null_claim_does_not_hold_rather_than_undetermined():
    claims = report.judge_claims(make_rows(np.random.default_rng(3), effect=0.0))
    for c in CLAIMS:
        assert claims[c]["holds"] in (True, False), (c, claims[c]["evidence"])
        assert claims[c]["n_seeds"] == 3


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_too_few_seeds_is_undetermined(n_seeds):
    claims = report.judge_claims(make_rows(np.random.default_rng(4), effect=1.0, n_seeds=n_seeds))
    for c in CLAIMS:
        assert claims[c]["holds"] is None and claims[c]["verdict"] == "undetermined", c
        assert claims[c]["p"] is None
    assert f"needs {report.MIN_SEEDS}" in claims["C3"]["evidence"]


def test_incomplete_seeds_do_not_count():
    """A third seed that lacks one eps leaves two complete seeds: undetermined."""
    rows = make_rows(np.random.default_rng(5), effect=1.0)
    rows = [r for r in rows if not (r["seed"] == 2 and r["eps"] == 1.0)]
    claims = report.judge_claims(rows)
    assert claims["C3"]["holds"] is None and "2 seed(s)" in claims["C3"]["evidence"]


def test_missing_data_is_undetermined():
    rng = np.random.default_rng(6)
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
    claims = report.judge_claims(make_rows(np.random.default_rng(7), effect=1.0, disjoint=False))
    for c in ("C5", "C6"):
        assert claims[c]["holds"] is None and "not disjoint" in claims[c]["evidence"]
    assert claims["C3"]["holds"] is True


def test_iut_fails_when_one_part_fails():
    """C1 needs both slopes: robust accuracy rising alone is not enough."""
    rows = make_rows(np.random.default_rng(8), effect=0.1)
    for r in rows:
        r["clean_acc"] = 0.9 + 0.05 * r["eps"] + 0.001 * r["seed"]  # rises instead of falling
    c1 = report.judge_claims(rows)["C1"]
    assert c1["holds"] is False and c1["p"] > 0.05


def test_c2_decided_on_the_primary_target_only():
    rng = np.random.default_rng(9)
    rows = make_rows(rng, effect=0.1)
    for r in rows:  # a later primary target with no effect, an extra target with a big one
        r["transfer"] = {"cifar100": 0.5 + 0.01 * r["seed"] - 0.01 * r["eps"] + rng.normal(0, 0.01),
                         "svhn": 0.5 + r["eps"] + rng.normal(0, 0.01)}
    c2 = report.judge_claims(rows)["C2"]
    assert c2["holds"] is False and "svhn" in c2["evidence"] and "evidence only" in c2["evidence"]


def test_two_norm_groups_share_the_eps0_baseline():
    """Paper layout: eps 0 filed under l2 and attacked in both norms; linf runs attacked in linf.
    The linf study mirrors the l2 one (same seeds, so the eps 0 baseline pairs with both)."""
    import copy
    rows = make_rows(np.random.default_rng(10), effect=0.1, grid=[0.0, 0.25, 0.5, 1.0])
    to_linf = {0.25: 2 / 255, 0.5: 4 / 255, 1.0: 8 / 255}  # training eps
    radius_to_linf = {0.25: 4 / 255, 0.5: 8 / 255, 1.0: 16 / 255}  # attack radii: reference onto reference

    def linf_records(row):
        return [dict(r, norm="linf", eps=radius_to_linf[r["eps"]]) for r in row["robust_acc"]]

    mirrored = []
    for r in rows:
        if r["eps"] > 0:
            m = copy.deepcopy(r)
            m.update(norm="linf", eps=to_linf[r["eps"]], run=r["run"].replace("l2", "linf"), robust_acc=linf_records(r))
            mirrored.append(m)
    for r in rows:
        if r["eps"] == 0:
            r["robust_acc"] = r["robust_acc"] + linf_records(r)
    rows += mirrored
    assert report.norm_groups(rows) == ["l2", "linf"]
    assert len(report.group_rows(rows, "linf")) == 12
    claims = report.judge_claims(rows)
    assert set(claims["C1"]["by_norm"]) == {"l2", "linf"}
    for norm in ("l2", "linf"):
        assert claims["C1"]["by_norm"][norm]["holds"] is True, claims["C1"]["by_norm"][norm]
        assert claims["C1"]["by_norm"][norm]["n_seeds"] == 3
    assert claims["C1"]["holds"] is True
    # the same numbers on an eps axis shrunk by 8/255: slopes 255/8 times larger, the same p
    l2, linf = claims["C1"]["by_norm"]["l2"], claims["C1"]["by_norm"]["linf"]
    assert linf["effect"] / l2["effect"] == pytest.approx(255 / 8) and linf["p"] == pytest.approx(l2["p"])


def test_norm_groups_combine():
    g = {"l2": report.result(True, "a", 3, 0.01, 1.0, [0.5, 1.5]),
         "linf": report.result(None, "b", 1)}
    assert report.combine(g)["verdict"] == "undetermined"
    g["x"] = report.result(False, "c", 3, 0.3, 0.1, [-0.2, 0.4])
    combined = report.combine(g)
    assert combined["verdict"] == "does not hold" and combined["p"] == 0.3


# ----------------------------------------------------------------------------- command line

def write_run(folder, eps, seed, clean, norm="l2", disjoint=True):
    folder.mkdir(parents=True)
    robust = [{"norm": "l2", "eps": r, "attack": "pgd", "steps": 20, "restarts": 1,
               "acc": 0.2 + eps - 0.1 * r + 0.003 * seed} for r in (0.25, 0.5)]
    (folder / "metrics.json").write_text(json.dumps({
        "clean_acc": clean, "robust_acc": robust, "eps": eps, "norm": norm, "seed": seed, "arch": "cnn",
        "dataset": "fashion-mnist", "classes": [0, 1, 2, 3, 4], "epochs": 2, "train_seconds": 1.0,
        "provenance": {"settings": {}, "settings_hash": "x", "code_revision": "y"}}))
    trace = math.exp(2 - eps + 0.01 * seed)
    (folder / "fisher.json").write_text(json.dumps({
        "weights_trace": trace, "weights_trace_se": 0.1, "weights_trace_empirical": None,
        "input_trace": trace / 2, "input_trace_se": 0.1, "input_lambda_max": trace / 4, "n": 64}))
    (folder / "transfer.json").write_text(json.dumps({
        "fashion-mnist:5-9": {"acc": 0.8 + 0.05 * eps + 0.002 * seed, "l2": 1e-3, "n_train": 100, "n_test": 50, "feature_dim": 32},
        "fashion-mnist:5-9+invert": {"acc": 0.8 + 0.05 * eps + 0.002 * seed, "l2": 1e-3, "n_train": 100,
                                     "n_test": 50, "feature_dim": 32, "few_shot": {"10": {"acc": 0.5}},
                                     "finetune": {"acc": 0.9}},
        "provenance": {"settings": {}}}))
    ssim = 0.3 + 0.1 * eps + 0.004 * seed
    (folder / "invert.json").write_text(json.dumps({
        "baseline": {"psnr": 12.0, "ssim": ssim, "feature_rel_err": 0.1, "judge_acc": None, "n_images": 8},
        "noise": {"psnr": 13.0, "ssim": ssim + 0.02 + 0.001 * seed, "judge_acc": 0.5},
        "images": {"split": "test", "start": 64, "n": 8}, "tuned_on": "user", "disjoint": disjoint,
        "provenance": {}}))


def test_cli_end_to_end(tmp_path):
    for seed in range(3):
        for eps, clean in ((0.0, 0.9), (0.5, 0.85), (1.0, 0.8)):
            write_run(tmp_path / f"l2_eps{eps}_seed{seed}", eps, seed, clean - 0.003 * seed * eps)
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "metrics.json").write_text(json.dumps(
        {"clean_acc": 0.95, "robust_acc": [], "eps": 0.0, "norm": "l2", "seed": 0}))
    proc = run_script("report.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert [line.split()[0] for line in out[:6]] == CLAIMS and out[-1].startswith("wrote")
    assert out[0].startswith("C1 holds (p=")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"rules", "rows", "claims"} and set(summary["rules"]) == set(CLAIMS)
    keys = {"verdict", "holds", "evidence", "test", "p", "effect", "ci", "n_seeds", "by_norm"}
    for c in CLAIMS:
        assert keys <= set(summary["claims"][c]), c
        assert set(summary["claims"][c]["by_norm"]["l2"]) >= keys - {"by_norm"}
    assert summary["claims"]["C3"]["holds"] is True
    assert summary["claims"]["C6"]["holds"] is None  # no noise-tv / tv pair
    assert len(summary["rows"]) == 10
    row = next(r for r in summary["rows"] if r["run"] == "l2_eps0.5_seed1")
    # every transfer measure of a target: full data, K-shot, fine-tuned
    assert row["transfer"] == {"fashion-mnist:5-9+invert": pytest.approx(0.827), "fashion-mnist:5-9+invert 10-shot": 0.5,
                               "fashion-mnist:5-9+invert fine-tuned": 0.9, "fashion-mnist:5-9": pytest.approx(0.827)}
    assert set(row["invert"]) == {"baseline", "noise"}
    text = (tmp_path / "report.md").read_text()
    assert "| standard (all norms) | 0 | 3 |" in text and "| l2 | 0.5 | 3 |" in text and "judge (helper)" in text
    assert "C1 holds" in text and "C6 undetermined" in text and "| C2:" in text


def test_report_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", "import report, sys; assert 'torch' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_user_errors(tmp_path):
    assert "not found" in assert_user_error(run_script("report.py", tmp_path / "absent"))
    assert "no run" in assert_user_error(run_script("report.py", tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{truncated")
    assert "not valid JSON" in assert_user_error(run_script("report.py", tmp_path))
    (tmp_path / "bad" / "metrics.json").write_text('{"eps": 0.5}')
    assert "lacks norm, clean_acc, robust_acc, seed" in assert_user_error(run_script("report.py", tmp_path))
    (tmp_path / "bad" / "metrics.json").write_text(
        '{"eps": 0.5, "norm": "l2", "clean_acc": 0.9, "seed": 0, "robust_acc": {"0.5": 0.3}}')
    assert "robust_acc" in assert_user_error(run_script("report.py", tmp_path))


def first_version_c2(rows):
    """The first version's C2 rule, for comparison: the best eps > 0 beats eps 0 when the gain
    exceeds twice the SE of the two unpaired means over seeds (SE 0 with one seed)."""
    by_eps = {}
    for r in rows:
        by_eps.setdefault(r["eps"], []).append(r["transfer"][TARGET])
    stats = {e: report.mean_se(v) for e, v in by_eps.items()}
    best = max((e for e in stats if e > 0), key=lambda e: stats[e][0])
    return stats[best][0] - stats[0][0] > 2 * math.hypot(stats[best][1], stats[0][1])


def test_first_version_c2_rule_says_holds_on_one_seed_where_the_new_rule_cannot():
    """Null studies with one seed: the first version's rule said "holds" in most (SE 0), the
    current rule never does (undetermined)."""
    rng = np.random.default_rng(5)
    studies = [make_rows(rng, 0.0, n_seeds=1) for _ in range(300)]
    assert np.mean([first_version_c2(rows) for rows in studies]) > 0.5
    assert all(report.judge_c2(rows, "l2")["holds"] is None for rows in studies)
