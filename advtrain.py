"""Adversarial training with PGD: data, models, attacks, training, evaluation.

The foundation of the study (Terzi et al., "Adversarial Training Reduces Information and
Improves Transferability", AAAI 2021). The other scripts import the shared pieces from here:
load_split, build_model, pgd_attack, load_checkpoint, atomic_save, UserError.

    # standard training (eps = 0) and L2 adversarial training on Fashion-MNIST tops
    python advtrain.py --dataset fashion-mnist --classes 0-4 --eps 0   --epochs 3 --out runs/eps0
    python advtrain.py --dataset fashion-mnist --classes 0-4 --eps 0.5 --steps 3 --out runs/eps0.5
    # Linf on CIFAR-10 with a ResNet-18 (GPU)
    python advtrain.py --dataset cifar10 --arch resnet18 --norm linf --eps 8/255 --steps 7 \
        --epochs 30 --augment --lr 0.1 --eval-eps 4/255 8/255 --out runs/cifar_linf8

Outputs under --out: model.pt (checkpoint, rewritten every epoch), log.jsonl (one line per
epoch), metrics.json (final clean and PGD accuracy). Inputs are images in [0, 1]; the
dataset's normalisation is the first layer of the model, so eps is in pixel units.
"""
import argparse
import contextlib
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (torchvision class, number of classes, channels, image size, mean, std)
DATASETS = {
    "fashion-mnist": ("FashionMNIST", 10, 1, 28, (0.2860,), (0.3530,)),
    "mnist": ("MNIST", 10, 1, 28, (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ("SVHN", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # CIFAR-shaped random images with class-dependent colour: exercises the CIFAR code
    # paths (resnet18, 3 channels, 32x32) offline, in tests and `run_all.sh paper --smoke`.
    "synthetic": (None, 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
ARCHS = ("cnn", "resnet18")


class UserError(Exception):
    """An error the user caused (bad argument, missing file): one line, no traceback."""


@contextlib.contextmanager
def user_errors():
    """Turn UserError into one line on stderr and exit status 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), not usage + error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------- arguments

def parse_eps(text):
    """'0.5', '8/255' -> float >= 0 (pixel units, images in [0, 1])."""
    try:
        num, _, den = str(text).partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 8/255, got {text!r}")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"eps must be finite and >= 0, got {text!r}")
    return value


def parse_classes(text, num_classes):
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]; None or '' -> all classes."""
    if not text:
        return list(range(num_classes))
    classes = []
    try:
        for part in str(text).split(","):
            lo, sep, hi = part.partition("-")
            classes += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise UserError(f"classes must look like 0-4 or 0,3,7, got {text!r}")
    if not classes or len(set(classes)) != len(classes):
        raise UserError(f"classes {text!r} select nothing or repeat a class")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"classes {bad} out of range: the dataset has classes 0-{num_classes - 1}")
    return classes


def mean_se(values):
    """(mean, standard error of the mean) of the finite values of a 1-d array or tensor;
    SE = 0.0 (no noise estimate) for a single value. Used for every reported number."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float64)).flatten()
    v = v[torch.isfinite(v)]
    se = (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else 0.0
    return v.mean().item(), se


def format_eps(eps):
    """The key of an eps in metrics.json: '0.5', '0.0313725' (8/255)."""
    return f"{eps:.6g}"


def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available")
    return torch.device(name)


# ----------------------------------------------------------------------------- data

def _read_idx(path):
    """IDX file (optionally gzipped) -> uint8 numpy array, as in the MNIST distribution."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder, train):
    stem = "train" if train else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        found = [p for p in (Path(folder) / f"{stem}-{kind}{ext}" for ext in ("", ".gz")) if p.is_file()]
        if not found:
            return None
        files.append(found[0])
    return files


def _load_mnist_like(name, train, data_dir, download):
    tv_name = DATASETS[name][0]
    folders = [Path(data_dir) / tv_name / "raw", Path(data_dir) / name]
    if name == "fashion-mnist":
        folders.append(Path(SYSTEM_FASHION_MNIST))
    for folder in folders:
        files = _find_idx(folder, train)
        if files:
            return _read_idx(files[0])[:, None], _read_idx(files[1])
    if not download:
        hint = (" or install the Debian/Ubuntu package dataset-fashion-mnist"
                if name == "fashion-mnist" else "")
        raise UserError(f"{name} not found in {data_dir} and --no-download given: "
                        f"run once without --no-download{hint}")
    import torchvision
    try:
        getattr(torchvision.datasets, tv_name)(root=data_dir, train=train, download=True)
    except Exception as e:  # no network, disk full, ...
        raise UserError(f"could not download {name} to {data_dir}: {str(e).splitlines()[0]}")
    files = _find_idx(folders[0], train)
    return _read_idx(files[0])[:, None], _read_idx(files[1])


def _load_torchvision(name, train, data_dir, download):
    import torchvision
    cls = getattr(torchvision.datasets, DATASETS[name][0])
    try:
        if name == "svhn":
            ds = cls(root=data_dir, split="train" if train else "test", download=download)
            return ds.data, ds.labels  # [N, 3, 32, 32] uint8
        ds = cls(root=data_dir, train=train, download=download)
        return ds.data.transpose(0, 3, 1, 2), ds.targets  # HWC -> CHW
    except Exception as e:
        if not download:
            raise UserError(f"{name} not found in {data_dir} and --no-download given: "
                            f"run once without --no-download on a machine with internet")
        raise UserError(f"could not load or download {name} to {data_dir}: {str(e).splitlines()[0]}")


def _synthetic(train, n=None):
    """Deterministic CIFAR-shaped data: class k tints the image with a colour of its own."""
    n = n or (2000 if train else 500)
    g = torch.Generator().manual_seed(0 if train else 1)
    y = torch.randint(0, 10, (n,), generator=g)
    palette = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(2))
    x = 0.5 * palette[y] + 0.5 * torch.rand(n, 3, 32, 32, generator=g)
    return (x * 255).to(torch.uint8).numpy(), y.numpy()


def load_split(name, train, data_dir="./data", classes=None, size=None, download=True):
    """One split of a dataset as tensors: x float32 [N, C, H, W] in [0, 1], y int64 [N].

    classes: original class ids to keep, relabelled 0..k-1 in the given order (None = all).
    size: keep the first `size` examples after class filtering (None = all).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "synthetic":
        x, y = _synthetic(train)
    elif name in ("mnist", "fashion-mnist"):
        x, y = _load_mnist_like(name, train, data_dir, download)
    else:
        x, y = _load_torchvision(name, train, data_dir, download)
    x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.as_tensor(np.asarray(y), dtype=torch.long)
    if classes is not None:
        relabel = torch.full((DATASETS[name][1],), -1, dtype=torch.long)
        relabel[torch.tensor(classes)] = torch.arange(len(classes))
        keep = relabel[y] >= 0
        x, y = x[keep], relabel[y[keep]]
    if size is not None:
        x, y = x[:size], y[:size]
    return x.float().div_(255), y


def adapt_images(x, channels, size):
    """Adapt images [N, C, H, W] to a model's input: grayscale <-> RGB, resize to `size`."""
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).contiguous()


def augment(x):
    """Random crop (pad 4, reflect) and horizontal flip for a batch [N, C, H, W], no loop."""
    n, c, h, w = x.shape
    xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) + dy)[:, None, :, None].expand(n, c, h, w + 8)
    xp = xp.gather(2, rows)
    cols = (torch.arange(w, device=x.device) + dx)[:, None, None, :].expand(n, c, h, w)
    x = xp.gather(3, cols)
    flip = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


