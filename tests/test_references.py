"""Our estimators against outside references, on the same inputs: the probes against
scikit-learn's LogisticRegression, report.py's statistics against scipy, the attacks against
torchattacks, the image metrics against scikit-image. The references are test-only
(requirements-dev.txt); absent, these tests are skipped, and fail under CI=true (conftest)."""

import numpy as np
import pytest
import torch

import advtrain
import checkpoints
import data
import invert
import models
import stats
import transfer
from conftest import reference


def blobs(n_per_class, k=4, d=12, spread=1.5, seed=0):
    """Overlapping Gaussian classes (not separable, so the penalty matters), the same class
    centres for every seed: x [k n, d] float64, y [k n], class by class."""
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(k).repeat_interleave(n_per_class)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(len(y), d, generator=g, dtype=torch.float64)
    x = centres[y] + spread * noise
    return 3 * x + 5, y  # shifted and scaled: the probe standardises


# ------------------------------------------------------------------------ probes vs scikit-learn
# Our probe minimises mean CE + l2 / 2 ||W||^2 on standardised features, bias unpenalised;
# scikit-learn's multinomial lbfgs minimises C sum CE + 1/2 ||W||^2 (intercept unpenalised):
# the same optimum at C = 1 / (n l2). The bias is defined up to a constant shared by every
# class (softmax), so biases are compared centred.

def sklearn_fit(z, y, l2):
    linear_model = reference("sklearn.linear_model")
    fit = linear_model.LogisticRegression(C=1 / (len(y) * l2), tol=1e-10, max_iter=10000)
    return fit.fit(z.numpy(), y.numpy())


