"""Linear transferability of frozen representations: penultimate features + a linear probe.

Fixed-feature transfer (claim C2 of Terzi et al., AAAI 2021): the source model is frozen
(eval mode, no gradients, so BatchNorm statistics never see the target), its penultimate
features of each target task are cached, and a multinomial logistic regression is fitted
on them. Higher target accuracy = more linearly transferable representation.

    # quick preset: a model trained on Fashion-MNIST classes 0-4, probed on classes 5-9
    python transfer.py --ckpt runs/eps0.5/model.pt --target fashion-mnist:5-9
    # paper preset: CIFAR-10 ResNet-18 to CIFAR-100, SVHN, Fashion-MNIST and MNIST
    python transfer.py --ckpt runs/cifar_linf8/model.pt --target cifar100 --target svhn \
        --target fashion-mnist --target mnist --out runs/cifar_linf8
    # and few-shot probes: K = 1, 10, 100 labelled examples per class, 5 seeded draws each
    # (100 at K = 10), the draws seeded by --seed (run_all.sh: the training seed)
    python transfer.py --ckpt runs/eps0.5/model.pt --target fashion-mnist:5-9 --shots 1 10 100 \
        --draws 5 10:100 --seed 0

Outputs under --out (default: the checkpoint's folder): transfer.json (target name -> {acc,
l2, val_acc, n_train, n_test, feature_dim, classes, adapt, fit_seconds, grad_max, correct,
with --shots few_shot: K -> {acc, acc_se, draws, l2 (per draw), criterion, at_edge}, with
--finetune finetune: {acc, epochs, lr, n_train}}, and `provenance`); correct/<stem>.npz
(per test example, 1 = correct, uint8: "probe" [N_test], "<K>-shot" [draws, N_test],
"fine-tuned" [N_test]; stem = the target with ':' and ',' replaced by '_';
transfer.json[target]["correct"] names it), and features/<stem>_<split>.npy (float32 [N, d],
with features/<stem>_<split>.json, the record of what made them: reused by later runs only
for the same model weights (their digest) and extraction settings).

Functions to copy: each needs the names after its colon, from this file, the shared modules
after its semicolon, beside it, and this file's imports of other libraries.
    extract_features: (none); common.py, data.py, models.py
    linear_probe: check_features, check_l2_grid, check_probe_inputs, fit_logistic,
        probe_accuracy, probe_correct; common.py, models.py
    few_shot_probe: FEW_SHOT_L2_BY_SHOTS, check_features, check_l2_grid, check_probe_inputs,
        check_shots, few_shot_l2, fit_logistic, k_shot_indices, probe_correct; common.py,
        models.py
    finetune: FINETUNE_BUDGET, extract_features; common.py, data.py, models.py
"""
import argparse
import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint
from common import (ArgumentParser, Clock, UserError, add_checkpoint_args, add_common_args,
                    atomic_save, check_number, checkpoint_options, ckpt_folder, lr_at, mean_se,
                    nonnegative_int, parse_classes, positive_int, provenance, user_errors,
                    writable_dir)
from data import (DATASETS, STREAM_RULE, adapt_images, iterate_batches, load_split, open_split,
                  split_labels)
from models import check_images, check_labels, eval_mode, get_device, make_optimizer, sgd_epoch


# Distribution shifts a target may carry ("fashion-mnist:5-9+invert"): a target further from
# the source than its classes alone, offline. Images [N, C, H, W] in [0, 1].
SHIFTS = {
    "invert": lambda x: 1 - x,  # contrast inversion: dark garments on a white background
    "rot90": lambda x: x.rot90(1, (2, 3)),  # a quarter turn
}


def parse_target(text):
    """'fashion-mnist:5-9' -> ('fashion-mnist', [5, 6, 7, 8, 9], None); 'mnist' -> ('mnist',
    all, None); 'fashion-mnist:5-9+invert' -> (..., 'invert'), the images shifted by
    SHIFTS['invert']. A text of another form is a ValueError."""
    body, plus, shift = text.partition("+")
    name, sep, classes = body.partition(":")
    if not name or (sep and not classes) or ":" in classes or (plus and shift not in SHIFTS):
        raise ValueError(f"target must look like dataset[:classes][+shift] (e.g. "
                         f"fashion-mnist:5-9+invert; shifts: {', '.join(SHIFTS)}), got {text!r}")
    if name not in DATASETS:
        raise ValueError(f"unknown target dataset {name!r} in {text!r}; choose from "
                         f"{', '.join(DATASETS)}")
    try:
        return name, parse_classes(classes, DATASETS[name].num_classes), shift or None
    except ValueError as e:
        raise ValueError(f"target {text!r}: {e}") from None