# ----------------------------------------------------------------------------- models

class Normalize(nn.Module):
    """(x - mean) / std as the model's first layer, so everything outside works in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Net(nn.Module):
    """normalise -> body -> features [N, d] -> head (linear) -> logits [N, k]."""

    def __init__(self, body, feature_dim, num_classes, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        return self.body(self.normalize(x))

    def forward(self, x):
        return self.head(self.features(x))


def conv_bn(cin, cout, stride=1, kernel=3):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def cnn_body(in_channels, image_size):
    """Small CNN, ~2 MFLOPs per 28x28 image. Downsampling by strided convs and no global
    pooling: the representation is the flattened 16 x 7 x 7 map (784-d for 28x28), which
    keeps where things are, so it can be inverted (a global average pool throws that away)."""
    body = nn.Sequential(conv_bn(in_channels, 16), conv_bn(16, 32, stride=2),
                         conv_bn(32, 64, stride=2), conv_bn(64, 16, kernel=1), nn.Flatten())
    return body, 16 * ((image_size + 3) // 4) ** 2


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def resnet18_body(in_channels, width=64):
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, global average pool -> 8 * width
    (512-d for the standard width 64; a small width makes CPU smoke tests fast)."""
    layers, cin = [conv_bn(in_channels, width)], width
    for cout, stride in [(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8 * width


def build_model(arch, num_classes, in_channels, image_size, mean, std, width=64):
    if arch == "cnn":
        body, dim = cnn_body(in_channels, image_size)
    elif arch == "resnet18":
        body, dim = resnet18_body(in_channels, width)
    else:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return Net(body, dim, num_classes, mean, std)


# ----------------------------------------------------------------------------- attacks

def _per_sample_norm(t):
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))


