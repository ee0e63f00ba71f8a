"""C2's tests at the quick study's own regime, through report.py's own functions: simulated
null studies say `holds` in at most 5.5% of 4,000 for every contrast form at both levels
(D = 2 and skewed draws included), and studies whose effect equals the smallest effect of
interest say `contradicted` in at most 5.5%.

Binomial numbers (test_bounds_bite): a bound of 5.5% passes a true 7% with probability
< 1e-5 over 5,000 studies, < 1e-9 over 10,000 and < 1e-33 over 40,000, and fails a true 4.5%
with probability < 0.001 over 5,000. Each form runs as many studies as its rate's distance
from the bound needs (STUDIES): Holm over four eps (rates about 4.3%) 5,000 at level models
and 10,000 at level seeds; one eps 10,000 at level models (a true 5% fails with probability
0.011, a true 5.1%, the rate with skewed draws, 0.03) and 40,000 at level seeds, where its
t-test over 3 seeds, whose per-seed values are skewed when a seed has few draws, sits close to
the bound (5.4% at D = 2 with skewed draws: a true 5.4% fails with probability 0.2).
The tests are deterministic: each configuration has its own seed.

The regime (docs/PROTOCOL.md, rule 5): N = 5000 target test examples; the correctness
difference d[k, i] of two models on draw k and example i has a draw effect (the draws' SD of a
difference: 1 to 3 points, normal or skewed: 20% bad draws), a persistent per-example effect
(SD 0.06) and a draw-by-example interaction (SD 0.3), as measured between the quick study's
models; at level seeds each of 3 seeds (the fewest that decide there; the quick preset's
form also at its 6) adds a training effect (SD 0.5 point) and draws of its own. A models-level
study is simulated by the row and column means of d, which is all that stats.draws_test reads
(test_summaries_are_what_example_test_reads).
"""
import re
import zlib

import numpy as np
import pytest

import claims
import report
import stats
from conftest import ROOT

GRID = [0.0, 0.25, 0.5, 1.0, 2.0]
N, SIGMA_B, SIGMA_E, SIGMA_T = 5000, 0.06, 0.3, 0.005
# studies per (level, family): see the binomial numbers above
STUDIES = {("models", "some"): 5000, ("models", "every"): 10000, ("seeds", "some"): 10000,
           ("seeds", "every"): 40000}
RATE_BOUND = 0.055
SMALLEST = claims.SMALLEST_EFFECTS["transfer"][0]
MEASURED_SEED_SD = 0.0155  # the quick study's seeds SD of eps 0.5 - eps 0 (C2), 3 seeds


def quick_preset():
    return (ROOT / "run_all.sh").read_text().partition("quick)")[2].partition(";;")[0]


def declared_draws():
    """The draws run_all.sh's quick preset gives the declared K (10)."""
    return int(re.search(r"--draws \d+ 10:(\d+)", quick_preset()).group(1))


def declared_seeds():
    """How many seeds run_all.sh's quick preset trains by default."""
    return len(re.search(r'PRESET_SEEDS="([^"]*)"', quick_preset()).group(1).split())


def draw_effects(rng, shape, sd, skewed):
    """Mean-zero draw effects of SD sd: normal, or skewed: 20% bad draws, 3 SDs of the normal
    part below the others (skewness -0.68; the quick study's 100 draws of a difference measured
    +0.36, of one model -0.45 to -0.48: docs/PROTOCOL.md)."""
    if not skewed:
        return rng.normal(0, sd, shape)
    part = sd / np.sqrt(1 + 9 * 0.16)
    return rng.normal(0, part, shape) - 3 * part * ((rng.random(shape) < 0.2) - 0.2)


def models_study(rng, draws, sd, skewed, effect):
    """Row means [eps > 0, D] and column means [eps > 0, N] of d (each eps > 0 model minus the
    eps 0 model, sharing its noise), effect [eps > 0] planted. Per model: draw effects w [D],
    and its example effects plus its interaction's means over draws g [N] and over examples
    h [D] (independent normals of the variances those means have)."""
    def model():
        return (rng.normal(0, np.sqrt((SIGMA_B ** 2 + SIGMA_E ** 2 / draws) / 2), N),
                rng.normal(0, SIGMA_E / np.sqrt(2 * N), draws))
    w0, (g0, h0) = rng.normal(0, sd / np.sqrt(2), draws), model()
    rows, cols = [], []
    for e in effect:
        w, (g, h) = draw_effects(rng, draws, sd / np.sqrt(2), skewed), model()
        rows.append(e + w - w0 + (g - g0).mean() + h - h0)
        cols.append(e + (w - w0).mean() + g - g0)
    return rows, cols


