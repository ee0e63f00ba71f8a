"""Adversarial training with PGD (eps = 0 is standard training), its attacks and evaluation.

    # standard training (eps = 0) and L2 adversarial training on Fashion-MNIST tops
    python advtrain.py --dataset fashion-mnist --classes 0-4 --eps 0   --epochs 4 --out runs/eps0
    python advtrain.py --dataset fashion-mnist --classes 0-4 --eps 0.5 --steps 3 --out runs/eps0.5
    # Linf on CIFAR-10 with a ResNet-18 (GPU), attacked at L2 0.5 and Linf 8/255 at the end
    python advtrain.py --dataset cifar10 --arch resnet18 --norm linf --eps 8/255 --steps 7 \
        --epochs 30 --augment --lr 0.1 --eval-eps l2:0.5 linf:8/255 --out runs/cifar_linf8
    # the same on 2 GPUs of one machine (--batch-size is the global batch)
    torchrun --standalone --nproc_per_node 2 advtrain.py --dataset cifar10 --arch resnet18 ...
    # a published robust ImageNet model (robustness/RMT file, pickled with dill) attacked on
    # DATA_DIR/val; the file records no training radius, --trained-norm/--trained-eps give it
    python advtrain.py --eval-only --ckpt resnet50_l2_eps3.ckpt --dataset imagenet \
        --data-dir DATA_DIR --trained-norm l2 --trained-eps 3 --test-size 1000 \
        --eval-eps l2:0.5 linf:8/255 --unsafe-load --out runs/in_l2_3

Outputs under --out: model.pt (checkpoint, rewritten every epoch;
build_model(**ckpt["model_args"]) rebuilds the network), log.jsonl (one line per epoch) and
metrics.json (clean accuracy and robust accuracy at every evaluation radius, each record
naming its norm, radius and attack). Inputs are images in [0, 1]; the dataset's
normalisation is the first layer of the model, so eps is in pixel units.

Functions to copy: each needs the names after its colon, from this file, the shared modules
after its semicolon, beside it, and this file's imports of other libraries.
    pgd_attack: NORMS, check_attack, project; common.py, models.py
    apgd_attack: NORMS, _apgd_checkpoints, apgd_single, check_attack, dlr_targeted_loss,
        project; common.py, models.py
    accuracy: EVAL_ATTACKS, NORMS, _apgd_checkpoints, apgd_attack, apgd_single, check_attack,
        dlr_targeted_loss, pgd_attack, project; common.py, models.py
    train_epoch: NORMS, all_reduce_sum, broadcast_buffers, check_attack, pgd_attack, project;
        common.py, data.py, models.py
"""
import argparse
import gc
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoints import load_checkpoint, new_checkpoint, read_checkpoint
from common import (CKPT_HELP, UNSAFE_LOAD_HELP, ArgumentParser, Clock, UserError,
                    add_classifier_args, add_common_args, atomic_save, check_number,
                    ckpt_folder, format_eps, lr_at, nonnegative_int, parse_classes, parse_eps,
                    positive_int, provenance, user_errors, writable_dir)
from data import DATASETS, load_split, random_crop_flip
from models import (ARCHS, build_model, check_images, check_labels, cudnn_autotune, eval_mode,
                    get_device, l2_step, make_optimizer, per_example_norm, sgd_epoch)

NORMS = ("l2", "linf")


# ----------------------------------------------------------------------------- attacks

def project(x, delta, norm, eps):
    """The point x + delta moved into the threat model around x: delta onto the eps-ball of
    its example (linf: clipped to [-eps, eps]; l2: scaled down to norm eps), then the image
    clipped to [0, 1], which only shrinks the perturbation. x, delta [N, C, H, W] ->
    x_adv [N, C, H, W]. The one projection of every attack here."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / per_example_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


def check_attack(x, y, norm, eps, steps, step_size=None):
    """The checks of every attack, before any work: ValueError naming the bad value unless x
    is images [N, C, H, W] in [0, 1], y their N integer labels, norm 'l2' or 'linf', eps >= 0,
    steps an integer >= 0 and >= 1 when eps > 0 (a zero-step attack would return the clean
    images as if they were adversarial), step_size None or >= 0."""
    if norm not in NORMS:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    check_images(x)
    check_labels(y, len(x))
    check_number("eps", eps, at_least=0)
    check_number("steps", steps, at_least=0, integer=True)
    if eps > 0 and steps == 0:
        raise ValueError(f"eps {eps:g} with steps 0 attacks nothing: give steps >= 1 (eps 0 "
                         f"for no attack)")
    if step_size is not None:
        check_number("step_size", step_size, at_least=0)


def pgd_attack(model, x, y, norm, eps, steps, step_size=None, random_start=True, check=True):
    """Projected gradient ascent on the cross-entropy within the eps-ball around x.

    x [N, C, H, W] in [0, 1], y [N]; norm 'linf' (sign steps) or 'l2' (normalised steps,
    models.l2_step); steps >= 1 when eps > 0 (eps 0 returns x: no attack); step_size default
    2.5 eps / steps; random start uniform in the ball (l2: uniform direction, radius
    eps * U). Runs the model in eval mode (BatchNorm running statistics) and leaves its mode
    as found; gradients are taken with respect to the input only, so no parameter gradient is
    computed or accumulated. Returns x_adv, detached, with ||x_adv - x|| <= eps and x_adv in
    [0, 1]. Bad input is a ValueError (check_attack); the check of x's range reads one number
    from the device, so a caller that has checked its data (train_epoch, once per epoch)
    passes check=False. Every random draw is a *_like of x: on x's device and dtype.
    """
    if check:
        check_attack(x, y, norm, eps, steps, step_size)
    if eps == 0:
        return x.detach()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    if not random_start:
        delta = torch.zeros_like(x)
    elif norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps
    else:
        delta = torch.randn_like(x)
        radius = eps * torch.rand_like(x.new_empty(len(x), *[1] * (x.dim() - 1)))  # [N, 1, 1, 1]
        delta *= radius / per_example_norm(delta)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    with eval_mode(model):
        for _ in range(steps):
            with torch.enable_grad():  # also works when called under torch.no_grad()
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if norm == "linf":
                    delta += step_size * grad.sign()
                else:
                    delta += l2_step(grad, step_size)
                delta.copy_(project(x, delta, norm, eps) - x)
    return (x + delta).detach()


def dlr_targeted_loss(logits, y, target):
    """Targeted difference-of-logits-ratio loss of Croce and Hein 2020, per example [N]:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), pi the logits sorted in decreasing order.
    Invariant to shifts and scales of the logits; logits [N, k] with k >= 4 classes, else a
    ValueError."""
    if logits.dim() != 2 or logits.shape[1] < 4:
        raise ValueError(f"the DLR loss needs logits [N, k] of k >= 4 classes, got "
                         f"{list(logits.shape)}")
    s = logits.sort(1, descending=True).values
    z_y, z_t = logits.gather(1, y[:, None])[:, 0], logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12)


def _apgd_checkpoints(steps):
    """The iterations at which APGD may halve its step: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), times the number of steps."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(q * steps - 1e-9) for q in p[1:]}  # 0.22 * 100 is 22.000000000000004