def pgd_attack(model, x, y, norm, eps, steps, step_size=None, random_start=True):
    """Projected gradient ascent on the cross-entropy within the eps-ball around x.

    x [N, C, H, W] in [0, 1], y [N]; norm 'linf' (sign steps) or 'l2' (normalised steps).
    Model in eval mode (BatchNorm running statistics); gradients are taken with respect to
    the input only, so no parameter gradient is computed or accumulated. Returns x_adv,
    detached, with ||x_adv - x|| <= eps and x_adv in [0, 1].
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if eps == 0 or steps == 0:
        return x.detach()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    was_training = model.training
    model.eval()
    x = x.detach()
    if not random_start:
        delta = torch.zeros_like(x)
    elif norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps
    else:  # uniform direction, radius eps * U
        delta = torch.randn_like(x)
        delta *= eps * torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device) / _per_sample_norm(delta)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        with torch.enable_grad():  # also works when called under torch.no_grad()
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                delta += step_size * grad.sign()
                delta.clamp_(-eps, eps)
            else:
                delta += step_size * grad / _per_sample_norm(grad)
                delta *= (eps / _per_sample_norm(delta)).clamp(max=1.0)
            delta.copy_((x + delta).clamp(0, 1) - x)  # stay an image; shrinks the norm only
    model.train(was_training)
    return (x + delta).detach()


def accuracy(model, x, y, batch_size=500, norm="l2", eps=0.0, steps=0, restarts=1, step_size=None):
    """Accuracy on (x, y), clean (eps = 0) or under PGD; an example counts as correct only if
    it survives every restart. Batched; x may live on any device, batches move to the model's."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        ok = torch.ones_like(yb, dtype=torch.bool)
        for _ in range(restarts if eps > 0 else 1):
            xa = pgd_attack(model, xb, yb, norm, eps, steps, step_size) if eps > 0 else xb
            with torch.no_grad():
                ok &= model(xa).argmax(1) == yb
        correct += ok.sum().item()
    return correct / len(x)


# ----------------------------------------------------------------------------- files

def atomic_save(path, obj):
    """Write obj to path atomically (temporary file, then os.replace): .pt via torch.save,
    .json via json.dump, .npy via np.save. A killed run never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if path.suffix == ".pt":
            torch.save(obj, f)
        elif path.suffix == ".json":
            f.write(json.dumps(obj, indent=2).encode() + b"\n")
        elif path.suffix == ".npy":
            np.save(f, np.asarray(obj))
        else:
            f.write(obj if isinstance(obj, bytes) else str(obj).encode())
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "arch", "num_classes", "in_channels", "image_size", "dataset", "classes")


def read_checkpoint(path):
    """The checkpoint dict of advtrain.py at path, loaded with weights_only=True."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} (truncated or not a torch file): "
                        f"{str(e).splitlines()[0][:200]}")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint written by advtrain.py")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict). The one loader every script uses."""
    ckpt = read_checkpoint(path)
    _, _, _, _, mean, std = DATASETS.get(ckpt["dataset"], DATASETS["synthetic"])
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"],
                        ckpt["image_size"], mean, std, ckpt.get("width", 64))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit arch {ckpt['arch']}: {str(e).splitlines()[0]}")
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- training

