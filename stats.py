"""The study's statistical tests, numpy and the standard library only: one-sided t-tests,
Holm's adjustment, Kendall's rank test and Sen's slope, McNemar's test, the paired test of
few-shot probes over draws and examples, and minimum detectable effects (power).

Every test is one-sided in a claimed `direction` (+1: the effect is above 0, -1: below) and
returns plain floats; `margin` tests ask the opposite question, whether the data exclude an
effect of at least `margin` in the claimed direction (docs/PROTOCOL.md, "contradicted").

    python -c "import stats; print(stats.one_sided_t([0.2, 0.5, 0.3], +1))"

Functions to copy: each needs the names after its colon, from this file, and numpy, math,
functools, itertools and statistics.
    one_sided_t: ALPHA, _beta_fraction, betainc, check_direction, t_cdf, t_quantile, t_test
    holm: (none)
    slope: (none)
    kendall_test: EXACT_MAX_N, MONTE_CARLO, all_orders, check_direction, inversion_pmf,
        kendall_s
    sen_slope: ALPHA, inversion_pmf
    example_test: ALPHA, _beta_fraction, betainc, check_direction, draws_test, mcnemar, t_cdf,
        t_quantile, t_test
    mde_t: ALPHA, POWER, _beta_fraction, betainc, t_cdf, t_power, t_quantile, trapezoid,
        unit_mde_t
    kendall_mde: ALPHA, POWER, inversion_pmf, kendall_s, unit_kendall_mde
"""
import functools
import itertools
import math
from statistics import NormalDist

import numpy as np

ALPHA = 0.05          # one-sided level of every test
POWER = 0.8           # the power at which a minimum detectable effect is reported
EXACT_MAX_N = 8       # Kendall with tied values: every order enumerated up to this many values ...
MONTE_CARLO = 100000  # ... beyond, this many random orders (generator seed 0)


# ----------------------------------------------------------------------------- distributions

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
    """P(T <= t) for Student's t with df > 0 degrees of freedom, from P(T > |t|) =
    I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 = (1 - I_{t^2 / (df + t^2)}(1 / 2, df / 2)) / 2."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
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
    if not 0 < q < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
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


def check_direction(direction):
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")


# ----------------------------------------------------------------------------- t-tests

def t_test(mean, se, df, direction, alpha=ALPHA):
    """One-sided t-test that mean > 0 (direction +1) or < 0 (-1) with its two-sided
    1 - 2 alpha interval, which excludes 0 on the claimed side exactly when p < alpha.
    se 0 (no noise estimate): t, p and the interval are None."""
    check_direction(direction)
    if not (se >= 0 and df > 0):
        raise ValueError(f"need se >= 0 and df > 0, got se {se}, df {df}")
    if se == 0:
        return {"mean": mean, "se": 0.0, "t": None, "df": df, "p": None, "ci": None}
    half = t_quantile(1 - alpha, df) * se
    return {"mean": mean, "se": se, "t": mean / se, "df": df,
            "p": t_cdf(-direction * mean / se, df), "ci": [mean - half, mean + half]}


def t_margin_p(mean, se, df, direction, margin):
    """p of the one-sided test that the effect is below `margin` in the claimed direction
    (H0: direction * effect >= margin): small when the data exclude an effect that large."""
    check_direction(direction)
    if not se > 0:
        return None
    return t_cdf((direction * mean - margin) / se, df)


def one_sided_t(values, direction, alpha=ALPHA):
    """One-sample t-test of mean(values) > 0 (direction +1) or < 0 (direction -1), n - 1
    degrees of freedom. Returns {n, mean, se, t, df, p, ci}; ci the two-sided 1 - 2 alpha
    interval. At least 2 finite values; identical values give se 0 and p None."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2 or not np.isfinite(v).all():
        raise ValueError(f"need at least 2 finite values in a 1-d list, got {values!r}")
    se = float(v.std(ddof=1) / math.sqrt(len(v)))
    return {"n": len(v), **t_test(float(v.mean()), se, len(v) - 1, direction, alpha)}