def apgd_single(model, x, y, norm, eps, steps=100, loss_fn=None, rho=0.75, momentum=0.75,
                target=None):
    """One run of APGD (Croce and Hein 2020, Algorithm 1) maximising loss_fn(logits, y) [N]
    (default cross-entropy) within the eps-ball around x [N, C, H, W] and [0, 1]; with
    `target` [N] (classes), loss_fn(logits, y, target) instead (default dlr_targeted_loss).

    Step size 2 eps, halved for an example at a checkpoint when fewer than rho of its steps
    since the last checkpoint raised its loss, or when its step and best loss did not change
    (then it restarts from its best point); momentum 0.75 between successive iterates. Sign
    steps for linf, normalised gradient steps for l2; random start in the ball; input-only
    gradients, model in eval mode (its mode is given back). Returns, per example, the first
    misclassified iterate found, else the iterate of highest loss (detached). An example
    leaves the working batch as soon as it is misclassified (its point is final), so a run
    costs what its unbroken examples cost. Bad input is a ValueError (check_attack).
    """
    check_attack(x, y, norm, eps, steps)
    if target is None:
        loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, reduction="none"))
    else:
        loss_fn = loss_fn or dlr_targeted_loss
    view = (-1,) + (1,) * (x.dim() - 1)
    x = x.detach()
    out = x.clone()  # every row is written once: when it is fooled, or at the end
    # the working batch: rows of x still correctly classified, and their inputs, labels, targets
    rows = torch.arange(len(x), device=x.device)
    xs, ys, ts = x, y, target

    def loss_and_grad(x_adv):
        with torch.enable_grad():
            x_adv = x_adv.detach().requires_grad_(True)
            logits = model(x_adv)
            loss = loss_fn(logits, ys) if ts is None else loss_fn(logits, ys, ts)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), grad.detach(), logits.detach().argmax(1) != ys

    def ascent(grad):
        return grad.sign() if norm == "linf" else l2_step(grad, 1.0)

    def onto_ball(point):  # a point of the working batch moved into the threat model around x
        return project(xs, point - xs, norm, eps)

    with eval_mode(model):
        # the start is drawn for the whole batch at once, as if no example left: a row's
        # random numbers do not depend on which other rows are fooled
        start = (torch.rand_like(x) * 2 - 1) if norm == "linf" else torch.randn_like(x)
        size = start.abs().flatten(1).amax(1) if norm == "linf" else start.flatten(1).norm(dim=1)
        x_cur = onto_ball(x + start * eps / size.view(view))
        loss_cur, grad, fooled = loss_and_grad(x_cur)
        x_best, loss_best, grad_best = x_cur, loss_cur, grad
        x_prev, eta = x_cur, torch.full((len(x),), 2.0 * eps, device=x.device)
        checkpoints, last = _apgd_checkpoints(steps), 0
        increases = torch.zeros(len(x), device=x.device)
        eta_last, loss_best_last = eta.clone(), loss_best.clone()
        for k in range(-1, steps):
            if k >= 0:
                z = onto_ball(x_cur + eta.view(view) * ascent(grad))
                a = momentum if k > 0 else 1.0
                x_new = onto_ball(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
                loss_new, grad_new, fooled = loss_and_grad(x_new)
            else:  # the random start's check: examples it already fools leave at once
                x_new, loss_new, grad_new = x_cur, loss_cur, grad
            if fooled.any():
                # Croce and Hein 2020 keep only the first misclassified point of an example,
                # and every other quantity of APGD (loss, step size, momentum, checkpoint
                # test) is per example: dropping the fooled rows changes nothing for the
                # others, it only stops spending forward and backward passes on them
                out[rows[fooled]] = x_new[fooled]
                keep = ~fooled
                rows, xs, ys = rows[keep], xs[keep], ys[keep]
                ts = None if ts is None else ts[keep]
                x_new, loss_new, grad_new = x_new[keep], loss_new[keep], grad_new[keep]
                x_cur, x_prev, grad = x_cur[keep], x_prev[keep], grad[keep]
                loss_cur = loss_cur[keep]
                x_best, loss_best, grad_best = x_best[keep], loss_best[keep], grad_best[keep]
                eta, eta_last, increases = eta[keep], eta_last[keep], increases[keep]
                loss_best_last = loss_best_last[keep]
                if len(rows) == 0:
                    break
            if k < 0:
                continue
            increases += (loss_new > loss_cur).float()
            better = loss_new > loss_best
            x_best = torch.where(better.view(view), x_new, x_best)
            grad_best = torch.where(better.view(view), grad_new, grad_best)
            loss_best = torch.where(better, loss_new, loss_best)
            x_prev, x_cur, loss_cur, grad = x_cur, x_new, loss_new, grad_new
            if k + 1 in checkpoints:
                stalled = (eta == eta_last) & (loss_best <= loss_best_last)
                halve = (increases < rho * (k + 1 - last)) | stalled
                eta_last, loss_best_last = eta.clone(), loss_best.clone()
                eta = torch.where(halve, eta / 2, eta)
                x_cur = torch.where(halve.view(view), x_best, x_cur)
                grad = torch.where(halve.view(view), grad_best, grad)
                increases.zero_()
                last = k + 1
    out[rows] = x_best  # the unbroken examples: their point of highest loss
    return out.detach()


def apgd_attack(model, x, y, norm, eps, steps=100, restarts=1, targets=3):
    """APGD evaluation (Croce and Hein 2020): APGD on the cross-entropy, then targeted APGD on
    the DLR loss towards each of the `targets` most likely other classes, each repeated over
    `restarts` random starts; an example falls to the first run that misclassifies it, so the
    result is each example's worst case over the runs. Calling convention of pgd_attack: x
    [N, C, H, W] in [0, 1], y [N]; returns x_adv within the eps-ball and [0, 1] (for examples
    no run fooled, the last run's point of highest loss). The model runs in eval mode; its
    mode is given back. Bad input is a ValueError (check_attack), and so is a targeted run
    the model cannot have: targets > 0 needs >= 4 classes (the DLR loss) and at most k - 1
    targets; targets=0 is APGD-CE alone.
    """
    check_attack(x, y, norm, eps, steps)
    check_number("restarts", restarts, at_least=1, integer=True)
    check_number("targets", targets, at_least=0, integer=True)
    x, x_adv = x.detach(), x.detach().clone()
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        k = logits.shape[1]
        if targets and (k < 4 or targets > k - 1):
            raise ValueError(f"targets {targets}: targeted APGD-DLR needs >= 4 classes and at "
                             f"most k - 1 targets, the model has k = {k} classes (targets=0: "
                             f"APGD-CE alone)")
        robust = logits.argmax(1) == y  # a clean mistake needs no attack
        others = logits.clone()
        others[torch.arange(len(y)), y] = -float("inf")
        ranked = others.argsort(1, descending=True)  # the other classes, most likely first
        runs = [None] + list(range(targets))
        for _ in range(restarts):
            for t in runs:
                idx = robust.nonzero()[:, 0]
                if len(idx) == 0:
                    break
                target = None if t is None else ranked[idx, t]  # None: APGD-CE
                xa = apgd_single(model, x[idx], y[idx], norm, eps, steps, target=target)
                with torch.no_grad():
                    fooled = model(xa).argmax(1) != y[idx]
                x_adv[idx] = xa
                robust[idx[fooled]] = False
    return x_adv


EVAL_ATTACKS = ("pgd", "apgd", "apgd-ce")


def accuracy(model, x, y, batch_size=500, norm="l2", eps=0.0, steps=None, restarts=1,
             step_size=None, attack="pgd"):
    """Accuracy on (x, y), clean (eps = 0) or under attack: "pgd", "apgd" (APGD-CE and three
    targeted APGD-DLR runs, the worst case per example; >= 4 classes) or "apgd-ce" (APGD on
    the cross-entropy alone); an example counts as correct only if it survives every restart.
    eps > 0 needs `steps` (the attack's steps, >= 1; no default: a robust accuracy without
    attack steps would be the clean accuracy under another name); it is ignored at eps 0.
    Batched; x may live on any device, batches move to the model's. Eval mode; the model's
    mode is given back. Bad input is a ValueError naming the value."""
    check_number("eps", eps, at_least=0)
    if eps > 0 and steps is None:
        raise ValueError(f"accuracy at eps {eps:g} needs steps, the attack's steps (e.g. 20): "
                         f"there is no default (eps 0 is the clean accuracy)")
    check_attack(x, y, norm, eps, 0 if steps is None else steps, step_size)
    check_number("batch_size", batch_size, at_least=1, integer=True)
    check_number("restarts", restarts, at_least=1, integer=True)
    if attack not in EVAL_ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(EVAL_ATTACKS)}, got {attack!r}")
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():  # a label past the classes would count as wrong
        classes = model(x[:1].to(device)).shape[1]
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"y must be class labels 0-{classes - 1} of the model, got labels from "
                         f"{int(y.min())} to {int(y.max())}")
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            if eps == 0:
                with torch.no_grad():
                    correct += (model(xb).argmax(1) == yb).sum().item()
                continue
            if attack.startswith("apgd"):  # restarts inside: fooled examples are not attacked again
                targets = 0 if attack == "apgd-ce" else 3
                xa = apgd_attack(model, xb, yb, norm, eps, steps, restarts, targets=targets)
                with torch.no_grad():
                    correct += (model(xa).argmax(1) == yb).sum().item()
                continue
            ok = torch.ones_like(yb, dtype=torch.bool)
            for _ in range(restarts):
                xa = pgd_attack(model, xb, yb, norm, eps, steps, step_size)
                with torch.no_grad():
                    ok &= model(xa).argmax(1) == yb
            correct += ok.sum().item()
    return correct / len(x)