def assert_same_fit(weight, bias, fitted):
    np.testing.assert_allclose(weight.numpy(), fitted.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((bias - bias.mean()).numpy(),
                               fitted.intercept_ - fitted.intercept_.mean(), rtol=1e-4, atol=1e-5)


def test_fit_logistic_equals_scikit_learn_at_each_penalty():
    x, y = blobs(50)
    for l2 in (1e-3, 1e-1, 10.0):
        ours = transfer.fit_logistic(x, y, l2, 4, tol=1e-9)
        assert ours["grad_max"] <= 1e-6
        fitted = sklearn_fit((x - ours["mean"]) / ours["std"], y, l2)
        assert_same_fit(ours["weight"], ours["bias"], fitted)


def test_linear_probe_equals_scikit_learn_at_its_chosen_penalty():
    """The probe's chosen penalty refitted by scikit-learn on the same standardised training
    features: the same weights, and the same prediction on every test example."""
    x, y = blobs(100)
    xt, yt = blobs(100, seed=1)
    probe = transfer.linear_probe(x, y, xt, yt, l2_grid=(1e-3, 1e-1, 10.0), tol=1e-9,
                                  dtype=torch.float64)
    fitted = sklearn_fit((x - probe["mean"]) / probe["std"], y, probe["l2"])
    assert_same_fit(probe["weight"], probe["bias"], fitted)
    theirs = fitted.predict(((xt - probe["mean"]) / probe["std"]).numpy()) == yt.numpy()
    np.testing.assert_array_equal(probe["correct"].numpy(), theirs)
    assert probe["acc"] == pytest.approx(theirs.mean())
    assert 0.4 < probe["acc"] < 1  # 4 classes: chance is 0.25


def test_few_shot_fit_equals_scikit_learn_on_a_k_shot_draw():
    """A K-shot draw fitted at a fixed penalty equals scikit-learn on the same K-shot set."""
    x, y = blobs(60)
    idx = transfer.k_shot_indices(y, 10, torch.Generator().manual_seed(0))
    xs, ys, l2 = x[idx], y[idx], 0.1
    probe = transfer.fit_logistic(xs, ys, l2, 4, tol=1e-9)
    fitted = sklearn_fit((xs - probe["mean"]) / probe["std"], ys, l2)
    assert_same_fit(probe["weight"], probe["bias"], fitted)


@pytest.mark.parametrize("l2_grid", [None, (0.1,)], ids=["its-own-penalty", "one-value-grid"])
def test_few_shot_probe_equals_scikit_learn_at_its_penalty(l2_grid):
    """With exactly K training examples per class every draw is the whole set: each draw's
    predictions are scikit-learn's at the draw's penalty (its own choice for K, or a one-value
    grid), up to the probe's stopping tolerance (max |gradient| 1e-4: at most 1% of the test
    examples may change side)."""
    x, y = blobs(10)  # 10 shots of each of 4 classes
    xt, yt = blobs(200, seed=1)
    few = transfer.few_shot_probe(x, y, xt, yt, shots=10, draws=2, l2_grid=l2_grid,
                                  dtype=torch.float64)
    l2 = few["l2"][0]
    assert few["l2"] == [l2, l2] and (l2_grid is None or l2 == l2_grid[0])
    mean, std = x.mean(0), x.std(0)
    fitted = sklearn_fit((x - mean) / std, y, l2)
    theirs = fitted.predict(((xt - mean) / std).numpy()) == yt.numpy()  # [N_test]
    assert few["acc"] == pytest.approx(theirs.mean(), abs=0.01), (few["acc"], theirs.mean())
    assert few["correct"].shape == (2, len(yt))  # [draws, N_test]
    assert (few["correct"].numpy() == theirs[None]).mean() >= 0.99


# ----------------------------------------------------------------------------- statistics vs scipy

DFS = [*range(1, 201), 250, 500, 1000, 10 ** 4, 10 ** 6]
T_VALUES = [-40.0, -8.0, -3.0, -2.0, -1.0, -0.3, -1e-3, 0.0, 0.2, 0.7, 1.5, 2.5, 4.0, 12.0]


def test_t_cdf_and_quantile_equal_scipy_over_a_grid_of_df():
    """To 1e-8 relative (lgamma(df / 2) limits it at df 1e6), or 1e-15 absolute: tails far
    below any level (t = -8 at df 65: 1.5e-11) need no more."""
    sp = reference("scipy.stats")
    for df in DFS:
        ours = [stats.t_cdf(t, df) for t in T_VALUES]
        np.testing.assert_allclose(ours, sp.t.cdf(T_VALUES, df), rtol=1e-8, atol=1e-15,
                                   err_msg=f"df={df}")
        for q in (0.01, 0.05, 0.5, 0.9, 0.95, 0.975):
            assert stats.t_quantile(q, df) == pytest.approx(sp.t.ppf(q, df), rel=1e-8), (q, df)


def test_betainc_equals_scipy():
    special = reference("scipy.special")
    for a, b in [(0.5, 0.5), (0.5, 3.0), (2.0, 0.5), (1.0, 1.0), (7.5, 0.5), (50.0, 0.5),
                 (0.5, 500.0), (3, 9)]:
        for x in (1e-6, 0.01, 0.2, 0.5, 0.8, 0.99, 1 - 1e-9):
            theirs = special.betainc(a, b, x)
            assert stats.betainc(a, b, x) == pytest.approx(theirs, rel=1e-10, abs=1e-300)


def test_one_sided_t_equals_scipy_ttest_and_interval():
    sp = reference("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 20):
        v = rng.normal(0.2, 1.0, size=n)
        for direction, alternative in ((+1, "greater"), (-1, "less")):
            ours = stats.one_sided_t(v, direction)
            theirs = sp.ttest_1samp(v, 0.0, alternative=alternative)
            assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9)
            assert ours["t"] == pytest.approx(theirs.statistic)
            lo, hi = sp.t.interval(0.90, n - 1, loc=v.mean(), scale=sp.sem(v))
            assert ours["ci"] == pytest.approx([lo, hi], rel=1e-9)


def test_kendall_test_equals_scipy_exact_without_ties():
    """n distinct values: our exact p from inversion counts is scipy's exact kendalltau p."""
    sp = reference("scipy.stats")
    rng = np.random.default_rng(1)
    for n in (4, 5, 7, 10, 15):
        for _ in range(5):
            y = rng.normal(size=n) + 0.3 * np.arange(n)
            for direction, alternative in ((+1, "greater"), (-1, "less")):
                ours = stats.kendall_test(y, direction)
                theirs = sp.kendalltau(np.arange(n), y, method="exact", alternative=alternative)
                assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9), (y, direction)
                assert ours["tau"] == pytest.approx(theirs.statistic)
    assert stats.kendall_test(np.arange(4.0), +1)["p"] == pytest.approx(1 / 24)  # 1 / 4!


def test_kendall_test_with_ties_equals_scipy_permutation_test():
    """Tied values, n <= report.EXACT_MAX_N: the exact test over all n! orders equals scipy's
    exhaustive permutation test of tau-b (x = positions, no ties; y permuted)."""
    sp = reference("scipy.stats")
    for y in ([0.1, 0.3, 0.3, 0.2, 0.5, 0.5], [1.0, 1.0, 2.0, 3.0, 2.0]):
        n = len(y)
        for direction, alternative in ((+1, "greater"), (-1, "less")):
            ours = stats.kendall_test(y, direction)
            theirs = sp.permutation_test(
                (np.asarray(y),), lambda v: sp.kendalltau(np.arange(n), v).statistic,
                permutation_type="pairings", alternative=alternative, n_resamples=np.inf)
            assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9), (y, direction)
            assert ours["tau"] == pytest.approx(sp.kendalltau(np.arange(n), y).statistic)


