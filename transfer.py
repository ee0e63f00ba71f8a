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
    python transfer.py --ckpt runs/eps0.5/model.pt --target fashion-mnist:5-9 --shots 1 10 100

Outputs under --out (default: the checkpoint's folder): transfer.json (target name -> {acc,
l2, val_acc, n_train, n_test, feature_dim, classes, adapt, fit_seconds, grad_max, and with
--shots few_shot: K -> {acc, acc_se, draws, l2, at_edge}}, and `provenance`) and
features/<dataset>_<classes>_<split>.npy (float32 [N, d], reused by later runs while newer
than the checkpoint).
"""
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advtrain import lr_at, make_optimizer, train_epoch  # fine-tuning trains as advtrain.py does
from common import (ArgumentParser, Clock, UserError, add_checkpoint_args, add_common_args,
                    atomic_save, mean_se, nonnegative_int, parse_classes, positive_int, provenance, user_errors,
                    writable_dir)
from data import DATASETS, STREAM_RULE, adapt_images, iterate_batches, load_split, open_split, split_labels
from models import get_device, load_checkpoint


# Distribution shifts a target may carry ("fashion-mnist:5-9+invert"): a target further from
# the source than its classes alone, offline. Images [N, C, H, W] in [0, 1].
SHIFTS = {
    "invert": lambda x: 1 - x,  # contrast inversion: dark garments on a white background
    "rot90": lambda x: x.rot90(1, (2, 3)),  # a quarter turn
}


def parse_target(text):
    """'fashion-mnist:5-9' -> ('fashion-mnist', [5, 6, 7, 8, 9], None); 'mnist' -> ('mnist', all,
    None); 'fashion-mnist:5-9+invert' -> (..., 'invert'), the images shifted by SHIFTS['invert']."""
    body, plus, shift = text.partition("+")
    name, sep, classes = body.partition(":")
    if not name or (sep and not classes) or ":" in classes or (plus and shift not in SHIFTS):
        raise UserError(f"target must look like dataset[:classes][+shift] (e.g. fashion-mnist:5-9+invert; "
                        f"shifts: {', '.join(SHIFTS)}), got {text!r}")
    if name not in DATASETS:
        raise UserError(f"unknown target dataset {name!r} in {text!r}; choose from {', '.join(DATASETS)}")
    return name, parse_classes(classes, DATASETS[name].num_classes), shift or None


def describe_adaptation(channels, size, model_channels, model_size):
    """How target images are changed to fit the model, e.g. '1->3 channels, 28->32 px' or 'none'."""
    steps = []
    if channels != model_channels:
        steps.append(f"{channels}->{model_channels} channels")
    if size != model_size:
        steps.append(f"{size}->{model_size} px")
    return ", ".join(steps) or "none"


def extract_features(model, split, channels, size, batch_size=128, progress=None, transform=None, workers=None):
    """Frozen penultimate features of a split -> float32 [N, d] on the CPU.

    split: images [N, C, H, W] in [0, 1] (a tensor, or (x, y) tensors) held in memory, or a
    Dataset of (image, label) streamed from disk (data.open_split chooses, data.STREAM_RULE).
    Eval mode (BatchNorm uses its running statistics and never updates them) and no_grad;
    each batch is transformed (transform, e.g. a SHIFTS entry) and adapted to the model's input
    (channels, size) on the fly, so the adapted copy of the whole set never sits in memory.
    progress: optional wrapper of the batch indices (e.g. common.Clock().progress) for rate
    and time-left lines.
    """
    device = next(model.parameters()).device
    if torch.is_tensor(split):
        split = (split, torch.zeros(len(split), dtype=torch.long))
    n_batches = -(-len(split[0] if isinstance(split, tuple) else split) // batch_size)
    was_training = model.training
    model.eval()
    feats = []
    batches = iterate_batches(split, batch_size, channels, size, device, workers, transform)
    with torch.no_grad():
        for _, (xb, _) in zip(progress(range(n_batches)) if progress else range(n_batches), batches):
            feats.append(model.features(xb).float().cpu())
    model.train(was_training)
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
        weight, bias = init["weight"].clone().requires_grad_(), init["bias"].clone().requires_grad_()
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        logits = z @ weight.T + bias  # [N, k]
        loss = F.cross_entropy(logits, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(objective)
    objective()  # gradient at the final weights, to report convergence
    grad_max = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
    return dict(weight=weight.detach(), bias=bias.detach(), mean=mean, std=std,
                grad_max=grad_max, iterations=opt.state[weight]["n_iter"])


def probe_accuracy(probe, x, y):
    """Accuracy of a fitted probe (fit_logistic) on features x [N, d], labels y [N]."""
    logits = ((x - probe["mean"]) / probe["std"]) @ probe["weight"].T + probe["bias"]
    return (logits.argmax(1) == y).double().mean().item()


def linear_probe(train_feats, train_labels, test_feats, test_labels,
                 l2_grid=(1e-4, 1e-3, 1e-2, 1e-1), val_fraction=0.2, seed=0,
                 max_iter=1000, tol=1e-4, select_tol=1e-3, dtype=torch.float32):
    """Multinomial logistic regression probe (fit_logistic); returns test accuracy and the fit.

    Features [N, d] are standardised with the mean and std of the training features only.
    Fitted in `dtype` (float32 is twice as fast as float64 and stalls near max |gradient|
    1e-5, so ask for float64 to go tighter). The penalty is the l2_grid value with the best
    accuracy on a random `val_fraction` of the training set (ties go to the larger penalty),
    fitted to max |gradient| <= select_tol (a choice among penalties needs less precision than
    the reported probe: half the time), then the probe is refitted on the whole training set
    to `tol`. Deterministic for a seed. Returns a
    dict: acc, l2, val_acc {l2: accuracy}, and fit_logistic's weight, bias, mean, std,
    grad_max (largest |gradient| of the objective at the returned weights), iterations.
    """
    train_feats, test_feats = train_feats.to(dtype), test_feats.to(dtype)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    val_acc, val_probes = {}, {}
    if len(l2_grid) > 1:
        order = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(seed))
        n_val = min(max(1, round(val_fraction * len(order))), len(order) - 1)
        val, fit_part = order[:n_val].to(train_feats.device), order[n_val:].to(train_feats.device)
        previous = None
        for l2 in sorted(l2_grid, reverse=True):  # strong to weak penalty, each warm-started
            previous = val_probes[l2] = fit_logistic(train_feats[fit_part], train_labels[fit_part], l2,
                                                     num_classes, previous, max_iter, select_tol)
            val_acc[l2] = probe_accuracy(previous, train_feats[val], train_labels[val])
    best_l2 = max(l2_grid, key=lambda l2: (val_acc.get(l2, 0.0), l2))
    probe = fit_logistic(train_feats, train_labels, best_l2, num_classes, val_probes.get(best_l2), max_iter, tol)
    return dict(acc=probe_accuracy(probe, test_feats, test_labels), l2=best_l2, val_acc=val_acc, **probe)


FEW_SHOT_L2_GRID = tuple(10.0 ** e for e in range(-3, 4))  # 1e-3 .. 1e3: wide, few examples


def check_shots(labels, shots):
    """Per-class counts of labels [N] (classes 0..k-1); UserError when a class has fewer than
    `shots` examples."""
    counts = torch.bincount(labels.cpu(), minlength=int(labels.max()) + 1)
    if (counts < shots).any():
        short = int(counts.argmin())
        raise UserError(f"{shots} shots per class asked for, but class {short} has "
                        f"{int(counts[short])} training examples")
    return counts


def k_shot_indices(labels, shots, generator):
    """`shots` distinct random examples of every class of labels [N] (classes 0..k-1), class by
    class: indices [k * shots]; raises UserError when a class has fewer."""
    counts = check_shots(labels, shots)
    picks = []
    for c in range(len(counts)):
        members = (labels.cpu() == c).nonzero()[:, 0]
        picks.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picks).to(labels.device)


def few_shot_probe(train_feats, train_labels, test_feats, test_labels, shots, draws=5, seed=0,
                   l2_grid=FEW_SHOT_L2_GRID, folds=5, dtype=torch.float32):
    """Linear probe fitted on `shots` labelled examples per class, over `draws` seeded draws,
    evaluated on the whole test set.

    The penalty of each draw is chosen by stratified cross-validation within its K-shot set
    (min(shots, folds) folds; fold f holds out the f-th, f + folds-th, ... example of every
    class), never on test data: the grid value with the most correct held-out predictions,
    ties to the larger penalty. With one shot per class no held-out example can be predicted
    (its class would be absent), so the largest penalty is used. Returns {acc, acc_se (over
    draws), draws, l2 (the chosen penalty of each draw), at_edge (draws whose penalty is the
    grid's smallest or largest)}.
    """
    train_feats, test_feats = train_feats.to(dtype), test_feats.to(dtype)
    num_classes = int(train_labels.max()) + 1
    accs, chosen = [], []
    for draw in range(draws):
        g = torch.Generator().manual_seed(seed * 1000003 + shots * 1009 + draw)
        idx = k_shot_indices(train_labels, shots, g)
        x, y = train_feats[idx], train_labels[idx]
        position = torch.arange(shots, device=y.device).repeat(num_classes)  # index within its class
        best = max(l2_grid)
        if shots > 1:
            n_folds, correct = min(shots, folds), {}
            for f in range(n_folds):
                held = position % n_folds == f
                previous = None
                for l2 in sorted(l2_grid, reverse=True):  # strong to weak, each warm-started
                    previous = fit_logistic(x[~held], y[~held], l2, num_classes, previous)
                    correct[l2] = correct.get(l2, 0) + probe_accuracy(previous, x[held], y[held]) * int(held.sum())
            best = max(l2_grid, key=lambda l2: (round(correct[l2]), l2))
        accs.append(probe_accuracy(fit_logistic(x, y, best, num_classes), test_feats, test_labels))
        chosen.append(best)
    acc, acc_se = mean_se(accs)
    edges = (min(l2_grid), max(l2_grid))
    return {"acc": acc, "acc_se": acc_se, "draws": draws, "l2": chosen,
            "at_edge": sum(l2 in edges for l2 in chosen) if shots > 1 else None}


def finetune(model, x, y, test_split, channels, size, epochs=2, lr=0.01, batch_size=128, seed=0,
             weight_decay=5e-4, transform=None):
    """Test accuracy after fine-tuning a copy of model, every weight, with a new zero-initialised
    linear head for the target's classes: SGD with Nesterov momentum 0.9, one-cycle learning
    rate peaking at lr, BatchNorm in train mode (it adapts to the target, unlike the frozen
    probe). Training images x [N, C, H, W] in [0, 1] are transformed (e.g. a SHIFTS entry) and
    adapted to the model in memory (N x channels x size x size floats); test_split ((x, y)
    tensors or a streamed Dataset, as for extract_features) is adapted per batch. The model
    itself is left untouched."""
    device = next(model.parameters()).device
    net = copy.deepcopy(model)
    net.head = torch.nn.Linear(net.head.in_features, int(y.max()) + 1).to(device)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    opt = make_optimizer(net, lr, 0.9, weight_decay)
    x = adapt_images(transform(x) if transform else x, channels, size)
    steps = epochs * -(-len(x) // batch_size)
    torch.manual_seed(seed)
    for epoch in range(epochs):
        train_epoch(net, opt, x, y, batch_size=batch_size, eps=0.0, steps=0, step0=epoch * (steps // epochs),
                    lr_schedule=lambda step: lr_at(step, steps, lr))
    feats = extract_features(net, test_split, channels, size, transform=transform)
    with torch.no_grad():
        logits = net.head(feats.to(device))
    return (logits.argmax(1).cpu() == split_labels(test_split).cpu()).double().mean().item()


def cached_features(path, min_mtime, n, compute):
    """Features [n, d] from the .npy at path if it holds at least n rows (the first n
    examples, as load_split keeps a prefix) and is newer than min_mtime (the checkpoint);
    else compute() them and save atomically. Returns (features, was_cached)."""
    path = Path(path)
    if path.is_file() and path.stat().st_mtime >= min_mtime:
        try:
            feats = np.load(path, mmap_mode="r")
            if feats.ndim == 2 and len(feats) >= n:
                return torch.from_numpy(np.array(feats[:n])), True
        except (OSError, ValueError):
            pass  # unreadable cache: recompute it
    feats = compute()
    atomic_save(path, feats.numpy())
    return feats, False


def get_args(argv=None):
    p = ArgumentParser(description="Linear-probe transfer of a frozen model's penultimate features.")
    add_checkpoint_args(p)
    p.add_argument("--target", action="append", required=True,
                   help="target task dataset[:classes], e.g. fashion-mnist:5-9 or cifar100; repeat for several")
    p.add_argument("--out", default=None, help="output folder for transfer.json and features/ (default: the checkpoint's folder)")
    p.add_argument("--train-size", type=positive_int, default=None, help="use the first N target training examples (default all)")
    p.add_argument("--test-size", type=positive_int, default=None, help="use the first N target test examples (default all)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per batch for feature extraction (on CPU, 128 measured 2.4x faster than 500)")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="DataLoader processes reading a streamed split (default min(4, CPUs)); " + STREAM_RULE)
    p.add_argument("--shots", type=positive_int, nargs="*", default=[],
                   help="also fit few-shot probes on K labelled examples per class, for each K given (default none)")
    p.add_argument("--draws", type=positive_int, default=5, help="seeded draws of the K-shot training set per K")
    p.add_argument("--finetune", action="store_true", help="also fine-tune the whole network with a new head on each "
                   "target (SGD, --finetune-lr, --finetune-epochs) and report its test accuracy")
    p.add_argument("--finetune-epochs", type=positive_int, default=2, help="fine-tuning epochs")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning peak learning rate (one-cycle)")
    p.add_argument("--finetune-size", type=positive_int, default=None,
                   help="fine-tune on the first N target training images (default all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the probe's validation split, the K-shot draws "
                   "and fine-tuning")
    add_common_args(p)
    return p.parse_args(argv)


def main(args):
    clock = Clock()
    targets = {text: parse_target(text) for text in args.target}  # check them all before any work
    device = get_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt, device, arch=args.arch, unsafe=args.unsafe_load)
    out = writable_dir(args.out or Path(args.ckpt).parent)
    ckpt_mtime = Path(args.ckpt).stat().st_mtime
    clock.log(f"model {args.ckpt}: {ckpt['arch']} on {ckpt['dataset']} classes {ckpt['classes']} eps {ckpt['eps']} "
              f"on {device}")

    results = {}
    for text, (name, classes, shift) in targets.items():
        ds = DATASETS[name]
        adapt = describe_adaptation(ds.channels, ds.size, ckpt["in_channels"], ckpt["image_size"])
        cache_stem = text.replace(":", "_").replace(",", "_")  # fashion-mnist:5-9+invert -> fashion-mnist_5-9+invert
        transform = SHIFTS[shift] if shift else None
        splits, split_feats = {}, {}  # split -> data (in memory or streamed); (features [N, d], labels [N])
        for split, n_max in (("train", args.train_size), ("test", args.test_size)):
            data = splits[split] = open_split(name, split == "train", args.data_dir, classes, n_max,
                                              not args.no_download)
            labels = split_labels(data)
            absent = sorted(set(range(len(classes))) - set(labels.unique().tolist()))
            if absent:  # a probe could never predict it; few-shot draws could not stratify
                raise UserError(f"target {text}: {split} split has no example of class "
                                f"{', '.join(str(classes[c]) for c in absent)} (of {len(labels)} examples)")
            if split == "train" and args.shots:  # before any features are extracted
                check_shots(labels, max(args.shots))
            progress = lambda starts: clock.progress(starts, f"{text} {split} features")
            feats, cached = cached_features(
                out / "features" / f"{cache_stem}_{split}.npy", ckpt_mtime, len(labels),
                lambda: extract_features(model, data, ckpt["in_channels"], ckpt["image_size"], args.batch_size,
                                         progress, transform, args.workers))
            split_feats[split] = (feats.to(device), labels.to(device))
            clock.log(f"{text} {split}: features {list(feats.shape)} {'cached' if cached else 'extracted'}"
                      f"{'' if isinstance(data, tuple) else ' (streamed)'}, adapt {adapt}")

        tf = time.time()
        probe = linear_probe(*split_feats["train"], *split_feats["test"], seed=args.seed)
        fit_seconds = time.time() - tf
        results[text] = dict(acc=probe["acc"], l2=probe["l2"],
                             val_acc={f"{l2:g}": a for l2, a in probe["val_acc"].items()},
                             n_train=len(split_feats["train"][1]), n_test=len(split_feats["test"][1]),
                             feature_dim=probe["weight"].shape[1], classes=classes, adapt=adapt,
                             fit_seconds=fit_seconds, grad_max=probe["grad_max"])
        clock.log(f"{text} probe: acc {probe['acc']:.4f} l2 {probe['l2']:g} grad_max {probe['grad_max']:.1e} "
                  f"fit {fit_seconds:.1f}s")
        if args.finetune:
            tf = time.time()
            n = min(args.finetune_size or len(split_feats["train"][1]), len(split_feats["train"][1]))
            x, y = (splits["train"][0][:n], splits["train"][1][:n]) if isinstance(splits["train"], tuple) else \
                load_split(name, True, args.data_dir, classes, n, not args.no_download)  # the same first n
            acc = finetune(model, x, y, splits["test"], ckpt["in_channels"], ckpt["image_size"],
                           epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=128, seed=args.seed,
                           transform=transform)
            results[text]["finetune"] = {"acc": acc, "epochs": args.finetune_epochs, "lr": args.finetune_lr,
                                         "n_train": n, "seconds": time.time() - tf}
            clock.log(f"{text} fine-tuned on {n} images: acc {acc:.4f} ({time.time() - tf:.1f}s)")
        if args.shots:
            few = results[text]["few_shot"] = {}
            for shots in args.shots:
                few[str(shots)] = few_shot_probe(*split_feats["train"], *split_feats["test"], shots, args.draws, args.seed)
                clock.log(f"{text} {shots}-shot: acc {few[str(shots)]['acc']:.4f} ± {few[str(shots)]['acc_se']:.4f} "
                          f"over {args.draws} draws, l2 {few[str(shots)]['l2']}")
    # Written once, when every target is done: run_all.sh takes an existing transfer.json as a
    # finished step. A killed run restarts cheaply, from the cached features.
    results["provenance"] = provenance(vars(args))
    atomic_save(out / "transfer.json", results)


if __name__ == "__main__":
    with user_errors():
        main(get_args())