# ----------------------------------------------------------------------------- training

def train_epoch(model, opt, x, y, *, batch_size=128, norm="l2", eps=0.0, steps=3, step_size=None,
                lr_schedule=None, step0=0, augment=False, amp=False, channels_last=False,
                shard=None):
    """One epoch of (adversarial) training over in-memory tensors x [N, C, H, W], y [N]
    (models.sgd_epoch's loop: SGD steps in a random order from the global CPU generator,
    nothing read from the device before the epoch's end, a non-finite loss a
    FloatingPointError after it).

    Each batch is replaced by its PGD adversarial examples (norm, eps, steps, step_size;
    eps = 0 is standard training), optionally after a random crop and flip (augment).
    lr_schedule: global step -> learning rate, applied before every step (None leaves the
    optimizer's rate); step0 is the global step of the first batch. amp: bf16 autocast of the
    attack and the training step (advtrain.py's choice on CUDA); channels_last: the batch's
    memory layout. shard: data-parallel training (model wrapped in DistributedDataParallel,
    every process drawing the same order, each its own attack starts and augmentation): a
    function from the indices of a global batch of
    batch_size to (this process's share of them, the weight of its mean loss), e.g.
    ddp_shard; process 0's BatchNorm statistics and the totals are then shared at the end of
    the epoch. x and y are checked once (check_attack; it reads one number from the device).
    The model's mode is given back.
    Returns (mean loss, train accuracy on the examples it trained on, next global step).
    """
    check_attack(x, y, norm, eps, steps, step_size)
    device = next(model.parameters()).device
    attacked = getattr(model, "module", model)  # DDP's network: input gradients need no sync
    rank = dist.get_rank() if shard is not None and dist.is_initialized() else 0
    generator = None
    if rank > 0:
        # DESIGN.md, Scale: every process draws the same batch order (from a copy of the state
        # they all seeded alike) but its own attack starts, crops and flips, else example j of
        # every share would get the same ones. Process 0 keeps the shared stream (a run of one
        # process is unchanged); process r > 0 reseeds from it, plus r.
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        torch.manual_seed(int(torch.randint(2 ** 62, (1,))) + rank)

    def adversarial(xb, yb):  # a batch on the device -> what the step trains on
        if augment:
            xb = random_crop_flip(xb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return pgd_attack(attacked, xb, yb, norm, eps, steps, step_size, check=False)

    def reduce(totals):  # every process leaves with the sums over all processes
        return all_reduce_sum(totals, device)

    result = sgd_epoch(model, opt, x, y, batch_size=batch_size, lr_schedule=lr_schedule,
                       step0=step0, prepare=adversarial, amp=amp, shard=shard,
                       reduce=reduce if shard is not None else None, generator=generator)
    if shard is not None:
        # every process leaves with process 0's BatchNorm statistics, the ones the checkpoint
        # saves: the guard, the next epoch's attacks and evaluation then agree across processes
        broadcast_buffers(attacked)
    return result


def ddp_shard(rank, world_size):
    """train_epoch's shard for process `rank` of `world_size`: every world_size-th index of a
    global batch from rank on, and the weight len(share) * world_size / len(batch) of its mean
    loss, so that DDP's average of the processes' gradients is the gradient of the global
    batch's mean loss (also for a last batch that does not split evenly). A batch of fewer
    examples than processes leaves some an empty share: they get the batch's first example
    with weight 0 instead (sgd_epoch counts it nowhere), so that every process still takes
    part in DDP's gradient all-reduce (an empty batch's mean loss is NaN, and NaN * 0 is NaN)."""
    def shard(idx):
        share = idx[rank::world_size]
        if len(share) == 0:
            return idx[:1], 0.0
        return share, len(share) * world_size / len(idx)
    return shard


def evaluate(model, x, y, radii, *, batch_size=500, steps=20, restarts=1, attack="pgd"):
    """Clean accuracy and robust accuracy under `attack` ("pgd" or "apgd") at every (norm, eps)
    of radii.

    Returns {"clean_acc": float, "robust_acc": [{"norm", "eps", "attack", "steps", "restarts",
    "acc"}, ...]}: each robust number names its norm, radius and attack, so radii of different
    norms cannot be mistaken for each other. Radii are attacked in sorted (norm, eps) order.
    An empty x (a process's share of a test set smaller than the number of processes) scores
    0.0 everywhere, which weighs nothing in reduce_metrics.
    """
    def score(*args, **kwargs):
        # cuDNN autotuning off: APGD attacks subsets of every size (models.cudnn_autotune)
        with cudnn_autotune(False):
            return accuracy(model, x, y, batch_size, *args, **kwargs) if len(x) else 0.0

    robust = []
    for norm, eps in sorted(set(radii)):
        if eps > 0:
            acc = score(norm, eps, steps, restarts, attack=attack)
            robust.append({"norm": norm, "eps": eps, "attack": attack, "steps": steps,
                           "restarts": restarts, "acc": acc})
    return {"clean_acc": score(), "robust_acc": robust}


def init_distributed(device):
    """Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set), join the process group: NCCL on CUDA
    (one GPU per process, by LOCAL_RANK), gloo on CPU. Returns (rank, world_size, device),
    device the process's: every tensor handed to a collective lives there (all_reduce_sum);
    (0, 1, device) for a plain single-process run, which pays nothing for this."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def leave_distributed():
    """Leave the process group once every process is done (the DDP model already deleted)."""
    gc.collect()  # DDP's reducer goes before the group it talks to
    dist.barrier()  # no process leaves the group while another still talks to it
    dist.destroy_process_group()


def broadcast_buffers(net):
    """Process 0's buffers (BatchNorm running statistics) to every process: each process's
    training forward updates its own copy from its share of the batch. The buffers live on
    the network's device, the process's."""
    for buffer in net.buffers():
        dist.broadcast(buffer, 0)


def all_reduce_sum(values, device):
    """The sum over the processes of values (numbers, or a tensor [k]) -> float64 tensor [k]
    on `device`, which must be the process's (init_distributed's): NCCL serves CUDA tensors
    only, so the tensor is made there rather than wherever a forgotten device= would put it
    (DESIGN.md, Scale). The one all-reduce of training (the epoch's totals) and evaluation
    (reduce_metrics); the values given are never changed."""
    total = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    dist.all_reduce(total)
    return total


def reduce_metrics(metrics, n_local, world_size, device):
    """Evaluation sharded over processes: every accuracy of evaluate()'s result becomes the
    accuracy over all shards (weighted by their sizes), summed by all_reduce_sum on the
    process's device. Unchanged for one process."""
    if world_size == 1:
        return metrics
    n, clean, *robust = all_reduce_sum(
        [n_local, metrics["clean_acc"] * n_local]
        + [r["acc"] * n_local for r in metrics["robust_acc"]], device).tolist()
    metrics["clean_acc"] = clean / n
    for r, v in zip(metrics["robust_acc"], robust):
        r["acc"] = v / n
    return metrics


def collapsed(history, drop):
    """Catastrophic overfitting guard: True when the last guard accuracy fell more than `drop`
    below the best so far (history: one robust accuracy per epoch)."""
    return len(history) > 1 and history[-1] < max(history) - drop


def watch_guard(guard, model, x, y, epoch, run, world_size=1):
    """FGSM's catastrophic-overfitting guard, after an epoch: PGD-10 accuracy on the held-out
    batch; keeps the best epoch's weights in guard; on a collapse (collapsed()) loads them back
    into model and returns True (stop training). Under torchrun x, y are this process's share
    (possibly empty) and the accuracy is reduced over the processes (reduce_metrics) before
    the decision: every process decides alike, else one could stop while the others wait in
    a collective (DESIGN.md, Scale)."""
    acc = accuracy(model, x, y, run.eval_batch_size, run.norm, run.eps, steps=10) if len(x) \
        else 0.0
    acc = reduce_metrics({"clean_acc": acc, "robust_acc": []}, len(x), world_size,
                         next(model.parameters()).device)["clean_acc"]
    guard["history"].append(acc)
    if acc >= max(guard["history"]):
        guard["best_epoch"] = epoch
        guard["best_model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if collapsed(guard["history"], run.guard_drop):
        model.load_state_dict(guard["best_model"])
        guard["stopped_epoch"] = epoch
        return True
    return False


# ----------------------------------------------------------------------------- command line

def parse_radius(text):
    """'0.5' (the training norm) or 'linf:8/255' -> (norm or None, eps)."""
    norm, sep, eps = str(text).rpartition(":")
    if sep and norm not in NORMS:
        raise argparse.ArgumentTypeError(
            f"radius must look like 0.5 or linf:8/255 (norm l2 or linf), got {text!r}")
    return (norm or None), parse_eps(eps)


TRAINING_FLAGS = ("norm", "eps", "seed")  # what a model was trained with
EVAL_ONLY_FLAGS = ("trained_norm", "trained_eps", "trained_seed")
CLASSIFIER_FLAGS = ("model", "head", "mean", "std", "image_size")  # add_classifier_args


class ArchChoices(tuple):
    """--arch's choices: ARCHS to train, and with --eval-only also torchvision:NAME (any
    torchvision classifier, whose name is checked when it is built)."""

    def __contains__(self, name):
        return tuple.__contains__(self, name) or str(name).startswith("torchvision:")


def get_args(argv=None):
    p = ArgumentParser(description="Adversarial training (eps 0 = standard training) and "
                       "evaluation; --eval-only evaluates any checkpoint.")
    p.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="training dataset (default fashion-mnist); with --eval-only, the "
                        "checkpoint's dataset, whose test split is attacked (default the one "
                        "it records; imagenet, DATA_DIR/val, for published ImageNet models)")
    p.add_argument("--classes", default=None,
                   help="classes to keep and relabel 0..k-1, e.g. 0-4 or 0,3,7 (default all)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="use the first N training examples (default all)")
    p.add_argument("--test-size", type=positive_int, default=None,
                   help="evaluate on the first N test examples (default all)")
    p.add_argument("--arch", default="cnn", choices=ArchChoices(ARCHS),
                   help="model; with --eval-only also torchvision:NAME, any classifier of "
                        "torchvision.models, whose state dict --ckpt is")
    p.add_argument("--width", type=positive_int, default=64,
                   help="resnet18 base width (channels of the first stage); on the CPU not 1, "
                        "2 or 4 (a torch fault in channels_last)")
    p.add_argument("--norm", default=None, choices=NORMS,
                   help="threat model of training (default l2)")
    p.add_argument("--eps", type=parse_eps, default=None,
                   help="training radius in pixel units (images in [0, 1]), fractions ok "
                        "(8/255); 0 = standard training (default 0)")
    p.add_argument("--attack", default="pgd", choices=("pgd", "fgsm"),
                   help="training attack: pgd (--steps steps) or fgsm (one step of 1.25 eps "
                        "from a random start, Wong et al. 2020, with the catastrophic-"
                        "overfitting guard)")
    p.add_argument("--steps", type=nonnegative_int, default=3, help="PGD steps during training")
    p.add_argument("--step-size", type=parse_eps, default=None,
                   help="attack step size (default 2.5 * eps / steps for pgd, 1.25 * eps for "
                        "fgsm)")
    p.add_argument("--guard-size", type=positive_int, default=512,
                   help="fgsm: the last N training examples are held out to watch PGD "
                        "accuracy after every epoch")
    p.add_argument("--guard-drop", type=float, default=0.2,
                   help="fgsm: stop, keeping the best epoch's weights, when held-out PGD "
                        "accuracy falls this much below its best (accuracy units)")
    p.add_argument("--epochs", type=positive_int, default=5, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="examples per step (under torchrun: the global batch)")
    p.add_argument("--eval-batch-size", type=positive_int, default=None,
                   help="examples per batch of the evaluation's attacks, which run in float32 "
                        "(default --batch-size)")
    p.add_argument("--compile", action="store_true",
                   help="train (attack and step) with the network torch.compile'd (under "
                        "torchrun the step alone); compiling takes a while at the start of the "
                        "run")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle "
                   "schedule")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="L2 weight decay (not on BatchNorm and biases)")
    p.add_argument("--augment", action="store_true",
                   help="random crop (pad 4) and horizontal flip (for CIFAR/SVHN)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: BatchNorm "
                   "statistics over the global batch (SyncBatchNorm)")
    p.add_argument("--eval-eps", type=parse_radius, nargs="*", default=[],
                   help="more radii for the final evaluation, besides the training eps: 0.5 "
                        "(training norm) or norm:eps, e.g. l2:0.5 linf:8/255 (default none)")
    p.add_argument("--eval-attack", default="pgd", choices=EVAL_ATTACKS,
                   help="evaluation attack: pgd, apgd (APGD-CE and 3 targeted APGD-DLR runs, "
                        "worst case per example) or apgd-ce (APGD-CE alone)")
    p.add_argument("--eval-steps", type=positive_int, default=20,
                   help="attack steps at evaluation (per APGD run)")
    p.add_argument("--eval-restarts", type=positive_int, default=1,
                   help="random restarts at evaluation")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of initialisation and data order (default 0)")
    add_common_args(p)
    p.add_argument("--out", default=None, help="output folder (default runs/default; with "
                   "--eval-only, eval-<attack> beside the checkpoint); a model.pt of other "
                   "settings there is refused unless --resume")
    p.add_argument("--resume", action="store_true", help="continue from --out/model.pt if it "
                   "holds an unfinished run trained with the same settings")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate --ckpt at its training radius (if known) and "
                        "--eval-eps on the test split of its dataset; metrics.json under --out")
    p.add_argument("--ckpt", default=None, help="with --eval-only, the " + CKPT_HELP)
    p.add_argument("--unsafe-load", action="store_true", help="with --eval-only: "
                   + UNSAFE_LOAD_HELP)
    add_classifier_args(p, "with --eval-only and --arch torchvision:NAME or --model: ")
    trained = "with --eval-only, what a published checkpoint was trained with (ours record " \
              "their own; a value that contradicts it is an error): "
    p.add_argument("--trained-norm", default=None, choices=NORMS, help=trained + "norm")
    p.add_argument("--trained-eps", type=parse_eps, default=None,
                   help=trained + "radius, pixel units")
    p.add_argument("--trained-seed", type=int, default=None, help=trained + "seed")
    args = p.parse_args(argv)
    if args.eval_only:
        if not args.ckpt and not args.model:
            p.error("--eval-only needs --ckpt (or --model)")
        for name in TRAINING_FLAGS:
            if getattr(args, name) is not None:
                p.error(f"--{name} sets training; with --eval-only, --trained-{name} gives "
                        f"what a published checkpoint was trained with")
    else:
        for name in ("ckpt", "unsafe_load") + EVAL_ONLY_FLAGS + CLASSIFIER_FLAGS:
            if getattr(args, name) not in (None, False):
                p.error(f"--{name.replace('_', '-')} applies to --eval-only only")
        if args.arch not in ARCHS:
            p.error(f"--arch {args.arch} applies to --eval-only only (training: "
                    f"{', '.join(ARCHS)})")
        if args.dataset == "imagenet":  # no in-memory ImageNet training set
            p.error("argument --dataset: invalid choice for training: 'imagenet' (published "
                    "ImageNet checkpoints are evaluated with --eval-only)")
        if args.attack == "pgd" and args.steps == 0 and (args.eps or 0) > 0:
            p.error(f"--steps 0 with --eps {format_eps(args.eps)} would train on clean images: "
                    f"give --steps >= 1, or --eps 0 for standard training")
    return args