def holm(pvalues):
    """Holm step-down adjusted p-values (same order as given): the k-th smallest p times
    (m - k + 1), made monotone; rejecting adjusted p < alpha controls the family-wise error."""
    m = len(pvalues)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def t_power(shift, df, alpha=ALPHA):
    """Power of the one-sided t-test at level alpha when the true effect is `shift` standard
    errors: P(T' > t_{1 - alpha, df}) for T' noncentral t (df, shift) = E_S[P(Z > c S /
    sqrt(df) - shift)], S ~ chi_df (density ~ s^(df - 1) exp(-s^2 / 2), smooth at 0 for every
    df), integrated on a grid of 4001 points around its mass."""
    c = t_quantile(1 - alpha, df)
    s = np.linspace(max(math.sqrt(df) - 12, 0.0), math.sqrt(df) + 12, 4001)
    log_density = (df - 1) * np.log(np.maximum(s, 1e-300)) - s * s / 2
    weights = np.exp(log_density - log_density.max())
    tail = 0.5 * np.vectorize(math.erfc)((c * s / math.sqrt(df) - shift) / math.sqrt(2))
    return float(trapezoid(weights * tail, s) / trapezoid(weights, s))


def trapezoid(y, x):
    """The trapezoidal rule's integral of y over the points x, as numpy >= 2.0's trapezoid
    computes it (numpy 1.x calls it trapz; requirements.txt admits both)."""
    return np.add.reduce(np.diff(x) * (y[1:] + y[:-1]) / 2.0)


def mde_t(se, df, alpha=ALPHA, power=POWER):
    """Minimum detectable effect of a one-sided t-test at level alpha with the given power:
    the true effect, in units of se, at which the test rejects with probability `power`
    (t_power: the noncentral t), times se. About (t_{1 - alpha, df} + t_{power, df}) se."""
    if not 0 <= se < math.inf:  # a negative MDE would read as an effect of the other sign
        raise ValueError(f"se must be a finite number >= 0, got {se!r}")
    return se * unit_mde_t(df, alpha, power)


@functools.lru_cache(maxsize=None)  # a study asks for the same few (df, alpha) many times
def unit_mde_t(df, alpha=ALPHA, power=POWER):
    """mde_t at se 1, by bisection on t_power to 1e-6."""
    lo, hi = 0.0, t_quantile(1 - alpha, df) + t_quantile(power, df) + 1.0
    while t_power(hi, df, alpha) < power:
        hi *= 2
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if t_power(mid, df, alpha) >= power else (mid, hi)
    return hi


def mde_normal(se, alpha=ALPHA, power=POWER):
    """The same for a test with a normal statistic: (z_{1 - alpha} + z_power) * se."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha) + z(power)) * se


# ----------------------------------------------------------------------------- trends

def slope(x, y):
    """Least-squares slope of y on x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"need x, y of one shape [n >= 2] with x not constant, got "
                         f"{x.shape}, {y.shape}")
    dx = x - x.mean()
    return float(dx @ (y - y.mean()) / (dx @ dx))


def kendall_s(y):
    """Kendall's S of values y [..., n] listed in increasing x: sum_{i<j} sign(y_j - y_i)."""
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
    """One-sided permutation test of Kendall's tau between position (increasing x) and y:
    tau > 0 (direction +1) or < 0 (-1). Exact for distinct values (the Mahonian distribution)
    and for tied values up to EXACT_MAX_N of them (every order); beyond that with ties, Monte
    Carlo over MONTE_CARLO orders (seed 0), p = (1 + count) / (1 + MONTE_CARLO). Returns
    {tau, p, p_min, method}; p_min is the p of the most extreme order of these values (the
    test cannot reject when p_min >= alpha)."""
    check_direction(direction)
    y = direction * np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or len(y) < 2 or not np.isfinite(y).all():
        raise ValueError(f"need at least 2 finite values in a 1-d list, got {y.shape}")
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


