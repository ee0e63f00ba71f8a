"""Inverting representations: find an image whose features match those of an original.

Given an original x0 and z0 = f(x0) (the penultimate features of a checkpoint of
advtrain.py), find x in [0, 1] that minimises ||f(x) - z0||^2 / ||z0||^2 (claim C5 of Terzi
et al., AAAI 2021: robust representations are invertible, and their low Fisher information
about the input helps to invert them).

    # every method on test images 64-95 (past the images 0-63 that chose the defaults),
    # judged by a separately trained model
    python invert.py --ckpt results/quick/l2_eps2.0_seed0/model.pt \
        --judge results/quick/judge/model.pt --start 64 --n-images 32 \
        --method baseline,tv,noise,noise-tv

Methods (all from the same seeded grey start, same normalised-gradient optimiser):
  baseline  Engstrom et al. 2019: plain objective, grey + small noise start.
  noise     the objective averaged over input noise, E_n ||f(x + n) - z0||^2 / ||z0||^2,
            n ~ N(0, sigma^2 I); to second order this adds sigma^2 ||J_f(x)||_F^2 / ||z0||^2,
            the trace of the representation's Fisher information about the input, so it
            steers away from adversarial (high-Fisher) solutions.
  tv        the plain objective plus a total-variation prior.
  noise-tv  both (sigma 0.05, tv 0.1 by default: the candidate chosen across eps on test
            images 0-63 of Fashion-MNIST 0-4, TUNED_ON; formerly called `improved`).

Outputs under --out (default: the checkpoint's folder): invert.json (method -> psnr, ssim,
feature_rel_err, judge_acc, each with a _se sibling, n_images, steps, per_image: {ssim,
psnr: one value per image, null where not finite}; plus `images` (which were inverted),
`tuned_on` (where the hyperparameters were chosen), `disjoint` (whether those differ) and
`provenance`), originals.npy and recon_<method>.npy ([N, C, H, W] float32 in [0, 1], the
model's input format, images in the order of `images`) and invert.png (rows: originals, then
one per method).

Functions to copy: each needs the names after its colon, from this file, the shared modules
after its semicolon, beside it, and this file's imports of other libraries.
    invert_features: inversion_loss, total_variation; common.py, models.py
    ssim: check_image_pair, gaussian_window; common.py, models.py
    psnr: check_image_pair; common.py, models.py
"""
import argparse
import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint
from common import (RENAMED_METHODS, ArgumentParser, Clock, UserError, add_checkpoint_args,
                    add_common_args, atomic_save, check_number, checkpoint_options,
                    ckpt_folder, mean_se, nonnegative_float, nonnegative_int, positive_int,
                    provenance, user_errors, writable_dir)
from data import adapt_images, load_split
from models import check_images, eval_mode, get_device, l2_step

# Inversion methods: which terms each adds to the feature objective. noise-tv is the candidate
# chosen across eps on the TUNED_ON images; C6 compares noise with baseline and noise-tv with tv.
METHODS = {
    "baseline": dict(noise=False, tv=False),
    "noise": dict(noise=True, tv=False),
    "tv": dict(noise=False, tv=True),
    "noise-tv": dict(noise=True, tv=True),
}
# Where the default hyperparameters (DEFAULTS) were chosen: claims are judged on other images
# only (run_all.sh inverts test images from 64 on).
DEFAULTS = dict(steps=400, step_size=1.0, sigma=0.05, tv=0.1)
TUNED_ON = {"dataset": "fashion-mnist", "classes": [0, 1, 2, 3, 4], "split": "test",
            "start": 0, "n": 64}
TUNED_VALUES = 1 * 28 * 28  # values per image where DEFAULTS["step_size"] was chosen


def default_step_size(image_shape):
    """DEFAULTS' first L2 step for images of image_shape [C, H, W]: the L2 distance between
    two images grows as the square root of their number of values, so the step does too, and
    every size moves each value as far per step as where it was tuned (CIFAR: x 1.98; 224-px
    RGB: x 13.9). The number of steps stays: with the step scaled, the path measured per value
    is the same at every size."""
    return DEFAULTS["step_size"] * math.sqrt(math.prod(image_shape) / TUNED_VALUES)


# ----------------------------------------------------------------------------- metrics