def _resolved(args, **values):
    """A copy of args (never changed itself) without the --eval-only training flags, with
    `values` set, the norm of each --eval-eps radius resolved and fgsm's single step."""
    run = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in EVAL_ONLY_FLAGS})
    for name, value in values.items():
        setattr(run, name, value)
    if any(norm is None for norm, _ in args.eval_eps) and run.norm is None:
        raise UserError("--eval-eps without a norm (e.g. 0.5) needs the training norm: write "
                        "l2:0.5, or give --trained-norm")
    run.eval_eps = [(norm or run.norm, eps) for norm, eps in args.eval_eps]
    run.eval_batch_size = args.eval_batch_size or args.batch_size
    if args.attack == "fgsm":
        run.steps = 1
    return run


def training_settings(args):
    """The settings of a training run: args with the stated defaults filled in."""
    return _resolved(args, dataset=args.dataset or "fashion-mnist", norm=args.norm or "l2",
                     eps=0.0 if args.eps is None else args.eps,
                     seed=0 if args.seed is None else args.seed)


def trained_with(ckpt, args):
    """(norm, eps, seed) of the evaluated model's training: what the checkpoint records (ours),
    else --trained-norm, --trained-eps and --trained-seed (a published checkpoint records
    none; None where not given). A value given that contradicts the checkpoint's is a
    UserError rather than a note: the metrics would be filed under a training radius the
    model never had (run_all.sh names its folders by them)."""
    recorded = {"norm": ckpt["norm"], "eps": ckpt["eps"],
                "seed": (ckpt.get("args") or {}).get("seed")}
    resolved = {}
    for key, mine in recorded.items():
        given = getattr(args, f"trained_{key}")
        if given is not None and mine is not None and not (
                math.isclose(given, mine, abs_tol=1e-9) if key == "eps" else given == mine):
            show = format_eps if key == "eps" else str
            raise UserError(f"--trained-{key} {show(given)} contradicts {args.ckpt}, trained "
                            f"with {key} {show(mine)}: drop --trained-{key}")
        resolved[key] = mine if mine is not None else given
    if resolved["eps"] is not None and resolved["norm"] is None:
        raise UserError(f"--trained-eps {format_eps(resolved['eps'])} for a published "
                        f"checkpoint needs --trained-norm (l2 or linf)")
    return resolved["norm"], resolved["eps"], resolved["seed"]


