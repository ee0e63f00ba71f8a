"""Adversarial training with PGD (eps = 0 is standard training), its attack and evaluation.

    # standard training (eps = 0) and L2 adversarial training on Fashion-MNIST tops
    python advtrain.py --dataset fashion-mnist --classes 0-4 --eps 0   --epochs 4 --out runs/eps0
    python advtrain.py --dataset fashion-mnist --classes 0-4 --eps 0.5 --steps 3 --out runs/eps0.5
    # Linf on CIFAR-10 with a ResNet-18 (GPU), attacked at L2 0.5 and Linf 8/255 at the end
    python advtrain.py --dataset cifar10 --arch resnet18 --norm linf --eps 8/255 --steps 7 \
        --epochs 30 --augment --lr 0.1 --eval-eps l2:0.5 linf:8/255 --out runs/cifar_linf8

Outputs under --out: model.pt (checkpoint, rewritten every epoch; build_model(**ckpt["model_args"])
rebuilds the network), log.jsonl (one line per epoch) and metrics.json (clean accuracy and
robust accuracy at every evaluation radius, each record naming its norm, radius and attack).
Inputs are images in [0, 1]; the dataset's normalisation is the first layer of the model, so
eps is in pixel units. pgd_attack, accuracy, train_epoch and evaluate take a model and tensors.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from common import (ArgumentParser, Clock, UserError, add_common_args, atomic_save, format_eps,
                    nonnegative_int, parse_classes, parse_eps, positive_int, provenance, user_errors,
                    writable_dir)
from data import DATASETS, load_split, random_crop_flip
from models import ARCHS, build_model, get_device, read_checkpoint

NORMS = ("l2", "linf")


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


# ----------------------------------------------------------------------------- training

def lr_at(step, total_steps, max_lr, warmup=0.25):
    """One-cycle schedule: linear 0 -> max_lr over the first `warmup` fraction, then -> 0."""
    t = step / max(total_steps, 1)
    return max_lr * (t / warmup if t < warmup else (1 - t) / (1 - warmup))


def train_epoch(model, opt, x, y, *, batch_size=128, norm="l2", eps=0.0, steps=3, step_size=None,
                lr_schedule=None, step0=0, augment=False, amp=False, channels_last=False):
    """One epoch of (adversarial) training over in-memory tensors x [N, C, H, W], y [N].

    Each batch (in a random order from the global RNG) is replaced by its PGD adversarial
    examples (norm, eps, steps, step_size; eps = 0 is standard training), optionally after a
    random crop and flip (augment). lr_schedule: global step -> learning rate, applied before
    every step (None leaves the optimizer's rate); step0 is the global step of the first batch.
    amp (bf16 autocast) is for CUDA; channels_last (the batch's memory layout) pays on CPU too.
    Returns (mean loss, train accuracy on the examples it trained on, next global step).
    """
    device = next(model.parameters()).device
    order = torch.randperm(len(x))
    loss_sum, correct, step = 0.0, 0, step0
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        if augment:
            xb = random_crop_flip(xb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            xb = pgd_attack(model, xb, yb, norm, eps, steps, step_size)
            model.train()
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_sum += loss.item() * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
    return loss_sum / len(x), correct / len(x), step


def evaluate(model, x, y, radii, *, batch_size=500, steps=20, restarts=1):
    """Clean accuracy and PGD accuracy at every (norm, eps) of radii.

    Returns {"clean_acc": float, "robust_acc": [{"norm", "eps", "attack", "steps", "restarts",
    "acc"}, ...]}: each robust number names its norm, radius and attack, so radii of different
    norms cannot be mistaken for each other. Radii are attacked in sorted (norm, eps) order.
    """
    robust = []
    for norm, eps in sorted(set(radii)):
        if eps > 0:
            acc = accuracy(model, x, y, batch_size, norm, eps, steps, restarts)
            robust.append({"norm": norm, "eps": eps, "attack": "pgd", "steps": steps,
                           "restarts": restarts, "acc": acc})
    return {"clean_acc": accuracy(model, x, y, batch_size), "robust_acc": robust}


# ----------------------------------------------------------------------------- script

def parse_radius(text):
    """'0.5' (the training norm) or 'linf:8/255' -> (norm or None, eps)."""
    norm, sep, eps = str(text).rpartition(":")
    if sep and norm not in NORMS:
        raise argparse.ArgumentTypeError(f"radius must look like 0.5 or linf:8/255 (norm l2 or linf), got {text!r}")
    return (norm or None), parse_eps(eps)


def get_args(argv=None):
    p = ArgumentParser(description="PGD adversarial training (eps 0 = standard training) and evaluation.")
    p.add_argument("--dataset", default="fashion-mnist", choices=list(DATASETS), help="training dataset")
    p.add_argument("--classes", default=None, help="classes to keep and relabel 0..k-1, e.g. 0-4 or 0,3,7 (default all)")
    p.add_argument("--train-size", type=positive_int, default=None, help="use the first N training examples (default all)")
    p.add_argument("--test-size", type=positive_int, default=None, help="evaluate on the first N test examples (default all)")
    p.add_argument("--arch", default="cnn", choices=ARCHS, help="model")
    p.add_argument("--width", type=positive_int, default=64, help="resnet18 base width (channels of the first stage)")
    p.add_argument("--norm", default="l2", choices=NORMS, help="threat model of training")
    p.add_argument("--eps", type=parse_eps, default=0.0,
                   help="training radius in pixel units (images in [0, 1]), fractions ok (8/255); 0 = standard training")
    p.add_argument("--steps", type=nonnegative_int, default=3, help="PGD steps during training")
    p.add_argument("--step-size", type=parse_eps, default=None, help="PGD step size (default 2.5 * eps / steps)")
    p.add_argument("--epochs", type=positive_int, default=5, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="examples per step")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (not on BatchNorm and biases)")
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) and horizontal flip (for CIFAR/SVHN)")
    p.add_argument("--eval-eps", type=parse_radius, nargs="*", default=[],
                   help="more radii for the final evaluation, besides the training eps: 0.5 (training norm) "
                        "or norm:eps, e.g. l2:0.5 linf:8/255 (default none)")
    p.add_argument("--eval-steps", type=positive_int, default=20, help="PGD steps at evaluation")
    p.add_argument("--eval-restarts", type=positive_int, default=1, help="PGD random restarts at evaluation")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialisation and data order)")
    add_common_args(p)
    p.add_argument("--out", default="runs/default", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out/model.pt if it holds an unfinished run "
                   "trained with the same settings")
    args = p.parse_args(argv)
    args.eval_eps = [(norm or args.norm, eps) for norm, eps in args.eval_eps]
    return args


def settings_of(args):
    """The settings that define a run (what provenance hashes and --resume compares)."""
    settings = vars(args).copy()
    settings["eval_eps"] = [f"{norm}:{format_eps(eps)}" for norm, eps in args.eval_eps]
    return settings


def check_resumable(ckpt, settings, path):
    """--resume continues only a run made with exactly these settings; else name the first difference."""
    recorded = ckpt.get("provenance", {}).get("settings", {})
    for key, value in provenance(settings)["settings"].items():
        if recorded.get(key) != value:
            raise UserError(f"--resume: {path} was trained with {key}={recorded.get(key)!r}, "
                            f"not {value!r}; use another --out or drop --resume")


def make_checkpoint(model, opt, args, classes, model_args, epoch, train_seconds):
    """Plain dict of tensors and plain types: loads with torch.load(weights_only=True). The
    learning rate is a pure function of the step (lr_at), so the epoch is the schedule's state."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"model": state, "model_args": model_args, "arch": args.arch, "num_classes": len(classes),
            "in_channels": model_args["in_channels"], "image_size": model_args["image_size"],
            "dataset": args.dataset, "classes": classes, "norm": args.norm, "eps": args.eps,
            "args": settings_of(args), "provenance": provenance(settings_of(args)), "epoch": epoch,
            "train_seconds": train_seconds, "optimizer": opt.state_dict()}


def main(args):
    clock = Clock()
    out = writable_dir(args.out)
    device = get_device(args.device)
    ds = DATASETS[args.dataset]
    classes = parse_classes(args.classes, ds.num_classes)
    load = dict(data_dir=args.data_dir, classes=classes, download=not args.no_download)
    x_train, y_train = load_split(args.dataset, True, size=args.train_size, **load)
    x_test, y_test = load_split(args.dataset, False, size=args.test_size, **load)
    x_train, y_train = x_train.to(device), y_train.to(device)  # whole dataset on the device
    clock.log(f"data {args.dataset} classes {args.classes or 'all'}: train {len(x_train)} test {len(x_test)} on {device}")

    torch.manual_seed(args.seed)
    model_args = dict(arch=args.arch, num_classes=len(classes), in_channels=ds.channels, image_size=ds.size,
                      mean=list(ds.mean), std=list(ds.std), width=args.width)
    # channels_last: faster convolutions on CUDA and, measured, on CPU too (tests/bench.py)
    model = build_model(**model_args).to(device, memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    decay = [p for p in model.parameters() if p.dim() > 1]  # no decay on BatchNorm and biases
    rest = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": rest, "weight_decay": 0.0}], lr=args.lr,
                          momentum=args.momentum, nesterov=True)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    start_epoch, log, train_seconds = 1, [], 0.0
    ckpt_path = out / "model.pt"
    if args.resume and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)
        check_resumable(ckpt, settings_of(args), ckpt_path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, train_seconds = ckpt["epoch"] + 1, ckpt["train_seconds"]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][:ckpt["epoch"]]
        clock.log(f"resumed from epoch {ckpt['epoch']}")

    ckpt = None
    for epoch in range(start_epoch, args.epochs + 1):
        torch.manual_seed(args.seed * 100003 + epoch)  # per-epoch RNG: resuming gives the same run
        te = time.time()
        loss, acc, _ = train_epoch(model, opt, x_train, y_train, batch_size=args.batch_size, norm=args.norm,
                                   eps=args.eps, steps=args.steps, step_size=args.step_size,
                                   lr_schedule=lambda step: lr_at(step, total_steps, args.lr),
                                   step0=(epoch - 1) * steps_per_epoch, augment=args.augment,
                                   amp=cuda, channels_last=True)
        train_seconds += time.time() - te
        log.append({"epoch": epoch, "loss": loss, "train_acc": acc, "seconds": time.time() - te})
        ckpt = make_checkpoint(model, opt, args, classes, model_args, epoch, train_seconds)
        atomic_save(ckpt_path, ckpt)
        atomic_save(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
        clock.log(f"epoch {epoch}/{args.epochs} loss {loss:.4f} train_acc {acc:.4f} epoch_time {time.time() - te:.1f}s")

    ckpt = ckpt or make_checkpoint(model, opt, args, classes, model_args, args.epochs, train_seconds)
    atomic_save(ckpt_path, ckpt)
    metrics = evaluate(model, x_test, y_test, [(args.norm, args.eps), *args.eval_eps],
                       batch_size=args.batch_size, steps=args.eval_steps, restarts=args.eval_restarts)
    metrics.update(eps=args.eps, norm=args.norm, arch=args.arch, dataset=args.dataset, classes=classes,
                   epochs=args.epochs, seed=args.seed, train_size=len(x_train), test_size=len(x_test),
                   train_seconds=train_seconds, provenance=ckpt["provenance"])
    atomic_save(out / "metrics.json", metrics)
    robust = " ".join(f"{r['norm']}@{format_eps(r['eps'])} {r['acc']:.4f}" for r in metrics["robust_acc"])
    clock.log(f"eval clean {metrics['clean_acc']:.4f} {robust}")


if __name__ == "__main__":
    with user_errors():
        main(get_args())