def check_image_pair(x, y, data_range):
    """ValueError unless data_range > 0 and x, y are images [N, C, H, W] of the same shape
    with values in [0, data_range]."""
    check_number("data_range", data_range, above=0)
    check_images(x, "x", high=data_range)
    check_images(y, "y", high=data_range)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {list(x.shape)} and "
                         f"{list(y.shape)}")


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio per image, in dB: 10 log10(range^2 / MSE). x, y [N, C, H, W]
    in [0, data_range] -> [N]; identical images give inf. Bad input is a ValueError."""
    check_image_pair(x, y, data_range)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size=11, sigma=1.5):
    """Normalised 2-D Gaussian [size, size]."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x, y, data_range=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity per image (Wang et al. 2004): local statistics under a size x size
    Gaussian window (default 11, sigma 1.5), 'valid' positions only, averaged over positions
    and channels. x, y [N, C, H, W] in [0, data_range], H and W >= size -> [N] in x's dtype;
    identical images give 1. Computed in float64 (the variances E[x^2] - E[x]^2 cancel badly
    in float32: errors ~1e-4 in SSIM), returned in x's dtype. Bad input is a ValueError."""
    check_image_pair(x, y, data_range)
    check_number("size", size, at_least=1, integer=True)
    check_number("sigma", sigma, above=0)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ssim needs images of at least size x size = {size} x {size} pixels "
                         f"(its window), got {list(x.shape[-2:])}")
    dtype, x, y = x.dtype, x.double(), y.double()
    c = x.shape[1]
    w = gaussian_window(size, sigma).to(x)[None, None].expand(c, 1, -1, -1)
    blur = lambda t: F.conv2d(t, w, groups=c)  # depthwise: each channel on its own
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (((2 * mu_x * mu_y + c1) * (2 * cov + c2))
         / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return s.flatten(1).mean(1).to(dtype)


@torch.no_grad()
def feature_rel_err(model, x, z0):
    """||f(x) - z0|| / ||z0|| per image, [N]; eval mode."""
    with eval_mode(model):
        return (model.features(x) - z0).norm(dim=1) / z0.norm(dim=1).clamp_min(1e-12)


@torch.no_grad()
def judge_correct(judge, x, y):
    """1.0 where the judge classifies x[i] as y[i], else 0.0, [N]."""
    return (judge(x).argmax(1) == y).float()


# ----------------------------------------------------------------------------- inversion

def total_variation(x):
    """Anisotropic TV per image, mean |horizontal| + |vertical| difference, [N]."""
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return dh + dv


def inversion_loss(model, x, z0, noise_std=0.0, n_noise=1, tv_weight=0.0, generator=None):
    """Objective per image, [N]: E_n ||f(x + n) - z0||^2 / ||z0||^2 + tv_weight * TV(x).

    n ~ N(0, noise_std^2 I), averaged over n_noise draws (one batch of n_noise * N); to
    second order the average is ||f(x) - z0||^2 + noise_std^2 ||J_f(x)||_F^2 (over ||z0||^2),
    a penalty on the Fisher information of the representation about the input.
    noise_std = 0 is the plain objective. x [N, C, H, W], z0 [N, d].
    """
    if noise_std > 0:
        noise = torch.randn((n_noise, *x.shape), generator=generator, device=x.device)
        noise = noise * noise_std
        z = model.features((x + noise).flatten(0, 1)).view(n_noise, len(x), -1)  # [K, N, d]
        loss = (z - z0).pow(2).sum(2).mean(0)
    else:
        loss = (model.features(x) - z0).pow(2).sum(1)
    loss = loss / z0.pow(2).sum(1).clamp_min(1e-12)
    if tv_weight > 0:
        loss = loss + tv_weight * total_variation(x)
    return loss


def invert_features(model, z0, x_start, steps, step_size=1.0, noise_std=0.0, n_noise=1,
                    tv_weight=0.0, generator=None):
    """Find x in [0, 1] with features(x) close to z0, by normalised gradient descent.

    model: has features(x) -> [N, d], run in eval mode (its mode is given back); z0 [N, d];
    x_start [N, C, H, W] in [0, 1]. Each step moves every image by step_size_t along its own
    L2-normalised gradient (the recipe of Engstrom et al. 2019, so images with small gradients
    still move), then clips to [0, 1]; step_size_t decays linearly from step_size (L2 pixel
    units) to ~0 (models.l2_step). Objective: inversion_loss (noise_std, n_noise, tv_weight).
    Returns x, detached. Bad input is a ValueError naming the value: x_start not images in
    [0, 1], z0 not [N, d] for its N images (d: model.head.in_features when the model has a
    head), a negative step, noise or weight, steps or n_noise not an integer.
    """
    check_images(x_start, "x_start")
    head = getattr(model, "head", None)
    d = getattr(head, "in_features", None)
    if (not torch.is_tensor(z0) or z0.dim() != 2 or len(z0) != len(x_start)
            or (d is not None and z0.shape[1] != d)):
        shape = list(z0.shape) if torch.is_tensor(z0) else type(z0).__name__
        raise ValueError(f"z0 must be features [N, d] = [{len(x_start)}, {d or 'd'}] (one row "
                         f"per image of x_start), got {shape}")
    check_number("steps", steps, at_least=0, integer=True)
    check_number("step_size", step_size, at_least=0)
    check_number("noise_std", noise_std, at_least=0)
    check_number("n_noise", n_noise, at_least=1, integer=True)
    check_number("tv_weight", tv_weight, at_least=0)
    x = x_start.detach().clone()
    with eval_mode(model):
        for t in range(steps):
            x.requires_grad_(True)
            loss = inversion_loss(model, x, z0, noise_std, n_noise, tv_weight, generator)
            (grad,) = torch.autograd.grad(loss.sum(), x)  # images are independent: sum is fine
            with torch.no_grad():
                x = (x - l2_step(grad, step_size * (1 - t / steps))).clamp_(0, 1)
    return x.detach()


def grey_start(shape, seed, noise=0.05):
    """The common start: grey 0.5 plus N(0, noise^2) pixel noise, clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + noise * torch.randn(shape, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------- command line

def tuning_record(dataset, classes, start, n, hyper):
    """(tuned_on, disjoint): where the hyperparameters were chosen, and whether the images
    test[start:start + n] are disjoint from those. Hyperparameters other than DEFAULTS were
    chosen by the user: tuned_on 'user', disjoint None (unknown)."""
    if hyper != DEFAULTS:
        return "user", None
    t = TUNED_ON
    same_set = (dataset, list(classes)) == (t["dataset"], t["classes"])
    overlap = same_set and start < t["start"] + t["n"] and t["start"] < start + n
    return t, not overlap


def png_bytes(rows, nrow):
    """A grid of image rows [M, C, H, W] in [0, 1] as PNG bytes."""
    import torchvision.utils  # only for the PNG grid
    buffer = io.BytesIO()
    torchvision.utils.save_image(rows, buffer, nrow=nrow, padding=1, format="png")
    return buffer.getvalue()


def method_list(text):
    """argparse type: 'baseline,tv' -> ['baseline', 'tv'], each a METHODS name."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    renamed = [m for m in methods if m in RENAMED_METHODS]
    if renamed:
        raise argparse.ArgumentTypeError(f"method {renamed[0]} is now called "
                                         f"{RENAMED_METHODS[renamed[0]]}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method {','.join(unknown) or '(empty)'}; "
                                         f"choose from {', '.join(METHODS)}")
    return methods


def get_args(argv=None):
    p = ArgumentParser(description="Invert a checkpoint's representation: reconstructions of "
                       "test images by several methods, with PSNR, SSIM and judge accuracy.")
    add_checkpoint_args(p)
    p.add_argument("--judge", default=None,
                   help="checkpoint of a separately trained classifier that labels the "
                        "reconstructions (same dataset and classes; default none: judge_acc is "
                        "null)")
    p.add_argument("--start", type=nonnegative_int, default=0,
                   help="index of the first test image (after class filtering)")
    p.add_argument("--n-images", type=positive_int, default=16,
                   help="invert test images start .. start + N - 1")
    p.add_argument("--method", type=method_list, default=",".join(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (the default: every "
                        f"method, so that the report can judge C5 and C6)")
    p.add_argument("--steps", type=nonnegative_int, default=DEFAULTS["steps"],
                   help="gradient steps per method")
    p.add_argument("--step-size", type=nonnegative_float, default=None,
                   help="first L2 step per image in pixel units (images in [0,1]), decays "
                        f"linearly to 0 (default {DEFAULTS['step_size']:g} for {TUNED_VALUES} "
                        "values per image, as Fashion-MNIST, scaled by the square root of the "
                        "number of values)")
    p.add_argument("--sigma", type=nonnegative_float, default=DEFAULTS["sigma"],
                   help="std of the input noise of the noise methods, pixel units")
    p.add_argument("--n-noise", type=positive_int, default=1,
                   help="noise draws averaged per step; with 1, a fresh draw every step and the "
                        "steps do the averaging")
    p.add_argument("--tv", type=nonnegative_float, default=DEFAULTS["tv"],
                   help="weight of the total-variation prior (mean absolute neighbour "
                        "difference) of the tv methods")
    p.add_argument("--seed", type=int, default=0, help="seed of the start image and the noise")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    add_common_args(p)
    return p.parse_args(argv)


def load_judge(path, ckpt, device, unsafe):
    """The judge: x [N, C, H, W] in the model's input format -> logits, each image adapted to
    the judge's own input format. Trained on other classes than the model is a UserError."""
    judge_model, jckpt = load_checkpoint(path, device, unsafe=unsafe)
    if (jckpt["dataset"], list(jckpt["classes"])) != (ckpt["dataset"], list(ckpt["classes"])):
        raise UserError(f"--judge {path} was trained on {jckpt['dataset']} classes "
                        f"{jckpt['classes']}, the checkpoint on {ckpt['dataset']} classes "
                        f"{ckpt['classes']}: labels differ")
    return lambda x: judge_model(adapt_images(x, jckpt["in_channels"], jckpt["image_size"]))


def finite_or_none(values):
    """Per-image values [N] as a JSON list: floats, None where not finite (PSNR of identical
    images is inf)."""
    return [v if math.isfinite(v) else None for v in values.double().cpu().tolist()]


def invert_with(method, model, x0, y0, z0, x_start, step_size, judge, args):
    """One method on every image: (invert.json's entry, reconstructions [N, C, H, W])."""
    terms = METHODS[method]
    gen = torch.Generator(device=x0.device).manual_seed(args.seed + 1)  # the same noise each run
    clock = Clock()
    x = invert_features(model, z0, x_start, args.steps, step_size,
                        noise_std=args.sigma if terms["noise"] else 0.0, n_noise=args.n_noise,
                        tv_weight=args.tv if terms["tv"] else 0.0, generator=gen)
    metrics = {"psnr": psnr(x, x0), "ssim": ssim(x, x0),
               "feature_rel_err": feature_rel_err(model, x, z0)}
    if judge is not None:
        metrics["judge_acc"] = judge_correct(judge, x, y0)
    entry = {}
    for name, values in metrics.items():
        entry[name], entry[name + "_se"] = mean_se(values.cpu())
    entry.setdefault("judge_acc", None)
    entry.update(n_images=len(x0), steps=args.steps, step_size=step_size,
                 sigma=args.sigma if terms["noise"] else 0.0,
                 n_noise=args.n_noise if terms["noise"] else 0,
                 tv=args.tv if terms["tv"] else 0.0, seconds=round(clock.elapsed(), 2),
                 per_image={"ssim": finite_or_none(metrics["ssim"]),
                            "psnr": finite_or_none(metrics["psnr"])})
    return entry, x


def main(args):
    clock = Clock()
    device = get_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt, device, **checkpoint_options(args))
    out = writable_dir(args.out or ckpt_folder(args))
    x0, y0 = load_split(ckpt["dataset"], False, args.data_dir, ckpt["classes"],
                        args.start + args.n_images, download=not args.no_download)
    x0 = adapt_images(x0[args.start:], ckpt["in_channels"], ckpt["image_size"]).to(device)
    y0 = y0[args.start:].to(device)
    judge = load_judge(args.judge, ckpt, device, args.unsafe_load) if args.judge else None
    with torch.no_grad():
        z0 = model.features(x0)  # [N, d]
    x_start = grey_start(x0.shape, args.seed).to(device)
    clock.log(f"loaded eps {ckpt['eps']} {ckpt['arch']} on {device}: test images {args.start}-"
              f"{args.start + len(x0) - 1}, features {z0.shape[1]}-d")
    if judge is not None:
        acc = judge_correct(judge, x0, y0).mean().item()
        start_acc = judge_correct(judge, x_start, y0).mean().item()
        clock.log(f"judge on originals {acc:.3f}, on the grey start {start_acc:.3f}; start psnr "
                  f"{psnr(x_start, x0).mean():.2f} dB ssim {ssim(x_start, x0).mean():.3f}")

    hyper = dict(steps=args.steps, sigma=args.sigma, tv=args.tv,
                 step_size=DEFAULTS["step_size"] if args.step_size is None else args.step_size)
    step_size = default_step_size(x0.shape[1:]) if args.step_size is None else args.step_size
    tuned_on, disjoint = tuning_record(ckpt["dataset"], ckpt["classes"], args.start, len(x0),
                                       hyper)
    results = {"images": {"split": "test", "start": args.start, "n": len(x0)},
               "tuned_on": tuned_on, "disjoint": disjoint}
    atomic_save(out / "originals.npy", x0.cpu().numpy().astype(np.float32))
    rows = [x0.cpu()]
    for method in args.method:
        entry, x = invert_with(method, model, x0, y0, z0, x_start, step_size, judge, args)
        results[method] = entry
        rows.append(x.cpu())
        atomic_save(out / f"recon_{method}.npy", x.cpu().numpy().astype(np.float32))
        judge_text = f" judge {entry['judge_acc']:.3f}" if judge is not None else ""
        clock.log(f"{method}: psnr {entry['psnr']:.2f} dB ssim {entry['ssim']:.3f} "
                  f"feature_rel_err {entry['feature_rel_err']:.3f}{judge_text} "
                  f"({entry['seconds']:.1f}s)")

    atomic_save(out / "invert.png", png_bytes(torch.cat(rows), nrow=len(x0)))
    results["provenance"] = provenance(vars(args))
    atomic_save(out / "invert.json", results)
    clock.log(f"wrote {out / 'invert.json'}, {out / 'invert.png'}, originals.npy, recon_*.npy")


if __name__ == "__main__":
    with user_errors():
        main(get_args())
