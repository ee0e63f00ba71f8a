"""fisher.py: every estimator against brute force on tiny models (full Jacobians from
torch.autograd.functional.jacobian, per-example Python loops, torch.linalg.eigvalsh), and
the command line on a tiny checkpoint."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import models
import fisher
from conftest import ROOT, cli_user_error, run_main

CLASSES, SIZE = 3, 8  # cnn on 8x8 grayscale: input and feature dimension 64


@pytest.fixture(scope="module")
def tiny():
    """(model in eval mode with non-trivial BatchNorm statistics, x [4, 1, 8, 8] in [0, 1]).
    Its head is scaled by 5, so that p(y|x) is far from uniform (the largest p about 0.5 of 3
    classes): a label sampler that ignored p would be off by several SE in the tests below."""
    torch.manual_seed(0)
    model = models.build_model("cnn", CLASSES, 1, SIZE, (0.5,), (0.25,))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    with torch.no_grad():
        model.head.weight *= 5
        model.head.bias *= 5
    return model.eval(), torch.rand(4, 1, SIZE, SIZE)


def rel_err(a, b):
    return ((torch.as_tensor(a) - torch.as_tensor(b)).abs() / torch.as_tensor(b).abs()).max().item()


def loop_grad_sqnorms(model, x):
    """Per-example Python loop: {layer: [N, k]} of ||grad_w log p(y|x_n)||^2 for every class y."""
    named = list(model.named_parameters())
    out = {}
    for i in range(len(x)):
        log_probs = torch.log_softmax(model(x[i:i + 1])[0], -1)
        for y in range(len(log_probs)):
            grads = torch.autograd.grad(log_probs[y], [p for _, p in named], retain_graph=True)
            for (name, _), g in zip(named, grads):
                layer = out.setdefault(name.rpartition(".")[0], torch.zeros(len(x), len(log_probs)))
                layer[i, y] += g.pow(2).sum()
    return out


def test_weights_trace_exact_matches_per_example_loop(tiny):
    model, x = tiny
    expected = loop_grad_sqnorms(model, x)
    probs = torch.softmax(model(x), -1).detach()
    trace, per_layer = fisher.fisher_trace_weights(model, x, chunk=3)  # 3: chunks of unequal size
    assert set(per_layer) == set(expected) and "body.0.1" in per_layer  # BatchNorm counted
    for layer, sq in expected.items():
        assert rel_err(per_layer[layer], (probs * sq).sum(1)) < 1e-4, layer
    assert rel_err(trace, sum((probs * sq).sum(1) for sq in expected.values())) < 1e-4


def test_chunk_to_fit_known_values():
    """2.5 x chunk x directions x parameters floats beside twice the parameters and the
    examples: 1 MiB of gradients per example (directions x parameters = 2^18 floats) fits 10
    examples in 25 MiB and the fixed part; never below 1, never above `most`."""
    params, directions = 2 ** 16, 4  # one example's gradients: 2^18 floats, 1 MiB
    fixed = 4 * (2 * params + 1000) / 2 ** 20
    assert fisher.chunk_to_fit(25 + fixed, directions, params, 1000) == 10
    assert fisher.chunk_to_fit(25 + fixed - 0.01, directions, params, 1000) == 9
    assert fisher.chunk_to_fit(1, directions, params, 1000) == 1
    assert fisher.chunk_to_fit(10 ** 6, directions, params, 1000, most=64) == 64


def test_the_weights_trace_at_the_fitted_chunk_fits_its_memory():
    """A resnet18 of width 16 (0.7 M parameters, 5 classes: 4 directions), 64 examples, 256
    MiB: chunk_to_fit's chunk holds at most that at its peak, measured as bench.py --memory
    does (a process of its own, its resident set's peak on a second call), and uses at least
    40% of it (with the factor at 1, the gradients alone, its chunk of 23 holds 561 MiB)."""
    import bench
    code = textwrap.dedent("""\
        import sys, torch
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
        import bench, fisher, models
        torch.manual_seed(0)
        net = models.build_model("resnet18", 5, 3, 32, [0.5] * 3, [0.25] * 3, width=16).eval()
        x = torch.rand(64, 3, 32, 32)
        params = sum(p.numel() for p in net.parameters())
        chunk = fisher.chunk_to_fit(256, 4, params, x.numel())
        run = lambda: fisher.fisher_trace_weights(net, x, chunk=chunk)
        print(chunk, bench.peak_growth_mib(run, torch.device("cpu")))""")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **bench.MEMORY_ENV})
    assert proc.returncode == 0, proc.stderr
    chunk, peak = proc.stdout.split()
    assert int(chunk) > 1 and 0.4 * 256 <= float(peak) <= 256, (chunk, peak)


def test_fisher_factor_has_k_minus_1_columns_and_reproduces_the_covariance():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).double() * 3
    probs = torch.softmax(logits, -1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)  # a certain prediction: M = 0
    factor = fisher.fisher_factor(probs)
    assert factor.shape == (6, 5, 4)
    expected = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    torch.testing.assert_close(factor @ factor.transpose(1, 2), expected, atol=1e-12, rtol=0)


def test_weights_trace_empirical_uses_the_given_labels(tiny):
    model, x = tiny
    y = torch.tensor([2, 0, 1, 2])
    total = sum(loop_grad_sqnorms(model, x).values())  # [N, k]
    trace, _ = fisher.fisher_trace_weights(model, x, y)
    assert rel_err(trace, total[torch.arange(4), y]) < 1e-4


def test_weights_trace_sampled_labels_within_3_se(tiny):
    model, x = tiny
    total = sum(loop_grad_sqnorms(model, x).values())  # [N, k]
    probs = torch.softmax(model(x), -1).detach()
    exact = (probs * total).sum(1)
    samples = 50
    variance = (probs * (total - exact[:, None]) ** 2).sum(1) / samples  # of the per-example mean
    trace, _ = fisher.fisher_trace_weights(model, x, label_samples=samples,
                                           generator=torch.Generator().manual_seed(0))
    assert abs((trace - exact).sum()) < 3 * variance.sum().sqrt()
    assert not torch.allclose(trace, exact, rtol=1e-4)  # really sampled


def input_fisher_brute(model, x):
    """F_x(x_n) = J^T (diag p - p p^T) J from the full Jacobian: [N, D, D]."""
    fishers = []
    for xi in x:
        jac = jacobian(lambda v: model(v[None])[0], xi).flatten(1)  # [k, D]
        p = torch.softmax(model(xi[None])[0], -1).detach()
        fishers.append(jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac)
    return torch.stack(fishers).double()


def test_input_fisher_trace_and_lambda_max_match_full_jacobian(tiny):
    model, x = tiny
    fishers = input_fisher_brute(model, x)
    traces = fishers.diagonal(dim1=1, dim2=2).sum(1)
    assert rel_err(fisher.input_fisher_trace(model, x), traces) < 1e-4
    lam, steps = fisher.input_fisher_lambda_max(model, x, iters=50, tol=1e-6,
                                                generator=torch.Generator().manual_seed(0))
    assert rel_err(lam, torch.linalg.eigvalsh(fishers)[:, -1]) < 1e-3
    assert steps <= CLASSES + 2  # rank < k: Lanczos is exact after k steps


def test_input_fisher_trace_sampled_labels_within_3_se(tiny):
    """Label sampling (for many classes): unbiased, within 3 SE of the exact sum over classes."""
    model, x = tiny
    log_probs = lambda v: torch.log_softmax(model(v[None])[0], -1)
    jac = torch.stack([jacobian(log_probs, xi).flatten(1) for xi in x])
    sq = jac.pow(2).sum(2).double()  # ||grad_x log p(y|x)||^2 [N, k]
    probs = torch.softmax(model(x), -1).detach().double()
    exact = (probs * sq).sum(1)
    samples = 50
    variance = (probs * (sq - exact[:, None]) ** 2).sum(1) / samples  # of the per-example mean
    trace = fisher.input_fisher_trace(model, x, label_samples=samples,
                                      generator=torch.Generator().manual_seed(0))
    assert abs((trace - exact).sum()) < 3 * variance.sum().sqrt()
    assert not torch.allclose(trace.double(), exact, rtol=1e-4)  # really sampled


def repr_jacobians(model, x):
    features = lambda v: model.features(v[None])[0]
    return torch.stack([jacobian(features, xi).flatten(1) for xi in x])  # [N, d, D]


def test_repr_frobenius_exact_and_lambda_max_match_full_jacobian(tiny):
    model, x = tiny
    jac = repr_jacobians(model, x).double()
    frobenius = fisher.repr_jacobian_frobenius(model, x, probes=64)
    assert rel_err(frobenius, jac.pow(2).sum((1, 2))) < 1e-4
    lam, _ = fisher.repr_lambda_max(model, x, iters=64, tol=1e-7,
                                    generator=torch.Generator().manual_seed(0))
    assert rel_err(lam, torch.linalg.eigvalsh(jac.transpose(1, 2) @ jac)[:, -1]) < 1e-3


def test_repr_frobenius_hutchinson_within_3_se(tiny):
    model, x = tiny
    jac = repr_jacobians(model, x).double()
    # A = J_f J_f^T [N, d, d]; Rademacher r: Var r^T A r = 2 (||A||^2 - sum A_ii^2)
    gram = jac @ jac.transpose(1, 2)
    probes = 8
    variance = 2 * (gram.pow(2).sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(1)) / probes
    estimate = fisher.repr_jacobian_frobenius(model, x, probes,
                                              torch.Generator().manual_seed(0)).double()
    exact = jac.pow(2).sum((1, 2))
    assert ((estimate - exact).abs() < 3 * variance.sqrt()).all()
    assert rel_err(estimate, exact) > 1e-6  # really estimated


def test_repr_frobenius_hutchinson_exact_when_jj_t_is_diagonal():
    """Features W x with orthogonal rows of unequal norms: J_f J_f^T = W W^T is diagonal, so
    every Rademacher probe gives r^T W W^T r = ||W||_F^2 exactly, and the estimate over
    probes < d equals it (a wrong normalisation shows as a wrong factor)."""
    class Linear(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w  # [d, C*H*W]

        def features(self, x):
            return x.flatten(1) @ self.w.T

    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(16, 12, generator=g, dtype=torch.float64))[0].T  # [12, 16]
    w = (torch.linspace(0.5, 2.0, 12, dtype=torch.float64)[:, None] * q).float()
    x = torch.rand(3, 1, 4, 4, generator=g)
    estimate = fisher.repr_jacobian_frobenius(Linear(w), x, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimate, w.pow(2).sum().expand(3), rtol=1e-5, atol=0)


def test_lanczos_small_eigengap_and_low_rank():
    """Operators with lambda_2 / lambda_1 = 0.99 (power iteration would need ~1000 steps)
    and of rank 2 (the Krylov space becomes invariant): both to 1e-3 of eigvalsh."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(2, 50, 50))[0]  # [2, 50, 50] orthogonal
    spectra = torch.stack([torch.cat([torch.tensor([1.0, 0.99]), torch.linspace(0.9, 0, 48)]),
                           torch.cat([torch.tensor([3.0, 1.0]), torch.zeros(48)])])
    ops = basis @ torch.diag_embed(spectra) @ basis.transpose(1, 2)
    lam, _ = fisher.lanczos_lambda_max(lambda v: (ops @ v[:, :, None])[:, :, 0],
                                       torch.randn(2, 50), 50, 1e-7)
    assert rel_err(lam, torch.linalg.eigvalsh(ops.double())[:, -1]) < 1e-3


def test_mean_se_and_ratio_se_against_simulation():
    """ratio_mean_se's delta-method SE matches the spread of the ratio over many data sets
    drawn from one distribution (correlated, noisy numerator and denominator)."""
    values = np.array([1.0, 2.0, 3.0, 6.0])
    assert fisher.mean_se(values) == pytest.approx((3.0, np.std(values, ddof=1) / 2))
    rng = np.random.default_rng(0)
    den = rng.gamma(4.0, 1.0, size=(2000, 200))
    num = 0.5 * den + rng.normal(0, 1.0, size=den.shape)  # E num / E den = 0.5
    ratios = num.mean(1) / den.mean(1)
    ses = np.array([fisher.ratio_mean_se(n, d)[1] for n, d in zip(num[:200], den[:200])])
    assert ratios.mean() == pytest.approx(0.5, abs=0.005)
    assert ses.mean() == pytest.approx(ratios.std(), rel=0.1)


def test_cli_writes_fisher_json_and_arrays(tiny_ckpt, tmp_path):
    proc = run_main("fisher.py", "--ckpt", tiny_ckpt, "--n", 12, "--out", tmp_path, "--chunk", 5,
                      "--batch-size", 8, "--probes", 4, "--power-iters", 30, "--no-download")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 7  # one line per stage
    result = json.loads((tmp_path / "fisher.json").read_text())
    scalars = ["weights_trace", "weights_trace_empirical", "input_trace", "input_lambda_max",
               "repr_trace", "repr_lambda_max", "repr_trace_normalized",
               "repr_lambda_max_normalized"]
    for key in scalars:
        assert np.isfinite(result[key]) and result[key] > 0, key
        assert np.isfinite(result[key + "_se"]), key
    assert result["n"] == 12
    per_layer = result["weights_trace_per_layer"]
    assert set(per_layer) == set(result["weights_trace_per_layer_se"]) and "head" in per_layer
    assert sum(per_layer.values()) == pytest.approx(result["weights_trace"], rel=1e-5)
    assert result["input_lambda_max"] <= result["input_trace"] * (1 + 1e-4)
    for name in ("weights_trace", "weights_trace_empirical", "input_trace", "input_lambda_max",
                 "repr_trace", "repr_lambda_max", "repr_sqnorm"):
        values = np.load(tmp_path / f"fisher_{name}.npy")
        assert values.shape == (12,) and values.mean() == pytest.approx(result[name]), name


def test_cli_memory_lowers_the_chunk_and_keeps_the_trace(tiny_ckpt, tmp_path):
    """--memory-mib 1 leaves room for one example per chunk of the tiny cnn: fisher.json
    records chunk 1 (from --chunk 5) and the same per-example traces as chunks of 5."""
    common = ["--ckpt", tiny_ckpt, "--n", 12, "--chunk", 5, "--batch-size", 8, "--probes", 4,
              "--power-iters", 5, "--no-download"]
    for name, extra in (("chunks", []), ("fitted", ["--memory-mib", 1])):
        proc = run_main("fisher.py", *common, *extra, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    fitted = json.loads((tmp_path / "fitted" / "fisher.json").read_text())
    assert fitted["provenance"]["settings"]["chunk"] == 1, fitted["provenance"]
    assert "chunk 1: the weights' trace fits 1 MiB" in proc.stdout, proc.stdout
    for name in ("weights_trace", "weights_trace_empirical"):
        np.testing.assert_allclose(np.load(tmp_path / "fitted" / f"fisher_{name}.npy"),
                                   np.load(tmp_path / "chunks" / f"fisher_{name}.npy"), rtol=1e-5)


@pytest.mark.parametrize("argv,expect", [
    (["--ckpt", "{tmp}/missing.pt"], ["not found", "missing.pt"]),
    (["--ckpt", "{tmp}/bad.pt"], ["cannot read", "bad.pt"]),
    (["--n", "1000000", "--no-download"], ["asked for 1000000 test examples", "has 5000"]),
    (["--n", "0"], ["--n", "0"]),
    (["--probes", "0"], ["--probes", "0"]),
    (["--tol", "0"], ["--tol", "0"]),
    (["--dataset", "nope"], ["--dataset", "nope"]),
])
def test_cli_user_errors(argv, expect, tiny_ckpt, tmp_path):
    """`python fisher.py ...` (its __main__ block, in this process): one line naming the bad
    flag, value or file, and exit 2."""
    cli_user_error("fisher.py", argv, expect, tiny_ckpt, tmp_path)