def test_sen_slope_equals_scipy_theilslopes():
    sp = reference("scipy.stats")
    rng = np.random.default_rng(2)
    x = np.array([0.0, 0.1, 0.25, 0.5, 1.0, 2.0])
    for _ in range(5):
        y = 0.3 * x + rng.normal(0, 0.1, size=len(x))
        assert stats.sen_slope(x, y)[0] == pytest.approx(sp.theilslopes(y, x).slope, rel=1e-12)


def test_example_test_mcnemar_equals_scipy_binomtest():
    """Paired 0/1 correctness: p is the exact binomial tail of the discordant pairs."""
    sp = reference("scipy.stats")
    rng = np.random.default_rng(3)
    for n in (20, 200):
        a, b = rng.random(n) < 0.7, rng.random(n) < 0.6
        wins, losses = int(np.sum(a & ~b)), int(np.sum(~a & b))
        for direction, k in ((+1, wins), (-1, losses)):
            theirs = sp.binomtest(k, wins + losses, 0.5, alternative="greater").pvalue
            assert stats.example_test(a, b, direction)["p"] == pytest.approx(theirs, rel=1e-9)


# ------------------------------------------------------------------------ attacks vs torchattacks

@pytest.fixture
def float64_default():
    """float64 as torch's default dtype: our PGD draws its L2 start radius in the default
    dtype and torchattacks in the input's; with both float64 the same seed gives the same start."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_equals_torchattacks(norm, eps, random_start, float64_default):
    """The same PGD in float64 from the same seed: equal to float rounding (torchattacks adds
    1e-10 to gradient norms, we clamp them at 1e-12)."""
    torchattacks = reference("torchattacks")
    torch.manual_seed(0)
    model = models.build_model("cnn", 5, 1, 28, (0.286,), (0.353,)).eval()
    x, y = data.load_split("fashion-mnist", False, classes=[0, 1, 2, 3, 4], size=32, download=False)
    x = x.double()
    attack = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    torch.manual_seed(5)
    ours = advtrain.pgd_attack(model, x, y, norm, eps, steps=5, step_size=eps / 4,
                               random_start=random_start)
    torch.manual_seed(5)
    theirs = attack(model, eps=eps, alpha=eps / 4, steps=5, random_start=random_start)(x, y)
    assert (ours - x).abs().max() > eps / 8  # it moved
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def torchattacks_apgd(torchattacks, model, x, y, norm, eps, steps):
    """torchattacks' robust accuracy under APGD-CE, and under the worst case per example of
    APGD-CE and APGD-T with 3 target classes (the most likely other ones): our "apgd"."""
    name = {"linf": "Linf", "l2": "L2"}[norm]
    ce = torchattacks.APGD(model, norm=name, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0)
    targeted = torchattacks.APGDT(model, norm=name, eps=eps, steps=steps, n_restarts=1, seed=0,
                                  n_classes=4)  # n_classes - 1 = 3 targets
    with torch.no_grad():
        robust_ce = model(ce(x, y)).argmax(1) == y
        robust_targeted = model(targeted(x, y)).argmax(1) == y
    return robust_ce.double().mean().item(), (robust_ce & robust_targeted).double().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_apgd_stays_in_its_ball_beats_pgd_and_equals_torchattacks(tiny_ckpt, norm, eps):
    """The adversarially trained tiny cnn, its first 200 test images, 10 steps. Ours first
    (these run without torchattacks too): APGD's points lie in the ball and [0, 1], with
    input-only gradients; APGD-CE finds at least as many adversarial examples as PGD with the
    same budget (up to 2 points of noise), and the worst case over APGD-CE and the targeted
    APGD-DLR runs at least as many as APGD-CE. Then both robust accuracies are torchattacks'
    within 3 points (the random starts differ, so examples near the boundary can go either
    way)."""
    model, _ = checkpoints.load_checkpoint(tiny_ckpt)
    x, y = data.load_split("fashion-mnist", False, classes=[0, 1, 2, 3, 4], size=200,
                           download=False)
    torch.manual_seed(0)
    x_adv = advtrain.apgd_attack(model, x, y, norm, eps, steps=10)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # input gradients only
    with torch.no_grad():
        full = (model(x_adv).argmax(1) == y).double().mean().item()
    clean = advtrain.accuracy(model, x, y, 200)
    pgd = advtrain.accuracy(model, x, y, 200, norm, eps, steps=10)
    ce = advtrain.accuracy(model, x, y, 200, norm, eps, steps=10, attack="apgd-ce")
    assert full <= ce <= pgd + 0.02 and pgd < clean, (clean, pgd, ce, full)
    torchattacks = reference("torchattacks")
    ce_ref, full_ref = torchattacks_apgd(torchattacks, model, x, y, norm, eps, 10)
    assert clean - 0.1 > ce_ref >= full_ref > 0.1  # the attacks bite, and leave some examples
    assert abs(ce - ce_ref) <= 0.03 and abs(full - full_ref) <= 0.03, (ce, ce_ref, full, full_ref)


# ------------------------------------------------------------------ image metrics vs scikit-image

def image_pairs(channels, seed=0):
    """Pairs of [N, C, 32, 32] images in [0, 1]: a smooth image and noisy, blurred, shifted,
    unrelated versions of it."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, 32, dtype=torch.float64)
    phase = torch.arange(channels)[:, None, None]
    base = 0.5 + 0.4 * torch.sin(6 * t[:, None] + 3 * t[None, :] + phase)  # [C, 32, 32]
    x = base.expand(4, channels, 32, 32).clone()
    noise = torch.randn(base.shape, generator=g, dtype=torch.float64)
    y = torch.stack([(base + 0.05 * noise).clamp(0, 1),
                     torch.nn.functional.avg_pool2d(base[None], 3, 1, 1)[0],
                     base.roll(2, -1),
                     torch.rand(base.shape, generator=g, dtype=torch.float64)])
    return x, y


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_equals_scikit_image(channels):
    metrics = reference("skimage.metrics")
    x, y = image_pairs(channels)
    ours = invert.ssim(x, y)
    theirs = [metrics.structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(),
                                            channel_axis=2, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=1.0)
              for a, b in zip(x, y)]  # [H, W, C] images
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6, atol=1e-7)
    assert len(set(np.round(theirs, 2))) == 4  # four different similarities, not four equal ones
    assert invert.ssim(x.float(), y.float()).numpy() == pytest.approx(theirs, abs=1e-6)  # float32