def eval_settings(args, ckpt):
    """The settings of an --eval-only run: the checkpoint's dataset and training (norm, eps,
    seed: trained_with)."""
    if args.dataset not in (None, ckpt["dataset"]):  # ours ignore dataset: they record their own
        raise UserError(f"--dataset {args.dataset} contradicts {args.ckpt}, which was trained "
                        f"on {ckpt['dataset']}: drop --dataset")
    norm, eps, seed = trained_with(ckpt, args)
    return _resolved(args, dataset=ckpt["dataset"], norm=norm, eps=eps, seed=seed)


def settings_of(run):
    """The settings that define a run (what provenance hashes and --resume compares)."""
    settings = vars(run).copy()
    settings["eval_eps"] = [f"{norm}:{format_eps(eps)}" for norm, eps in run.eval_eps]
    settings.pop("unsafe_load", None)  # how a file is read, not what is computed
    return settings


def settings_difference(ckpt, settings):
    """The first setting where ckpt's recorded settings differ from `settings`: (key, recorded,
    given), or None when they agree."""
    recorded = ckpt.get("provenance", {}).get("settings", {})
    for key, value in provenance(settings)["settings"].items():
        if recorded.get(key) != value:
            return key, recorded.get(key), value
    return None


def check_resumable(ckpt, settings, path):
    """--resume continues only a run made with exactly these settings; else name the first
    difference."""
    diff = settings_difference(ckpt, settings)
    if diff:
        raise UserError(f"--resume: {path} was trained with {diff[0]}={diff[1]!r}, not "
                        f"{diff[2]!r}; use another --out or drop --resume")