def sen_slope(x, y, alpha=ALPHA):
    """Sen's slope of y on x (the median pairwise slope) and its two-sided 1 - 2 alpha interval:
    the pairwise slopes of ranks k + 1 and N - k, k the largest inversion count with null CDF
    < alpha (the distinct-values distribution). The interval is None when n is too small for
    any (n < 4 at alpha 0.05). With tied y it can include 0 while kendall_test, which counts
    ties exactly, rejects (or the reverse): the test decides."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(np.unique(x)) != len(x) or len(x) < 2:
        raise ValueError(f"need x (distinct) and y of one shape [n >= 2], got {x.shape}, {y.shape}")
    i, j = np.triu_indices(len(x), 1)
    slopes = np.sort((y[j] - y[i]) / (x[j] - x[i]))
    below = np.flatnonzero(np.cumsum(inversion_pmf(len(x))) < alpha)
    ci = [float(slopes[below[-1]]), float(slopes[-1 - below[-1]])] if len(below) else None
    return float(np.median(slopes)), ci


def kendall_margin_p(x, y, direction, margin):
    """p of the exact permutation test that the slope of y on x is below `margin` in the
    claimed direction (H0: direction * slope >= margin): Kendall's test for a falling trend of
    the residuals direction * y - margin * x (x increasing), exchangeable when the slope is
    exactly margin."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"x must be increasing, got {x.tolist()}")
    return kendall_test(direction * y - margin * x, -1)["p"]


def kendall_mde(x, sigma, alpha=ALPHA, power=POWER):
    """Minimum detectable slope of the one-sided Kendall test (kendall_test) at level alpha:
    the smallest slope b at which y = b x + sigma z (z standard normal, x distinct and
    increasing) rejects with probability `power`. The rejection depends on b / sigma only, so
    this is sigma times the unit-noise MDE (unit_kendall_mde). None when even a perfect order
    cannot reject (1 / n! >= alpha)."""
    if len(x) < 2 or not 0 <= sigma < math.inf:
        raise ValueError(f"need at least 2 x values and a finite sigma >= 0, got {len(x)} and "
                         f"{sigma!r}")
    unit = unit_kendall_mde(tuple(float(v) for v in x), alpha, power)
    return None if unit is None else sigma * unit


@functools.lru_cache(maxsize=None)
def unit_kendall_mde(x, alpha=ALPHA, power=POWER, sims=20000, seed=0):
    """kendall_mde at sigma 1: bisection over `sims` fixed simulated noises (seed), to 0.1%."""
    x = np.asarray(x, dtype=np.float64)
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"x must be increasing, got {x.tolist()}")
    cdf = np.cumsum(inversion_pmf(len(x)))
    if cdf[0] >= alpha:
        return None
    critical = len(cdf) - 1 - 2 * np.flatnonzero(cdf < alpha)[-1]  # the smallest S that rejects
    z = np.random.default_rng(seed).standard_normal((sims, len(x)))

    def rejects(b):
        return np.mean(kendall_s(b * x + z) >= critical) >= power

    lo, hi = 0.0, 1.0 / np.ptp(x)
    while not rejects(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rejects(mid) else (mid, hi)
    return hi


# ----------------------------------------------------------------------------- paired examples

def mcnemar(a, b, direction, alpha=ALPHA):
    """Exact one-sided McNemar test that model a is right more often (direction +1) or less
    (-1) than model b on the same examples: a, b 0/1 correctness [N]. wins (losses): examples
    only a (only b) gets right in the claimed direction; p = P(Bin(wins + losses, 1/2) >= wins),
    p_min the p had every discordant example been a win. The mean difference's SE and Wald
    interval (normal, two-sided 1 - 2 alpha). Returns {n, mean, se, p, p_min, ci, test}."""
    check_direction(direction)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a) or not np.isin(np.r_[a, b], (0, 1)).all():
        raise ValueError(f"need 0/1 correctness of one shape [N], got {a.shape} and {b.shape}")
    d = a - b
    n, mean = len(d), float(d.mean())
    wins, losses = int(np.sum(direction * d > 0)), int(np.sum(direction * d < 0))
    p = betainc(wins, losses + 1, 0.5) if wins else 1.0  # P(Bin(wins + losses, 1/2) >= wins)
    se = math.sqrt(max(wins + losses - n * mean ** 2, 0)) / n  # of the mean of d in {-1, 0, 1}
    half = NormalDist().inv_cdf(1 - alpha) * se
    return {"n": n, "mean": mean, "se": se, "p": p, "p_min": 0.5 ** (wins + losses),
            "ci": [mean - half, mean + half], "test": "McNemar"}