def test_psnr_equals_scikit_image():
    metrics = reference("skimage.metrics")
    x, y = image_pairs(3)
    theirs = [metrics.peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0)
              for a, b in zip(x, y)]
    np.testing.assert_allclose(invert.psnr(x, y).numpy(), theirs, rtol=1e-10)


def test_power_and_mde_equal_scipy_noncentral_t():
    """At the MDE the one-sided t-test has power 0.8 under scipy's noncentral t, to 1e-5."""
    sp = reference("scipy.stats")
    for df in (1, 2, 4, 9, 99, 10 ** 4):
        for alpha in (0.05, 0.0125):
            mde = stats.mde_t(1.0, df, alpha)
            power = sp.nct.sf(sp.t.ppf(1 - alpha, df), df, mde)
            assert power == pytest.approx(0.8, abs=1e-5), (df, alpha)
            assert stats.t_power(mde, df, alpha) == pytest.approx(power, abs=1e-6)


def test_draws_and_proportion_tests_equal_scipy():
    """The few-shot paired test is a t test with D - 1 df on its SE; the two-proportion test a
    normal test."""
    sp = reference("scipy.stats")
    rng = np.random.default_rng(5)
    for draws in (2, 5, 100):
        rows, cols = rng.normal(0.01, 0.02, draws), rng.normal(0.01, 0.3, 500)
        ours = stats.draws_test(rows, cols, +1)
        se = np.sqrt(rows.var(ddof=1) / draws + cols.var(ddof=1) / 500)
        assert ours["p"] == pytest.approx(sp.t.sf(rows.mean() / se, draws - 1), rel=1e-9)
        assert stats.t_margin_p(ours["mean"], se, draws - 1, +1, 0.01) == pytest.approx(
            sp.t.cdf((rows.mean() - 0.01) / se, draws - 1), rel=1e-9)
    ours = stats.two_proportions(0.82, 0.80, 1000, +1)
    se = np.sqrt((0.82 * 0.18 + 0.8 * 0.2) / 1000)
    assert ours["p"] == pytest.approx(sp.norm.sf(0.02 / se), rel=1e-12)
    assert stats.normal_margin_p(0.02, se, +1, 0.05) == pytest.approx(sp.norm.cdf(-0.03 / se))