def check_not_overwriting(out, settings, resume):
    """A model.pt of other settings in out is never replaced unasked: without --resume that is
    a UserError (a rerun of the same settings may retrain in place)."""
    path = out / "model.pt"
    if resume or not path.exists():
        return
    diff = settings_difference(read_checkpoint(path), settings)
    if diff:
        raise UserError(f"{path} holds a model trained with {diff[0]}={diff[1]!r}, not "
                        f"{diff[2]!r}: give another --out, delete it, or --resume with its "
                        f"settings")


def make_checkpoint(net, opt, run, data, epoch, train_seconds, guard):
    """The run's checkpoint (checkpoints.new_checkpoint: tensors and plain types, loads with
    torch.load(weights_only=True)) with its settings, the optimizer and fgsm's guard. The
    learning rate is a pure function of the step (lr_at), so the epoch is the schedule's
    state."""
    return new_checkpoint(net, data["model_args"], run.dataset, data["classes"], run.norm,
                          run.eps, args=settings_of(run), provenance=provenance(settings_of(run)),
                          epoch=epoch, train_seconds=train_seconds, optimizer=opt.state_dict(),
                          guard=guard)


def ran_on(device, trained):
    """{device, precision} of a run for metrics.json (report.md states them; DESIGN.md,
    Precision): on CUDA the training step and its attack run under bf16 autocast
    (models.sgd_epoch); float32 is full float32 (models.get_device turns TF32 off), unless a
    caller turned TF32 back on, which is then said."""
    if device.type != "cuda":
        return {"device": "cpu", "precision": "float32"}
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    f32 = "float32" + (" (TF32 allowed)" if tf32 else "")
    return {"device": torch.cuda.get_device_name(device),
            "precision": f"training bf16 autocast, evaluation {f32}" if trained else f32}


