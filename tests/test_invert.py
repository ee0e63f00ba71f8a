"""invert.py: metrics against known values, the inversion step, the command line."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import cli_user_error, run_main
import data
import invert
from models import build_model


def images(n=3, c=1, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- PSNR, SSIM

def test_psnr_known_values():
    x = images() * 0.8
    assert torch.isinf(invert.psnr(x, x)).all()
    for c in (0.1, 0.05):  # MSE = c^2 -> PSNR = -10 log10(c^2): 20 dB, 26.02 dB
        expected = torch.full((3,), -10 * math.log10(c ** 2))
        assert torch.allclose(invert.psnr(x + c, x), expected, atol=1e-3)


def test_ssim_identical_symmetric_and_below_one():
    x, y = images(seed=0), images(seed=1)
    assert torch.allclose(invert.ssim(x, x), torch.ones(3), atol=1e-5)
    s = invert.ssim(x, y)
    assert torch.allclose(s, invert.ssim(y, x), atol=1e-6)
    assert (s < 0.5).all() and (s > -1).all()  # independent noise images: little structure shared
    assert (invert.ssim(x, (x + 0.1 * images(seed=2)).clamp(0, 1)) < 1 - 1e-3).all()


def test_ssim_of_constant_images():
    # no variance or covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    a, b = 0.3, 0.7
    s = invert.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rel=1e-4)


def test_ssim_matches_a_window_by_window_reference():
    x, y = images(n=2, c=3, size=14, seed=3).double(), images(n=2, c=3, size=14, seed=4).double()
    y = 0.5 * x + 0.5 * y  # partly similar
    w = invert.gaussian_window().numpy()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = np.zeros(2)
    for n in range(2):
        values = []
        for c in range(3):
            for i in range(14 - 10):
                for j in range(14 - 10):
                    p, q = x[n, c, i:i + 11, j:j + 11].numpy(), y[n, c, i:i + 11, j:j + 11].numpy()
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                    cov = (w * (p - mp) * (q - mq)).sum()
                    values.append((2 * mp * mq + c1) * (2 * cov + c2)
                                  / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
        ref[n] = np.mean(values)
    assert np.allclose(invert.ssim(x, y).numpy(), ref, atol=1e-6)


# ----------------------------------------------------------------------------- inversion

@pytest.fixture(scope="module")
def random_cnn():
    torch.manual_seed(0)
    model = build_model("cnn", 5, 1, 28, (0.5,), (0.25,)).eval()
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z0 = model.features(x0)
    return model, z0


@pytest.mark.parametrize("tv_weight", [0.0, 0.1])
def test_one_inversion_step_lowers_the_objective(random_cnn, tv_weight):
    model, z0 = random_cnn
    x_start = invert.grey_start((4, 1, 28, 28), seed=0)
    before = invert.inversion_loss(model, x_start, z0, tv_weight=tv_weight).detach()
    x = invert.invert_features(model, z0, x_start, steps=1, step_size=0.1, tv_weight=tv_weight)
    after = invert.inversion_loss(model, x, z0, tv_weight=tv_weight).detach()
    assert (after < before).all(), (before, after)
    assert x.min() >= 0 and x.max() <= 1 and not torch.equal(x, x_start)


def test_total_variation_known_values_and_its_weight(random_cnn):
    """TV is the mean absolute difference of horizontal neighbours plus that of vertical ones:
    an image dark on the left and bright on the right has one jump of 1 in each row of 4
    horizontal differences (0.25) and none vertically. The objective adds tv_weight times it."""
    halves = torch.zeros(2, 1, 4, 5)
    halves[..., 3:] = 1
    assert invert.total_variation(halves).tolist() == [0.25, 0.25]
    assert invert.total_variation(halves.transpose(2, 3)).tolist() == [0.25, 0.25]
    model, z0 = random_cnn
    x = images(4, 1, 28, seed=6)
    with torch.no_grad():
        added = (invert.inversion_loss(model, x, z0, tv_weight=0.3)
                 - invert.inversion_loss(model, x, z0))
    torch.testing.assert_close(added, 0.3 * invert.total_variation(x))


def test_inversion_is_reproducible_and_noise_changes_it(random_cnn):
    model, z0 = random_cnn
    x_start = invert.grey_start((4, 1, 28, 28), seed=0)
    run = lambda: invert.invert_features(model, z0, x_start, 3, noise_std=0.1,
                                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(run(), run())
    assert not torch.equal(run(), invert.invert_features(model, z0, x_start, 3))


def test_noise_average_adds_the_jacobian_penalty():
    # for a linear representation f(x) = A x the identity is exact:
    # E_n ||f(x + n) - z0||^2 = ||f(x) - z0||^2 + sigma^2 ||A||_F^2
    torch.manual_seed(0)
    lin = nn.Linear(2 * 4 * 4, 6, bias=False)
    model = nn.Module()
    model.features = lambda x: lin(x.flatten(1))
    x, z0 = torch.rand(2, 2, 4, 4), torch.randn(2, 6)
    sigma = 0.3
    noisy = invert.inversion_loss(model, x, z0, noise_std=sigma, n_noise=20000,
                                  generator=torch.Generator().manual_seed(0)).detach()
    exact = ((lin(x.flatten(1)) - z0).pow(2).sum(1) + sigma ** 2 * lin.weight.pow(2).sum())
    exact = exact / z0.pow(2).sum(1)
    assert torch.allclose(noisy, exact.detach(), rtol=0.02)


# ----------------------------------------------------------------------------- command line

def test_cli_writes_grid_arrays_and_json(tiny_ckpt, tmp_path):
    proc = run_main("invert.py", "--ckpt", tiny_ckpt, "--judge", tiny_ckpt, "--start", 62,
                      "--n-images", 5, "--method", "baseline,noise-tv", "--steps", 4,
                      "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "baseline:" in proc.stdout and "noise-tv:" in proc.stdout
    result = json.loads((tmp_path / "invert.json").read_text())
    assert set(result) == {"baseline", "noise-tv", "images", "tuned_on", "disjoint", "provenance"}
    assert result["images"] == {"split": "test", "start": 62, "n": 5}
    # 4 steps are not the tuned defaults: where they were chosen is the user's to say
    assert result["tuned_on"] == "user" and result["disjoint"] is None
    assert result["provenance"]["settings"]["start"] == 62
    assert len(result["provenance"]["settings_hash"]) == 16
    # the originals, test images 62-66 of classes 0-4, once for every method
    originals = np.load(tmp_path / "originals.npy")
    expected, _ = data.load_split("fashion-mnist", False, classes=[0, 1, 2, 3, 4], size=67,
                                  download=False)
    assert originals.dtype == np.float32 and np.array_equal(originals, expected[62:].numpy())
    for method in ("baseline", "noise-tv"):
        entry = result[method]
        for key in ("psnr", "ssim", "feature_rel_err", "judge_acc", "psnr_se"):
            assert math.isfinite(entry[key]), (method, key)
        assert entry["n_images"] == 5 and entry["steps"] == 4
        assert 0 <= entry["judge_acc"] <= 1 and -1 <= entry["ssim"] <= 1
        recon = np.load(tmp_path / f"recon_{method}.npy")
        assert recon.shape == (5, 1, 28, 28) and recon.dtype == np.float32
        assert recon.min() >= 0 and recon.max() <= 1
        # per image, in the order of the originals: the SSIM and PSNR of each reconstruction,
        # whose means are the reported numbers
        per_image = entry["per_image"]
        assert set(per_image) == {"ssim", "psnr"} and all(len(v) == 5 for v in per_image.values())
        own = {"ssim": invert.ssim, "psnr": invert.psnr}
        for name, metric in own.items():
            values = np.array(per_image[name])
            assert values.mean() == pytest.approx(entry[name], rel=1e-12, abs=1e-12), name
            direct = metric(torch.from_numpy(recon), torch.from_numpy(originals)).double().numpy()
            np.testing.assert_allclose(values, direct, rtol=1e-5, atol=1e-6)
    from PIL import Image  # a dependency of torchvision
    # 3 rows (originals + 2 methods), 5 columns, padding 1
    with Image.open(tmp_path / "invert.png") as grid:
        assert grid.size == (5 * 29 + 1, 3 * 29 + 1)


@pytest.mark.parametrize("argv,expect", [
    (["--ckpt", "{tmp}/missing.pt"], ["not found", "missing.pt"]),
    (["--ckpt", "{tmp}/bad.pt"], ["cannot read checkpoint", "bad.pt"]),
    (["--ckpt", "x.pt", "--method", "baseline,magic"], ["magic"]),
    (["--ckpt", "x.pt", "--method", "magic"], ["magic"]),
    (["--ckpt", "x.pt", "--method", "baseline,improved"], ["improved", "now called noise-tv"]),
    (["--ckpt", "x.pt", "--n-images", "0"], ["--n-images", "0"]),
    (["--start", "4990", "--n-images", "20"], ["asked for", "has 5000"]),
    (["--n-images", "100000"], ["asked for 100000 test examples", "has 5000"]),
])
def test_user_errors_are_one_line(argv, expect, tiny_ckpt, tmp_path):
    """`python invert.py ...` (its __main__ block, in this process): one line naming the bad
    flag, value or file, and exit 2."""
    cli_user_error("invert.py", argv, expect, tiny_ckpt, tmp_path)


def test_one_name_per_method_and_the_default_runs_every_method_c6_compares():
    """C6 compares noise with baseline and noise-tv with tv: a run with the default --method
    has all four, each under the one name report.py reads."""
    from claims import DECLARATIONS
    assert invert.get_args(["--ckpt", "x.pt"]).method == list(invert.METHODS)
    pairs = DECLARATIONS["quick"]["noise_pairs"]
    assert {m for pair in pairs for m in pair} | {DECLARATIONS["quick"]["inversion_method"]} \
        == set(invert.METHODS)
    assert "improved" not in invert.METHODS


def test_default_step_size_scales_with_the_square_root_of_the_image_values():
    """Tuned at 1 x 28 x 28; the per-value step is the same at every size (ImageNet: x 13.9)."""
    assert invert.default_step_size((1, 28, 28)) == invert.DEFAULTS["step_size"]
    for shape in ((3, 32, 32), (3, 224, 224)):
        a, b = torch.zeros(shape), torch.ones(shape)  # the L2 distance between black and white
        ratio = invert.default_step_size(shape) / invert.DEFAULTS["step_size"]
        assert ratio == pytest.approx((a - b).norm().item() / torch.ones(1, 28, 28).norm().item())
    assert invert.default_step_size((3, 224, 224)) == pytest.approx(13.86, abs=0.01)


def test_tuning_record_says_whether_images_are_disjoint():
    classes = [0, 1, 2, 3, 4]
    assert invert.tuning_record("fashion-mnist", classes, 64, 32, invert.DEFAULTS) == (
        invert.TUNED_ON, True)
    assert invert.tuning_record("fashion-mnist", classes, 63, 32, invert.DEFAULTS)[1] is False
    assert invert.tuning_record("mnist", classes, 0, 32, invert.DEFAULTS)[1] is True
    other = dict(invert.DEFAULTS, tv=0.3)
    assert invert.tuning_record("fashion-mnist", classes, 0, 8, other) == ("user", None)