def target_stem(text):
    """The target's name in file names: ':' and ',' replaced by '_'
    (fashion-mnist:5-9+invert -> fashion-mnist_5-9+invert)."""
    return text.replace(":", "_").replace(",", "_")


def describe_adaptation(channels, size, model_channels, model_size):
    """How target images are changed to fit the model, e.g. '1->3 channels, 28->32 px' or
    'none'."""
    steps = []
    if channels != model_channels:
        steps.append(f"{channels}->{model_channels} channels")
    if size != model_size:
        steps.append(f"{size}->{model_size} px")
    return ", ".join(steps) or "none"


def extract_features(model, split, channels, size, batch_size=128, progress=None,
                     transform=None, workers=None):
    """Frozen penultimate features of a split -> float32 [N, d] on the CPU.

    split: images [N, C, H, W] in [0, 1] (a tensor, or (x, y) tensors) held in memory, or a
    Dataset of (image, label) streamed from disk (data.open_split chooses, data.STREAM_RULE).
    Eval mode (BatchNorm uses its running statistics and never updates them; the model's mode
    is given back) and no_grad; each batch is transformed (transform, e.g. a SHIFTS entry) and
    adapted to the model's input (channels, size) on the fly, so the adapted copy of the whole
    set never sits in memory. progress: optional wrapper of the batch indices (e.g.
    common.Clock().progress) for rate and time-left lines. Bad input is a ValueError naming
    the value: in-memory images not [N, C, H, W] in [0, 1], labels not one per image,
    channels, size or batch_size below 1, workers below 0.
    """
    check_number("channels", channels, at_least=1, integer=True)
    check_number("size", size, at_least=1, integer=True)
    check_number("batch_size", batch_size, at_least=1, integer=True)
    if workers is not None:
        check_number("workers", workers, at_least=0, integer=True)
    if torch.is_tensor(split):
        split = (split, torch.zeros(len(split), dtype=torch.long))
    if isinstance(split, tuple):
        if len(split) != 2:
            raise ValueError(f"split must be images, (images, labels) or a Dataset, got a "
                             f"tuple of {len(split)}")
        check_images(split[0], "split images")
        check_labels(split[1], len(split[0]), "split labels")
    elif not hasattr(split, "__getitem__") or not hasattr(split, "__len__"):
        raise ValueError(f"split must be images, (images, labels) or a Dataset, got "
                         f"{type(split).__name__}")
    device = next(model.parameters()).device
    n_batches = -(-len(split[0] if isinstance(split, tuple) else split) // batch_size)
    starts = progress(range(n_batches)) if progress else range(n_batches)
    feats = []
    batches = iterate_batches(split, batch_size, channels, size, device, workers, transform)
    with eval_mode(model), torch.no_grad():
        for _, (xb, _) in zip(starts, batches):
            feats.append(model.features(xb).float().cpu())
    return torch.cat(feats)


def fit_logistic(x, y, l2, num_classes, init=None, max_iter=1000, tol=1e-4):
    """Multinomial logistic regression on features x [N, d] standardised with their own mean
    and std: minimises mean cross-entropy + l2 / 2 * ||W||^2 (bias not penalised), full
    batch, by L-BFGS with a strong-Wolfe line search until the largest gradient entry is below
    `tol` (or `max_iter` iterations). init: a previous fit to warm-start from (the problem is
    convex, so only the number of iterations changes). Returns a dict: weight [k, d], bias
    [k], mean [d], std [d] (z = (x - mean) / std), grad_max, iterations."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # dead (constant) features stay 0
    z = (x - mean) / std  # [N, d]
    if init is None:
        weight = x.new_zeros(num_classes, x.shape[1]).requires_grad_()  # [k, d]
        bias = x.new_zeros(num_classes).requires_grad_()
    else:
        weight = init["weight"].clone().requires_grad_()
        bias = init["bias"].clone().requires_grad_()
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        logits = z @ weight.T + bias  # [N, k]
        loss = F.cross_entropy(logits, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(objective)
    objective()  # gradient at the final weights, to report convergence
    grad_max = torch.stack([weight.grad.abs().max(), bias.grad.abs().max()]).max().item()
    return dict(weight=weight.detach(), bias=bias.detach(), mean=mean, std=std,
                grad_max=grad_max, iterations=opt.state[weight]["n_iter"])


def probe_correct(probe, x, y):
    """Whether a fitted probe (fit_logistic) classifies each example right: bool [N], from
    features x [N, d] and labels y [N]."""
    logits = ((x - probe["mean"]) / probe["std"]) @ probe["weight"].T + probe["bias"]
    return logits.argmax(1) == y


def probe_accuracy(probe, x, y):
    """Accuracy of a fitted probe (fit_logistic) on features x [N, d], labels y [N]."""
    return probe_correct(probe, x, y).double().mean().item()


def check_features(feats, labels, name):
    """ValueError naming `name` unless feats is a float tensor [N, d] with N >= 1 and labels
    its N class labels, integers >= 0."""
    if not torch.is_tensor(feats) or feats.dim() != 2 or not feats.is_floating_point() \
            or len(feats) == 0:
        shape = list(feats.shape) if torch.is_tensor(feats) else type(feats).__name__
        raise ValueError(f"{name}_feats must be a float tensor [N, d] with N >= 1, got {shape}")
    check_labels(labels, len(feats), f"{name}_labels")
    if int(labels.min()) < 0:
        raise ValueError(f"{name}_labels must be class labels >= 0, got {int(labels.min())}")


def check_probe_inputs(train_feats, train_labels, test_feats, test_labels):
    """ValueError naming the bad value unless the train and test features are float [N, d] of
    one width d with their class labels (check_features), every test label a class of the
    training labels: a probe never predicts a class it was not fitted on, so its accuracy on
    such labels would be nonsense."""
    check_features(train_feats, train_labels, "train")
    check_features(test_feats, test_labels, "test")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train_feats and test_feats must have the same width d, got "
                         f"{train_feats.shape[1]} and {test_feats.shape[1]}")
    if int(test_labels.max()) > int(train_labels.max()):
        raise ValueError(f"test_labels must be classes of the training labels (0-"
                         f"{int(train_labels.max())}), got {int(test_labels.max())}")


def check_l2_grid(l2_grid):
    """ValueError unless l2_grid holds at least one penalty, each a finite number >= 0."""
    if not len(l2_grid):
        raise ValueError("l2_grid must hold at least one penalty, got none")
    for l2 in l2_grid:
        check_number("each l2_grid value", l2, at_least=0)


def linear_probe(train_feats, train_labels, test_feats, test_labels,
                 l2_grid=(1e-4, 1e-3, 1e-2, 1e-1), val_fraction=0.2, seed=0,
                 max_iter=1000, tol=1e-4, select_tol=1e-3, dtype=torch.float32):
    """Multinomial logistic regression probe (fit_logistic); returns test accuracy and the fit.

    Features [N, d] are standardised with the mean and std of the training features only.
    Fitted in `dtype` (float64 reaches smaller gradients than float32, at a higher cost). The
    penalty is the l2_grid value with the best accuracy on a random `val_fraction` of the
    training set (ties go to the larger penalty), fitted to max |gradient| <= select_tol (a
    choice among penalties needs less precision than the reported probe), then the probe is
    refitted on the whole training set to `tol`. Deterministic for a seed. Returns a dict:
    acc, correct (bool [N_test], whether each test example is classified right), l2, val_acc
    {l2: accuracy}, and fit_logistic's weight, bias, mean, std, grad_max (largest |gradient|
    of the objective at the returned weights), iterations. Bad input is a ValueError naming
    the value (features and labels, train and test of different widths, an empty or negative
    grid, val_fraction outside (0, 1), tolerances <= 0, test labels of classes the training
    labels lack).
    """
    check_probe_inputs(train_feats, train_labels, test_feats, test_labels)
    check_l2_grid(l2_grid)
    if len(l2_grid) > 1:
        check_number("val_fraction", val_fraction, above=0)
        if val_fraction >= 1 or len(train_feats) < 2:
            raise ValueError(f"choosing among {len(l2_grid)} penalties needs val_fraction < 1 "
                             f"and >= 2 training examples, got {val_fraction} and "
                             f"{len(train_feats)}")
    check_number("max_iter", max_iter, at_least=1, integer=True)
    check_number("tol", tol, above=0)
    check_number("select_tol", select_tol, above=0)
    train_feats, test_feats = train_feats.to(dtype), test_feats.to(dtype)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    val_acc, val_probes = {}, {}
    if len(l2_grid) > 1:
        order = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(seed))
        n_val = min(max(1, round(val_fraction * len(order))), len(order) - 1)
        val, fit_part = order[:n_val].to(train_feats.device), order[n_val:].to(train_feats.device)
        previous = None
        for l2 in sorted(l2_grid, reverse=True):  # strong to weak penalty, each warm-started
            previous = val_probes[l2] = fit_logistic(
                train_feats[fit_part], train_labels[fit_part], l2, num_classes, previous,
                max_iter, select_tol)
            val_acc[l2] = probe_accuracy(previous, train_feats[val], train_labels[val])
    best_l2 = max(l2_grid, key=lambda l2: (val_acc.get(l2, 0.0), l2))
    probe = fit_logistic(train_feats, train_labels, best_l2, num_classes, val_probes.get(best_l2),
                         max_iter, tol)
    correct = probe_correct(probe, test_feats, test_labels)
    return dict(acc=correct.double().mean().item(), correct=correct, l2=best_l2, val_acc=val_acc,
                **probe)


# few_shot_probe's penalty per K (rule 4, docs/FEW_SHOT.md): fixed in advance on settings the
# claims are not judged on; other K are interpolated (few_shot_l2).
FEW_SHOT_L2_BY_SHOTS = {1: 1e2, 10: 10 ** -0.5, 100: 1e-1}
# Rule 3's grid (a penalty chosen within each draw by cross-validation on correct counts),
# kept to reproduce rule 3: few_shot_probe(..., l2_grid=FEW_SHOT_L2_GRID).
FEW_SHOT_L2_GRID = tuple(10.0 ** e for e in range(-3, 4))  # 1e-3 .. 1e3: wide, few examples


def check_shots(labels, shots):
    """Per-class counts of labels [N] (classes 0..k-1); ValueError when a class has fewer than
    `shots` examples."""
    counts = torch.bincount(labels.cpu(), minlength=int(labels.max()) + 1)
    if (counts < shots).any():
        short = int(counts.argmin())
        raise ValueError(f"{shots} shots per class asked for, but class {short} has "
                         f"{int(counts[short])} training examples")
    return counts


def k_shot_indices(labels, shots, generator):
    """`shots` distinct random examples of every class of labels [N] (classes 0..k-1), class by
    class: indices [k * shots]; raises ValueError when a class has fewer."""
    counts = check_shots(labels, shots)
    picks = []
    for c in range(len(counts)):
        members = (labels.cpu() == c).nonzero()[:, 0]
        picks.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picks).to(labels.device)


def few_shot_l2(shots, l2_by_shots=FEW_SHOT_L2_BY_SHOTS):
    """Rule 4's penalty for `shots` examples per class: l2_by_shots[shots] where given, else
    log-linear in log K between the nearest given K, and the end value beyond them."""
    ks = sorted(l2_by_shots)
    shots = min(max(shots, ks[0]), ks[-1])
    if shots in l2_by_shots:
        return float(l2_by_shots[shots])
    log_l2 = np.interp(np.log(shots), np.log(ks), [np.log(l2_by_shots[k]) for k in ks])
    return float(np.exp(log_l2))


def few_shot_probe(train_feats, train_labels, test_feats, test_labels, shots, draws=5, seed=0,
                   l2_grid=None, folds=5, dtype=torch.float32):
    """Linear probe (fit_logistic) fitted on `shots` labelled examples per class, over `draws`
    seeded draws, evaluated on the whole test set.

    The penalty: with l2_grid None (rule 4, docs/FEW_SHOT.md) fixed in advance per K,
    few_shot_l2(shots), the same for every draw and model: a choice made within 5 or 10
    examples per class is noisier than the accuracy it chooses for. With a grid of several
    values (rule 3: l2_grid=FEW_SHOT_L2_GRID) each draw chooses by stratified
    cross-validation within its K-shot set (min(shots, folds) folds; fold f holds out the
    f-th, f + folds-th, ... example of every class), never on test data: the value with the
    most correct held-out predictions, ties to the larger penalty; with one shot per class
    no held-out example can be predicted (its class would be absent), so the largest value is
    used. A one-value grid is that penalty. Deterministic for a seed. Returns {acc, acc_se
    (over draws), draws, l2 (the penalty of each draw), criterion ("fixed" or "cv-correct":
    how the penalties were chosen), at_edge (cv-correct: draws whose penalty is the grid's
    smallest or largest; else None), correct (bool [draws, N_test] on the CPU: whether draw
    d's probe classifies test example i right)}. Bad input is a ValueError naming the value
    (as linear_probe's; shots and draws < 1, folds < 2).
    """
    check_probe_inputs(train_feats, train_labels, test_feats, test_labels)
    check_number("shots", shots, at_least=1, integer=True)
    check_number("draws", draws, at_least=1, integer=True)
    check_number("folds", folds, at_least=2, integer=True)
    if l2_grid is not None:
        check_l2_grid(l2_grid)
    train_feats, test_feats = train_feats.to(dtype), test_feats.to(dtype)
    num_classes = int(train_labels.max()) + 1
    grid = [few_shot_l2(shots)] if l2_grid is None else sorted(l2_grid, reverse=True)
    cross_validate = len(grid) > 1 and shots > 1
    rows, chosen = [], []
    for draw in range(draws):
        g = torch.Generator().manual_seed(seed * 1000003 + shots * 1009 + draw)
        idx = k_shot_indices(train_labels, shots, g)
        x, y = train_feats[idx], train_labels[idx]
        best = grid[0]  # the one value, or the largest penalty (one shot per class)
        if cross_validate:
            position = torch.arange(shots, device=y.device).repeat(num_classes)  # within class
            n_folds, held_right = min(shots, folds), dict.fromkeys(grid, 0)
            for f in range(n_folds):
                held = position % n_folds == f
                previous = None
                for l2 in grid:  # strong to weak, each warm-started
                    previous = fit_logistic(x[~held], y[~held], l2, num_classes, previous)
                    held_right[l2] += int(probe_correct(previous, x[held], y[held]).sum())
            best = max(grid, key=lambda l2: (held_right[l2], l2))  # ties: the larger penalty
        probe = fit_logistic(x, y, best, num_classes)
        rows.append(probe_correct(probe, test_feats, test_labels).cpu())
        chosen.append(best)
    correct = torch.stack(rows)  # [draws, N_test]
    acc, acc_se = mean_se(correct.double().mean(1))
    edges = (min(grid), max(grid))
    return {"acc": acc, "acc_se": acc_se, "draws": draws, "l2": chosen,
            "criterion": "cv-correct" if cross_validate else "fixed",
            "at_edge": sum(l2 in edges for l2 in chosen) if cross_validate else None,
            "correct": correct}


# The fine-tuning budget chosen on held-out settings (docs/FINETUNE.md): the fewest epochs, then
# the lowest peak lr, at which fine-tuning at eps 0 is level with the same-data linear probe.
FINETUNE_BUDGET = {"epochs": 20, "lr": 0.01}


def finetune(model, x, y, test_split, channels, size, epochs=FINETUNE_BUDGET["epochs"],
             lr=FINETUNE_BUDGET["lr"], batch_size=128, seed=0, weight_decay=5e-4, transform=None):
    """Fine-tune a copy of model, every weight, with a new zero-initialised linear head for
    the target's classes, and test it. SGD with Nesterov momentum 0.9 (models.make_optimizer),
    one-cycle learning rate peaking at lr (common.lr_at), batches in a random order from a
    generator seeded with `seed` (the global RNG is left alone), BatchNorm in train mode (it
    adapts to the target, unlike the
    frozen probe): models.sgd_epoch, the loop of adversarial training, which raises
    FloatingPointError after an epoch with a non-finite loss. Training images x [N, C, H, W]
    in [0, 1] are transformed (e.g. a SHIFTS entry) and adapted to the model in memory on its
    device (N x channels x size x size floats), where the loop gathers its batches; test_split
    ((x, y) tensors or a streamed Dataset, as for extract_features) is adapted per batch. The
    model itself is left untouched. Returns {"acc": test accuracy, "correct": bool [N_test],
    whether each test example is classified right}."""
    check_images(x, "x")
    check_labels(y, len(x), "y")
    test_labels = split_labels(test_split)
    if int(y.min()) < 0 or int(test_labels.max()) > int(y.max()):
        raise ValueError(f"y must be class labels >= 0 and test_split's labels classes of y "
                         f"(0-{int(y.max())}), got y from {int(y.min())} and test labels up "
                         f"to {int(test_labels.max())}")
    if not (epochs >= 1 and lr > 0 and batch_size >= 1):
        raise ValueError(f"need epochs >= 1, lr > 0 and batch_size >= 1, got {epochs}, {lr}, "
                         f"{batch_size}")
    device = next(model.parameters()).device
    net = copy.deepcopy(model)
    net.head = torch.nn.Linear(net.head.in_features, int(y.max()) + 1).to(device)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    opt = make_optimizer(net, lr, 0.9, weight_decay)
    x = adapt_images(transform(x) if transform else x, channels, size).to(device)
    y = y.to(device)
    steps_per_epoch = -(-len(x) // batch_size)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        try:
            sgd_epoch(net, opt, x, y, batch_size=batch_size, step0=epoch * steps_per_epoch,
                      lr_schedule=lambda step: lr_at(step, epochs * steps_per_epoch, lr),
                      generator=order)
        except FloatingPointError as e:
            raise FloatingPointError(f"fine-tuning epoch {epoch + 1}: {e}") from None
    feats = extract_features(net, test_split, channels, size, transform=transform)
    with torch.no_grad():
        logits = net.head(feats.to(device))
    correct = logits.argmax(1).cpu() == split_labels(test_split).cpu()
    return {"acc": correct.double().mean().item(), "correct": correct}


def model_digest(model):
    """SHA-256 (hex) of everything a model's outputs are a function of: the names, dtypes,
    shapes and values of its parameters and buffers (normalisation included)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_features(path, settings, n, compute):
    """Features [n, d] from the .npy at path if the record beside it (path with .json) was
    written for the same `settings` (a JSON-able dict of everything the features depend on:
    the model's digest, the data, the extraction) and it holds at least n rows (the first n
    examples, as load_split keeps a prefix); else compute() them and save both atomically,
    the record last (a run killed in between leaves no record, so nothing is trusted).
    Returns (features, was_cached)."""
    path, record = Path(path), Path(path).with_suffix(".json")
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    try:
        saved = json.loads(record.read_text())
        if isinstance(saved, dict) and saved.get("key") == key:
            feats = np.load(path, mmap_mode="r")
            if feats.ndim == 2 and len(feats) >= n:
                return torch.from_numpy(np.array(feats[:n])), True
    except (OSError, ValueError):
        pass  # no record, or an unreadable cache: recompute it
    record.unlink(missing_ok=True)
    feats = compute()
    atomic_save(path, feats.numpy())
    atomic_save(record, {"key": key, "settings": settings})
    return feats, False


def draws_spec(text):
    """`D` (every K) or `K:D` (K shots) of --draws, as (K or None, D)."""
    shots, _, draws = text.rpartition(":")
    try:
        pair = (int(shots) if shots else None, int(draws))
    except ValueError:
        pair = (0, 0)
    if pair[1] < 1 or (pair[0] is not None and pair[0] < 1):
        raise argparse.ArgumentTypeError(f"expected D or K:D with positive integers, got '{text}'")
    return pair


def draws_for(specs, shots):
    """The draws of --draws for `shots` per class: its K:D if given, else the last plain D."""
    by_shots = {k: d for k, d in specs if k is not None}
    plain = [d for k, d in specs if k is None]
    return by_shots.get(shots, plain[-1] if plain else 5)


def get_args(argv=None):
    p = ArgumentParser(description="Linear-probe transfer of a frozen model's penultimate "
                                   "features.")
    add_checkpoint_args(p)
    p.add_argument("--target", action="append", required=True,
                   help="target task dataset[:classes][+shift], e.g. fashion-mnist:5-9, "
                        f"cifar100 or fashion-mnist:5-9+invert (shifts: {', '.join(SHIFTS)}); "
                        "repeat for several")
    p.add_argument("--out", default=None, help="output folder for transfer.json, correct/ and "
                   "features/ (default: the checkpoint's folder)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="use the first N target training examples (default all)")
    p.add_argument("--test-size", type=positive_int, default=None,
                   help="use the first N target test examples (default all)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per batch for feature extraction")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="DataLoader processes reading a streamed split (default min(4, CPUs)); "
                        + STREAM_RULE)
    p.add_argument("--shots", type=positive_int, nargs="*", default=[],
                   help="also fit few-shot probes on K labelled examples per class, for each K "
                        "given (default none)")
    p.add_argument("--draws", type=draws_spec, nargs="+", default=[(None, 5)],
                   metavar="[K:]D",
                   help="seeded draws of the K-shot training set: D for every K, K:D for K "
                        "shots (e.g. 5 10:100; default 5)")
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune the whole network with a new head on each target (SGD, "
                        "--finetune-lr, --finetune-epochs) and report its test accuracy")
    p.add_argument("--finetune-epochs", type=positive_int, default=FINETUNE_BUDGET["epochs"],
                   help="fine-tuning epochs (the default: the budget chosen on held-out "
                        "settings, docs/FINETUNE.md)")
    p.add_argument("--finetune-lr", type=float, default=FINETUNE_BUDGET["lr"],
                   help="fine-tuning peak learning rate (one-cycle)")
    p.add_argument("--finetune-size", type=positive_int, default=None,
                   help="fine-tune on the first N target training images (default all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the probe's validation "
                   "split, the K-shot draws and fine-tuning")
    add_common_args(p)
    return p.parse_args(argv)


def open_target(text, name, classes, args):
    """{"train": split, "test": split} of a target (data.open_split: tensors in memory or a
    streamed Dataset). A split without an example of some class (a UserError), or (--shots) a
    training split with too few of one (check_shots' ValueError), stops the run before any
    features are extracted."""
    splits = {}
    for split, size in (("train", args.train_size), ("test", args.test_size)):
        data = splits[split] = open_split(name, split == "train", args.data_dir, classes, size,
                                          not args.no_download)
        labels = split_labels(data)
        absent = sorted(set(range(len(classes))) - set(labels.unique().tolist()))
        if absent:  # a probe could never predict it; few-shot draws could not stratify
            raise UserError(f"target {text}: {split} split has no example of class "
                            f"{', '.join(str(classes[c]) for c in absent)} "
                            f"(of {len(labels)} examples)")
        if split == "train" and args.shots:
            check_shots(labels, max(args.shots))
    return splits


def target_features(model, ckpt, text, splits, transform, args, out, clock):
    """{split: (features [N, d], labels [N]) on the model's device}: the frozen features of
    each split, cached in out/features/<stem>_<split>.npy, keyed by the model's weights
    (model_digest, not the checkpoint file's name or time) and the extraction settings."""
    device = next(model.parameters()).device
    digest, feats = model_digest(model), {}
    for split, data in splits.items():
        labels = split_labels(data)
        progress = lambda starts: clock.progress(starts, f"{text} {split} features")
        settings = {"model": digest, "arch": ckpt["arch"], "target": text, "split": split,
                    "channels": ckpt["in_channels"], "size": ckpt["image_size"],
                    "batch_size": args.batch_size}
        x, cached = cached_features(
            out / "features" / f"{target_stem(text)}_{split}.npy", settings, len(labels),
            lambda: extract_features(model, data, ckpt["in_channels"], ckpt["image_size"],
                                     args.batch_size, progress, transform, args.workers))
        feats[split] = (x.to(device), labels.to(device))
        clock.log(f"{text} {split}: features {list(x.shape)} "
                  f"{'cached' if cached else 'extracted'}"
                  f"{'' if isinstance(data, tuple) else ' (streamed)'}")
    return feats


def transfer_to(model, ckpt, text, target, args, out, clock):
    """One target: (its transfer.json entry, its per-example correctness {measure: uint8
    array}: "probe" [N_test], "fine-tuned" [N_test], "<K>-shot" [draws, N_test])."""
    name, classes, shift = target
    ds = DATASETS[name]
    adapt = describe_adaptation(ds.channels, ds.size, ckpt["in_channels"], ckpt["image_size"])
    transform = SHIFTS[shift] if shift else None
    splits = open_target(text, name, classes, args)
    feats = target_features(model, ckpt, text, splits, transform, args, out, clock)
    tf = time.time()
    probe = linear_probe(*feats["train"], *feats["test"], seed=args.seed)
    fit_seconds = time.time() - tf
    entry = dict(acc=probe["acc"], l2=probe["l2"],
                 val_acc={f"{l2:g}": a for l2, a in probe["val_acc"].items()},
                 n_train=len(feats["train"][1]), n_test=len(feats["test"][1]),
                 feature_dim=probe["weight"].shape[1], classes=classes, adapt=adapt,
                 fit_seconds=fit_seconds, grad_max=probe["grad_max"])
    correct = {"probe": probe["correct"]}
    clock.log(f"{text} probe (adapt {adapt}): acc {probe['acc']:.4f} l2 {probe['l2']:g} "
              f"grad_max {probe['grad_max']:.1e} fit {fit_seconds:.1f}s")
    if args.finetune:
        tf = time.time()
        n = min(args.finetune_size or len(feats["train"][1]), len(feats["train"][1]))
        train = splits["train"]
        x, y = (train[0][:n], train[1][:n]) if isinstance(train, tuple) else \
            load_split(name, True, args.data_dir, classes, n, not args.no_download)  # same first n
        tuned = finetune(model, x, y, splits["test"], ckpt["in_channels"], ckpt["image_size"],
                         epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=128,
                         seed=args.seed, transform=transform)
        entry["finetune"] = {"acc": tuned["acc"], "epochs": args.finetune_epochs,
                             "lr": args.finetune_lr, "n_train": n, "seconds": time.time() - tf}
        correct["fine-tuned"] = tuned["correct"]
        clock.log(f"{text} fine-tuned on {n} images: acc {tuned['acc']:.4f} "
                  f"({time.time() - tf:.1f}s)")
    if args.shots:
        few = entry["few_shot"] = {}
        for shots in args.shots:
            draws = draws_for(args.draws, shots)
            result = few_shot_probe(*feats["train"], *feats["test"], shots, draws, args.seed)
            per_draw = result.pop("correct", None)  # [draws, N_test]
            if per_draw is not None:
                correct[f"{shots}-shot"] = per_draw
            few[str(shots)] = result
            l2 = sorted(set(result["l2"]))
            clock.log(f"{text} {shots}-shot: acc {result['acc']:.4f} ± {result['acc_se']:.4f} "
                      f"over {draws} draws, l2 {l2[0] if len(l2) == 1 else result['l2']}")
    return entry, {k: torch.as_tensor(v).cpu().numpy().astype(np.uint8) for k, v in correct.items()}


def main(args):
    clock = Clock()
    targets = {text: parse_target(text) for text in args.target}  # all, before any work
    device = get_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt, device, **checkpoint_options(args))
    out = writable_dir(args.out or ckpt_folder(args))
    clock.log(f"model {args.ckpt}: {ckpt['arch']} on {ckpt['dataset']} classes "
              f"{ckpt['classes']} eps {ckpt['eps']} on {device}")
    results = {}
    for text, target in targets.items():
        results[text], correct = transfer_to(model, ckpt, text, target, args, out, clock)
        results[text]["correct"] = f"correct/{target_stem(text)}.npz"  # relative to out
        atomic_save(out / results[text]["correct"], correct)
    # Written once, when every target is done: run_all.sh takes an existing transfer.json as a
    # finished step. A killed run restarts cheaply, from the cached features.
    results["provenance"] = provenance(vars(args))
    atomic_save(out / "transfer.json", results)


if __name__ == "__main__":
    with user_errors():
        main(get_args())