def seeds_study(rng, draws, sd, skewed, effect, seeds=3):
    """Y [seeds, eps]: each seed's accuracies, with its own training effects (SD SIGMA_T for a
    difference), its own draws (rule 5: seeded by the training seed) shared by its models, and
    its models' example noise; effect [eps > 0] planted."""
    example_sd = np.sqrt((SIGMA_B ** 2 + SIGMA_E ** 2 / draws) / (2 * N))

    def model(skew):  # [seeds]: one model of each seed, less the planted effect
        return (rng.normal(0, SIGMA_T / np.sqrt(2), seeds) + rng.normal(0, example_sd, seeds)
                + draw_effects(rng, (seeds, draws), sd / np.sqrt(2), skew).mean(1))
    return np.stack([model(False)] + [e + model(skewed) for e in effect], 1)


def verdicts(level, family, draws, sd, skewed, effect, studies, seed, seeds=3):
    """Counts of each verdict of C2's part over simulated studies (report.family_part and
    report.seeds_test, the study's code)."""
    rng = np.random.default_rng(seed)
    effect = np.asarray(effect, dtype=float)
    grid = [0.0] + [g for g, e in zip(GRID[1:], effect)]
    part = {"direction": +1, "contrast": "versus_eps0", "family": family}
    counts = dict.fromkeys(claims.VERDICTS, 0)
    for _ in range(studies):
        if level == "seeds":
            y = seeds_study(rng, draws, sd, skewed, effect, seeds)
            test = report.seeds_test(part, grid, y, SMALLEST)
        else:
            rows, cols = models_study(rng, draws, sd, skewed, effect)
            tests = [stats.draws_test(r, c, +1) for r, c in zip(rows, cols)]
            test = report.family_part(grid, tests, family, +1, SMALLEST, "test examples")
        verdict = "undetermined" if test["p"] is None else \
            report.verdict_of(test["p"], test["p_margin"])
        counts[verdict] += 1
    return counts


@pytest.mark.parametrize("n", sorted(set(STUDIES.values())))
def test_bounds_bite(n):
    """P(Bin(n, 0.07) <= 5.5% n) < 1e-5 and P(Bin(n, 0.045) > 5.5% n) < 0.001; from 10,000 on
    P(Bin(n, 0.07) <= 5.5% n) < 1e-9 and P(Bin(n, 0.05) > 5.5% n) < 0.02:
    I_p(k, n - k + 1) = P(X >= k)."""
    bound = int(RATE_BOUND * n)
    assert stats.betainc(bound + 1, n - bound, 0.07) > 1 - 1e-5
    assert stats.betainc(bound + 1, n - bound, 0.045) < 0.001
    assert n < 10000 or (stats.betainc(bound + 1, n - bound, 0.07) > 1 - 1e-9
                         and stats.betainc(bound + 1, n - bound, 0.05) < 0.02)


def test_summaries_are_what_example_test_reads():
    rng = np.random.default_rng(0)
    a, b = (rng.random((7, 50)) < 0.8 for _ in range(2))
    d = a.astype(float) - b
    assert stats.example_test(a, b, +1) == stats.draws_test(d.mean(1), d.mean(0), +1)


# (level, family, draws, draws' SD of a difference, skewed draws, seeds): at level seeds every
# form at 3 seeds (the fewest that decide there, 2 degrees of freedom), and the quick preset's
# form (one declared eps, the declared draws) also at its seeds ("declared")
FORMS = [(level, family, draws, sd, skewed, seeds)
         for level in ("seeds", "models") for family in ("some", "every")
         for draws, sd, skewed in (("declared", 0.01, False), ("declared", 0.03, True),
                                   (2, 0.03, False), (2, 0.02, True))
         for seeds in ((None,) if level == "models" else (3, "declared")
                       if family == "every" and draws == "declared" else (3,))]