def lr_at(step, total_steps, max_lr, warmup=0.25):
    """One-cycle schedule: linear 0 -> max_lr over the first `warmup` fraction, then -> 0."""
    t = step / max(total_steps, 1)
    return max_lr * (t / warmup if t < warmup else (1 - t) / (1 - warmup))


def train_epoch(model, opt, x, y, args, step0, total_steps, amp=False, channels_last=False):
    """One epoch of (adversarial) training over in-memory tensors x [N, C, H, W], y [N].
    Returns (mean loss, train accuracy on the examples it trained on, next global step)."""
    device = next(model.parameters()).device
    order = torch.randperm(len(x))  # global RNG, seeded per epoch by main()
    loss_sum, correct, step = 0.0, 0, step0
    for i in range(0, len(x), args.batch_size):
        idx = order[i:i + args.batch_size]
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        if args.augment:
            xb = augment(xb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            xb = pgd_attack(model, xb, yb, args.norm, args.eps, args.steps, args.step_size)
            model.train()
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_sum += loss.item() * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
    return loss_sum / len(x), correct / len(x), step


def evaluate(model, x, y, args):
    """Clean accuracy and PGD accuracy at the training eps and every --eval-eps."""
    adv = {}
    for eps in sorted({args.eps, *args.eval_eps} - {0.0}):
        adv[format_eps(eps)] = accuracy(model, x, y, args.batch_size, args.norm, eps,
                                        args.eval_steps, args.eval_restarts)
    return {"clean_acc": accuracy(model, x, y, args.batch_size), "adv_acc": adv}


def get_args(argv=None):
    p = ArgumentParser(description="PGD adversarial training (eps 0 = standard training).")
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of {', '.join(DATASETS)} (default fashion-mnist)")
    p.add_argument("--classes", default=None, help="classes to keep and relabel 0..k-1, e.g. 0-4 or 0,3,7 (default all)")
    p.add_argument("--train-size", type=int, default=None, help="use the first N training examples (default all)")
    p.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test examples (default all)")
    p.add_argument("--arch", default="cnn", help=f"one of {', '.join(ARCHS)} (default cnn)")
    p.add_argument("--width", type=int, default=64, help="resnet18 base width (channels of the first stage; default 64)")
    p.add_argument("--norm", default="l2", choices=["l2", "linf"], help="threat model (default l2)")
    p.add_argument("--eps", type=parse_eps, default=0.0, help="training radius in pixel units, images in [0,1]; fractions ok (8/255); 0 = standard training (default 0)")
    p.add_argument("--steps", type=int, default=3, help="PGD steps during training (default 3)")
    p.add_argument("--step-size", type=parse_eps, default=None, help="PGD step size (default 2.5 * eps / steps)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--batch-size", type=int, default=128, help="examples per step (default 128)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule (default 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default 5e-4)")
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) and horizontal flip (for CIFAR/SVHN)")
    p.add_argument("--eval-eps", type=parse_eps, nargs="*", default=[], help="extra eps values for the final PGD evaluation (default none)")
    p.add_argument("--eval-steps", type=int, default=20, help="PGD steps at evaluation (default 20)")
    p.add_argument("--eval-restarts", type=int, default=1, help="PGD random restarts at evaluation (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda (default auto)")
    p.add_argument("--data-dir", default="./data", help="where datasets are looked up and downloaded (default ./data)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the dataset is absent")
    p.add_argument("--out", default="runs/default", help="output folder (default runs/default)")
    p.add_argument("--resume", action="store_true", help="continue from --out/model.pt if it holds an unfinished run")
    args = p.parse_args(argv)
    for name in ("width", "steps", "epochs", "batch_size", "eval_steps", "eval_restarts", "train_size", "test_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.arch not in ARCHS:
        p.error(f"unknown arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    if args.dataset not in DATASETS:
        p.error(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    return args


def writable_dir(path):
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {path}: {e.strerror}")
    return Path(path)


def make_checkpoint(model, opt, args, classes, channels, size, epoch, train_seconds):
    """Plain dict of tensors and plain types: loads with torch.load(weights_only=True). The
    learning rate is a pure function of the step (lr_at), so the schedule's state is the epoch."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"model": state, "arch": args.arch, "width": args.width, "num_classes": len(classes), "in_channels": channels,
            "image_size": size, "dataset": args.dataset, "classes": classes, "norm": args.norm,
            "eps": args.eps, "args": vars(args), "epoch": epoch, "train_seconds": train_seconds,
            "metrics": {}, "optimizer": opt.state_dict(),
            "scheduler": {"kind": "onecycle", "epoch": epoch, "epochs": args.epochs}}


def main(args):
    t0 = time.time()
    out = writable_dir(args.out)
    device = get_device(args.device)
    _, num_all, channels, size, mean, std = DATASETS[args.dataset]
    classes = parse_classes(args.classes, num_all)
    load = dict(data_dir=args.data_dir, classes=classes, download=not args.no_download)
    x_train, y_train = load_split(args.dataset, True, size=args.train_size, **load)
    x_test, y_test = load_split(args.dataset, False, size=args.test_size, **load)
    x_train, y_train = x_train.to(device), y_train.to(device)  # whole dataset on the device
    print(f"data {args.dataset} classes {args.classes or 'all'}: train {len(x_train)} test {len(x_test)} "
          f"on {device} ({time.time() - t0:.1f}s)", flush=True)

    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(classes), channels, size, mean, std, args.width).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]  # no decay on BN and biases
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": rest, "weight_decay": 0.0}], lr=args.lr,
                          momentum=args.momentum, nesterov=True)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    start_epoch, log, train_seconds = 1, [], 0.0
    ckpt_path = out / "model.pt"
    if args.resume and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)
        same = {k: ckpt["args"].get(k) for k in ("dataset", "classes", "arch", "norm", "eps", "seed", "epochs")}
        if same != {k: getattr(args, k) for k in same}:
            raise UserError(f"--resume: {ckpt_path} was trained with other settings {same}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, train_seconds = ckpt["epoch"] + 1, ckpt["train_seconds"]
        log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()][:ckpt["epoch"]]
        print(f"resumed from epoch {ckpt['epoch']}", flush=True)

    ckpt = None
    for epoch in range(start_epoch, args.epochs + 1):
        torch.manual_seed(args.seed * 100003 + epoch)  # per-epoch RNG: resuming gives the same run
        te = time.time()
        loss, acc, _ = train_epoch(model, opt, x_train, y_train, args, (epoch - 1) * steps_per_epoch,
                                   total_steps, amp=cuda, channels_last=cuda)
        train_seconds += time.time() - te
        log.append({"epoch": epoch, "loss": loss, "train_acc": acc, "seconds": time.time() - te})
        ckpt = make_checkpoint(model, opt, args, classes, channels, size, epoch, train_seconds)
        atomic_save(ckpt_path, ckpt)
        atomic_save(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
        print(f"epoch {epoch}/{args.epochs} loss {loss:.4f} train_acc {acc:.4f} "
              f"epoch_time {time.time() - te:.1f}s elapsed {time.time() - t0:.1f}s", flush=True)

    ckpt = ckpt or make_checkpoint(model, opt, args, classes, channels, size, args.epochs, train_seconds)
    metrics = evaluate(model, x_test, y_test, args)
    metrics.update(eps=args.eps, norm=args.norm, arch=args.arch, dataset=args.dataset, classes=classes,
                   epochs=args.epochs, seed=args.seed, train_size=len(x_train), test_size=len(x_test),
                   eval_steps=args.eval_steps, eval_restarts=args.eval_restarts,
                   train_seconds=train_seconds)
    ckpt["metrics"] = metrics
    atomic_save(ckpt_path, ckpt)
    atomic_save(out / "metrics.json", metrics)
    adv = " ".join(f"pgd@{k} {v:.4f}" for k, v in metrics["adv_acc"].items())
    print(f"eval clean {metrics['clean_acc']:.4f} {adv} elapsed {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    with user_errors():
        main(get_args())