def draws_test(row_means, col_means, direction, alpha=ALPHA):
    """The paired test of few-shot probes from the means of d[k, i] (the correctness
    difference on draw k and example i, [D, N]): row_means [D] over examples, col_means [N]
    over draws. Effect the mean of d; SE^2 = var_k(row) / D + var_i(col) / N (draws and
    examples both random; under a two-way model this exceeds the variance of the mean by an
    interaction term: conservative); one-sided t with D - 1 degrees of freedom, as the draw
    term is estimated from D draws (a Welch-Satterthwaite df, larger exactly when that term is
    underestimated, is not conservative). Needs D >= 2 draws."""
    r, c = np.asarray(row_means, dtype=np.float64), np.asarray(col_means, dtype=np.float64)
    if r.ndim != 1 or c.ndim != 1 or len(r) < 2 or len(c) < 2:
        raise ValueError(f"need at least 2 draws and 2 examples, got {r.shape} and {c.shape}")
    var = r.var(ddof=1) / len(r) + c.var(ddof=1) / len(c)
    return {"n": len(c), "draws": len(r),
            **t_test(float(r.mean()), math.sqrt(var), len(r) - 1, direction, alpha),
            "test": f"{len(r)} draws"}


def example_test(a, b, direction, alpha=ALPHA):
    """Paired one-sided test that model a is more (direction +1) or less accurate than b on
    the same test examples: 0/1 correctness [N] (mcnemar) or [draws, N] with the same draws
    for both (few-shot probes: draws_test). Returns {n, mean, se, p, ci, test, ...}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(f"a and b must be correctness arrays of one shape, [N] or [draws, N]; "
                         f"got {a.shape} and {b.shape}")
    if a.ndim == 1:
        return mcnemar(a, b, direction, alpha)
    d = a - b
    return draws_test(d.mean(1), d.mean(0), direction, alpha)


def normal_margin_p(mean, se, direction, margin):
    """normal-statistic form of t_margin_p (H0: direction * effect >= margin)."""
    check_direction(direction)
    return NormalDist().cdf((direction * mean - margin) / se) if se > 0 else None


def two_proportions(pa, pb, n, direction, alpha=ALPHA):
    """One-sided z-test that accuracy pa > pb (direction +1) or < (-1), each measured on n
    examples, without per-example records: SE^2 = pa (1 - pa) / n + pb (1 - pb) / n, the
    unpaired variance, which overstates the variance of a difference on the same examples
    (positively correlated): conservative. Returns {n, mean, se, p, ci, test}."""
    check_direction(direction)
    if not (0 <= pa <= 1 and 0 <= pb <= 1 and n >= 1):
        raise ValueError(f"need accuracies in [0, 1] and n >= 1, got {pa}, {pb}, {n}")
    mean, se = pa - pb, math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n)
    z = NormalDist().inv_cdf(1 - alpha)
    p = NormalDist().cdf(-direction * mean / se) if se > 0 else (0.0 if direction * mean > 0
                                                                 else 1.0)
    return {"n": n, "mean": mean, "se": se, "p": p, "ci": [mean - z * se, mean + z * se],
            "test": "two proportions"}