def eval_only(args):
    """--eval-only: any checkpoint (ours at its training radius and --eval-eps; a published
    one at --trained-eps, if given, and --eval-eps), on the test split of its dataset and
    classes (--dataset also normalises a published file that carries no normalizer: imagenet
    for torchvision state dicts); metrics.json under --out."""
    clock = Clock()
    device = get_device(args.device)
    model, ckpt = load_checkpoint(
        args.ckpt, device, arch=None if args.arch in ARCHS else args.arch, dataset=args.dataset,
        unsafe=args.unsafe_load, **{name: getattr(args, name) for name in CLASSIFIER_FLAGS})
    run = eval_settings(args, ckpt)
    out = writable_dir(run.out or ckpt_folder(run) / f"eval-{run.eval_attack}")
    x, y = load_split(run.dataset, False, run.data_dir, ckpt["classes"], run.test_size,
                      not run.no_download)
    # no training radius known (a published checkpoint without --trained-eps): --eval-eps only
    radii = ([(run.norm, run.eps)] if run.eps is not None else []) + run.eval_eps
    torch.manual_seed(0)  # the attacks' random starts: a rerun gives the same numbers
    metrics = evaluate(model, x, y, radii, batch_size=run.eval_batch_size, steps=run.eval_steps,
                       restarts=run.eval_restarts, attack=run.eval_attack)
    metrics.update(eps=run.eps, norm=run.norm, arch=ckpt["arch"], dataset=run.dataset,
                   classes=ckpt["classes"], seed=run.seed, test_size=len(x), ckpt=str(run.ckpt),
                   **ran_on(device, trained=False), provenance=provenance(settings_of(run)))
    atomic_save(out / "metrics.json", metrics)
    robust = " ".join(f"{r['attack']} {r['norm']}@{format_eps(r['eps'])} {r['acc']:.4f}"
                      for r in metrics["robust_acc"])
    clock.log(f"eval clean {metrics['clean_acc']:.4f} {robust}; wrote {out / 'metrics.json'}")


# ----------------------------------------------------------------------------- training run

def load_data(run, device):
    """The run's data: {"classes", "model_args", "train": (x, y) on device, "test": (x, y) on
    the CPU, "guard": fgsm's held-out last --guard-size training examples on device, or
    None}."""
    ds = DATASETS[run.dataset]
    classes = parse_classes(run.classes, ds.num_classes)
    load = dict(data_dir=run.data_dir, classes=classes, download=not run.no_download)
    x_train, y_train = load_split(run.dataset, True, size=run.train_size, **load)
    test = load_split(run.dataset, False, size=run.test_size, **load)
    guard = None
    if run.attack == "fgsm":  # hold out the last examples to watch for collapse
        if run.guard_size >= len(x_train):
            raise UserError(f"--guard-size {run.guard_size} leaves no training example of "
                            f"{len(x_train)}")
        guard = (x_train[-run.guard_size:].to(device), y_train[-run.guard_size:].to(device))
        x_train, y_train = x_train[:-run.guard_size], y_train[:-run.guard_size]
    model_args = dict(arch=run.arch, num_classes=len(classes), in_channels=ds.channels,
                      image_size=ds.size, mean=list(ds.mean), std=list(ds.std), width=run.width)
    return {"classes": classes, "model_args": model_args, "guard": guard, "test": test,
            "train": (x_train.to(device), y_train.to(device))}  # whole dataset on the device


def width_problem(arch, width, device):
    """Why a resnet18 of this width cannot train in channels_last on device, as one line, or
    None. torch 2.14.1 on the CPU corrupts memory in the backward of a strided 1x1 convolution
    with 4 input channels in channels_last (docs/PERFORMANCE.md): the shortcuts of stages 2-4
    take width, 2 width and 4 width channels."""
    if arch != "resnet18" or device.type != "cpu" or 4 not in (width, 2 * width, 4 * width):
        return None
    return (f"--width {width} on the CPU gives a strided 1x1 convolution 4 input channels, "
            f"whose channels_last backward corrupts memory in torch 2.14.1: use --width 3, 5 "
            f"or more")


def compile_problem(device):
    """Why torch.compile's default backend (inductor) cannot compile for device here, as one
    line, or None. It compiles at the first training step, after the data are loaded: without
    a C++ compiler (CPU) or Triton (CUDA) that is a traceback minutes into the run."""
    try:
        from torch._inductor import exc
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch.utils._triton import has_triton
    except ImportError:  # another torch layout: torch.compile says what it lacks
        return None
    if device.type == "cuda":
        return None if has_triton() else ("--compile on CUDA needs Triton, which is not "
                                           "installed: install triton or drop --compile")
    if device.type != "cpu":
        return None
    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return ("--compile on the CPU needs a C++ compiler (g++ or $CXX), and none was found: "
                "install one or drop --compile")
    return None


def setup_model(run, data, device, world_size):
    """(network, the model to train, optimizer): the network initialised from --seed in
    channels_last on device (with --sync-bn its BatchNorm layers SyncBatchNorm); the model to
    train is the network, in a DDP wrapper under torchrun, then torch.compile'd with
    --compile: DDP wraps the module first, the order PyTorch documents for compiling with DDP
    (its gradient buckets then split the compiled graph). Under DDP the attack runs DDP's
    module (train_epoch), which is the network uncompiled."""
    torch.manual_seed(run.seed)
    net = build_model(**data["model_args"]).to(device, memory_format=torch.channels_last)
    if run.sync_bn:  # main refuses it unless under torchrun on CUDA
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = net
    if world_size > 1:  # device_ids None: the module and its inputs are on the one device
        model = torch.nn.parallel.DistributedDataParallel(model)
    if run.compile:
        model = torch.compile(model)
    return net, model, make_optimizer(net, run.lr, run.momentum, run.weight_decay)


def resume(run, out, net, opt, say):
    """Where training starts: {"epoch" (the last finished), "log", "train_seconds", "guard"};
    with --resume and out/model.pt of the same settings, from that checkpoint, whose weights
    and optimizer state are loaded into net and opt."""
    guard = {"history": [], "best_epoch": None, "stopped_epoch": None, "best_model": None}
    start = {"epoch": 0, "log": [], "train_seconds": 0.0,
             "guard": guard if run.attack == "fgsm" else None}
    path = out / "model.pt"
    if not (run.resume and path.exists()):
        return start
    ckpt = read_checkpoint(path)
    check_resumable(ckpt, settings_of(run), path)
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    say(f"resumed from epoch {ckpt['epoch']}")
    return {"epoch": ckpt["epoch"], "log": log[:ckpt["epoch"]],
            "train_seconds": ckpt["train_seconds"], "guard": ckpt["guard"]}