@pytest.mark.slow
@pytest.mark.parametrize("level, family, draws, sd, skewed, seeds", FORMS)
def test_null_studies_rarely_hold(level, family, draws, sd, skewed, seeds):
    """No effect at any eps: `holds` in at most 5.5% of the studies, each contrast form
    (Holm over the four eps > 0, or one declared eps) at both levels."""
    config = repr((level, family, draws, sd, skewed) + ((seeds,) if seeds == "declared" else ()))
    draws = declared_draws() if draws == "declared" else draws
    seeds = declared_seeds() if seeds == "declared" else 3 if seeds is None else seeds
    effect = [0.0] * (4 if family == "some" else 1)
    n = STUDIES[level, family]
    counts = verdicts(level, family, draws, sd, skewed, effect, n,
                      seed=zlib.crc32(config.encode()), seeds=seeds)
    assert counts["holds"] <= RATE_BOUND * n, counts


@pytest.mark.slow
@pytest.mark.parametrize("level", ["seeds", "models"])
@pytest.mark.parametrize("family", ["some", "every"])
def test_smallest_effect_is_rarely_contradicted(level, family):
    """The effect equals the smallest effect of interest at one eps (the others 0, the least
    favourable case for the family `some`): `contradicted` in at most 5.5% of the studies."""
    effect = [0.0, SMALLEST, 0.0, 0.0] if family == "some" else [SMALLEST]
    n = STUDIES[level, family]
    counts = verdicts(level, family, declared_draws(), 0.02, False, effect, n,
                      seed=100 + (level == "seeds") + 2 * (family == "some"))
    assert counts["contradicted"] <= RATE_BOUND * n, counts


def test_two_draws_at_their_level_and_one_draw_undetermined():
    """The few-shot test has D - 1 degrees of freedom, so D = 2 keeps its level (the null
    rate above) and D = 1 cannot estimate the draws' variance: a ValueError, which the report
    turns into undetermined."""
    assert stats.draws_test([0.01, 0.02], np.zeros(10), +1)["df"] == 1
    with pytest.raises(ValueError, match="2 draws"):
        stats.draws_test([0.01], np.zeros(10), +1)


def test_the_quick_design_reaches_its_mde_targets():
    """Rule 5's design: C2's MDE at most 2 points at level seeds, from the seeds' SD of the
    contrast measured on the quick study (1.55 points over its first 3 seeds, docs/PROTOCOL.md)
    at the quick preset's seeds, and at most 1 point at level models, with the draws' SD of a
    difference 2 points (the median measured)."""
    draws, sd = declared_draws(), 0.02
    family = report.DECLARATIONS["quick"]["transfer_eps"]
    m = 4 if family is None else len(family)
    seeds = declared_seeds()
    assert stats.mde_t(MEASURED_SEED_SD / np.sqrt(seeds), seeds - 1, 0.05 / m) <= 0.02
    model_se = np.sqrt(sd ** 2 / draws + (SIGMA_B ** 2 + SIGMA_E ** 2 / draws) / N)
    assert stats.mde_t(model_se, draws - 1, 0.05 / m) <= 0.01


def test_the_seeds_level_spans_draws(tmp_path):
    """Rule 5: run_all.sh gives every cell's transfer step its training seed and the declared
    draws, and few_shot_probe's draws depend on that seed (seed 0's first draws are the same
    whatever their number: rule 4's 5 draws are rule 5's first 5)."""
    import torch
    import transfer
    from test_study import run_all
    proc, _ = run_all(tmp_path)
    assert proc.returncode == 0, proc.stderr
    for seed in (0, 1):
        cmd = (tmp_path / "res" / f"l2_eps0.5_seed{seed}" / ".transfer.json.cmd").read_text()
        assert f"--seed {seed} " in cmd and f"--draws 5 10:{declared_draws()} " in cmd, cmd
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, generator=g), torch.arange(60) % 3
    draws = {seed: transfer.few_shot_probe(x, y, x, y, 2, draws=4, seed=seed)["correct"]
             for seed in (0, 1)}
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(transfer.few_shot_probe(x, y, x, y, 2, draws=2)["correct"], draws[0][:2])