def run_epochs(run, out, data, net, model, opt, start, rank, world_size, say):
    """The epochs after start["epoch"], each from its own seed (a resumed run gives the same
    numbers), each saved (checkpoint, log.jsonl) by process 0; stops early when fgsm's guard
    sees a collapse. Returns the final checkpoint dict."""
    x, y = data["train"]
    steps_per_epoch = -(-len(x) // run.batch_size)
    total_steps = run.epochs * steps_per_epoch
    step_size = run.step_size
    if step_size is None and run.attack == "fgsm":
        step_size = 1.25 * run.eps  # Wong et al. 2020 (pgd's default is pgd_attack's)
    shard = ddp_shard(rank, world_size) if world_size > 1 else None
    log, train_seconds, guard = start["log"], start["train_seconds"], start["guard"]
    # the guard's held-out examples are shared out like the test set (watch_guard reduces)
    guard_share = [t[rank::world_size] for t in data["guard"]] if guard is not None else None
    ckpt_path, ckpt = out / "model.pt", None
    for epoch in range(start["epoch"] + 1, run.epochs + 1):
        torch.manual_seed(run.seed * 100003 + epoch)  # per-epoch RNG: resuming gives the same run
        te = time.time()
        try:
            loss, acc, _ = train_epoch(
                model, opt, x, y, batch_size=run.batch_size, norm=run.norm, eps=run.eps,
                steps=run.steps, step_size=step_size, step0=(epoch - 1) * steps_per_epoch,
                lr_schedule=lambda step: lr_at(step, total_steps, run.lr), augment=run.augment,
                amp=x.device.type == "cuda", channels_last=True, shard=shard)
        except FloatingPointError as e:
            raise UserError(f"epoch {epoch}: {e}; {ckpt_path} keeps the last finished epoch")
        train_seconds += time.time() - te
        log.append({"epoch": epoch, "loss": loss, "train_acc": acc, "seconds": time.time() - te})
        stop = guard is not None and watch_guard(guard, net, *guard_share, epoch, run, world_size)
        if guard is not None:
            log[-1]["guard_acc"] = guard["history"][-1]
        ckpt = make_checkpoint(net, opt, run, data, run.epochs if stop else epoch, train_seconds,
                               guard)
        if rank == 0:
            atomic_save(ckpt_path, ckpt)
            atomic_save(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
        if world_size > 1:
            dist.barrier()  # the checkpoint is complete before any process goes on
        say(f"epoch {epoch}/{run.epochs} loss {loss:.4f} train_acc {acc:.4f} epoch_time "
            f"{time.time() - te:.1f}s"
            + (f" guard pgd acc {guard['history'][-1]:.4f}" if guard is not None else ""))
        if stop:
            say(f"guard: held-out PGD accuracy fell from {max(guard['history']):.4f} to "
                f"{guard['history'][-1]:.4f} (catastrophic overfitting); stopped, kept epoch "
                f"{guard['best_epoch']}'s weights")
            break
    return ckpt or make_checkpoint(net, opt, run, data, run.epochs, train_seconds, guard)


def final_evaluation(run, out, data, net, ckpt, rank, world_size, say):
    """Clean and robust test accuracy at the training radius and --eval-eps (sharded over
    processes); process 0 writes the checkpoint and metrics.json."""
    x_test, y_test = data["test"]
    x_shard, y_shard = x_test[rank::world_size], y_test[rank::world_size]
    metrics = evaluate(net, x_shard, y_shard, [(run.norm, run.eps), *run.eval_eps],
                       batch_size=run.eval_batch_size, steps=run.eval_steps,
                       restarts=run.eval_restarts, attack=run.eval_attack)
    metrics = reduce_metrics(metrics, len(x_shard), world_size, next(net.parameters()).device)
    metrics.update(eps=run.eps, norm=run.norm, arch=run.arch, dataset=run.dataset,
                   classes=data["classes"], epochs=run.epochs, seed=run.seed,
                   train_size=len(data["train"][0]), test_size=len(x_test),
                   train_seconds=ckpt["train_seconds"], attack=run.attack,
                   **ran_on(next(net.parameters()).device, trained=True),
                   provenance=ckpt["provenance"])
    if ckpt["guard"] is not None:
        metrics["guard"] = {k: v for k, v in ckpt["guard"].items() if k != "best_model"}
    if rank == 0:
        atomic_save(out / "model.pt", ckpt)
        atomic_save(out / "metrics.json", metrics)
    robust = " ".join(f"{r['norm']}@{format_eps(r['eps'])} {r['acc']:.4f}"
                      for r in metrics["robust_acc"])
    say(f"eval clean {metrics['clean_acc']:.4f} {run.eval_attack} {robust}")


def main(args):
    if args.eval_only:
        return eval_only(args)
    run = training_settings(args)
    rank, world_size, device = init_distributed(get_device(run.device))
    if run.sync_bn and not (device.type == "cuda" and world_size > 1):
        raise UserError("--sync-bn needs torchrun with CUDA (SyncBatchNorm does not run on the "
                        "CPU)")
    say = Clock().log if rank == 0 else (lambda text: None)  # process 0 alone speaks and writes
    problem = width_problem(run.arch, run.width, device) or (
        compile_problem(device) if run.compile else None)
    if problem:
        raise UserError(problem)
    out = writable_dir(run.out or "runs/default")
    check_not_overwriting(out, settings_of(run), run.resume)
    data = load_data(run, device)
    say(f"data {run.dataset} classes {run.classes or 'all'}: train {len(data['train'][0])} test "
        f"{len(data['test'][0])} on {device}"
        + (f", {world_size} processes" if world_size > 1 else ""))
    net, model, opt = setup_model(run, data, device, world_size)
    start = resume(run, out, net, opt, say)
    # cuDNN autotuning for training alone, whose shapes are fixed (a step's few shapes), not
    # for the evaluation's (evaluate turns it off: models.cudnn_autotune). Training on CUDA is
    # then not bit-reproducible: --resume is bit-exact on the CPU.
    with cudnn_autotune(True):
        ckpt = run_epochs(run, out, data, net, model, opt, start, rank, world_size, say)
    final_evaluation(run, out, data, net, ckpt, rank, world_size, say)
    if world_size > 1:
        del model
        leave_distributed()


if __name__ == "__main__":
    with user_errors():
        main(get_args())
