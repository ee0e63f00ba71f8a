"""Fisher information of the weights, of the output about the input, and of the
representation about the input (claims C3 and C4 of Terzi et al., AAAI 2021).

    # the first 512 test examples of the checkpoint's own dataset and classes
    python fisher.py --ckpt runs/eps0.5/model.pt --n 512 --out runs/eps0.5
    # the same model on other data (images are adapted to the model's channels and size)
    python fisher.py --ckpt runs/eps0.5/model.pt --dataset mnist --classes 0-4 \
        --out runs/eps0.5/mnist

With p(y|x) the softmax of the logits, model in eval mode:

    (1) weights          tr F_w(x) = E_{y~p(y|x)} ||grad_w log p(y|x)||^2, all parameters
                         (BatchNorm's included); exact sum over classes when there are <= 20
    (2) output | input   F_x(x) = J^T (diag p - p p^T) J, J = d logits / dx: trace, lambda_max
    (3) repr. | input    J_f = d f(x) / dx, f = model.features: ||J_f||_F^2, lambda_max(J_f^T J_f),
                         raw and divided by E ||f(x)||^2 (Gaussian channel z = f(x) + sigma n,
                         F = J_f^T J_f / sigma^2, reported for sigma = 1)

Outputs under --out (default: the checkpoint's folder): fisher.json (each quantity as the
mean over examples with its standard error `_se`) and one .npy of per-example values per
quantity, in the order of the first --n test examples (after class filtering).

Functions to copy: each needs the names after its colon, from this file, the shared modules
after its semicolon, beside it, and this file's imports of other libraries.
    fisher_trace_weights: batched, fisher_factor, logit_vjp_sqnorms; common.py, models.py
    input_fisher_trace: (none); common.py, models.py
    input_fisher_lambda_max: _quiet_jvp, lanczos_lambda_max; common.py, models.py
    repr_jacobian_frobenius: (none); common.py, models.py
    repr_lambda_max: _quiet_jvp, lanczos_lambda_max; common.py, models.py
"""
import contextlib
import warnings

import numpy as np
import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from checkpoints import load_checkpoint
from common import (ArgumentParser, Clock, add_checkpoint_args, add_common_args, atomic_save,
                    check_number, checkpoint_options, ckpt_folder, mean_se, nonnegative_int,
                    parse_classes, positive_int, provenance, user_errors, writable_dir)
from data import DATASETS, STREAM_RULE, iterate_batches, open_split
from models import check_images, check_labels, eval_mode, get_device

EXACT_MAX_CLASSES = 20  # up to this many classes, expectations over y are exact sums
# Peak memory of the weights' trace per example of a chunk, in units of its per-sample
# gradients (directions x parameters floats): they, their squares and the vmapped backward's
# buffers. Measured 2.09 on the CIFAR ResNet-18 and 2.3 on one of width 16 (python
# tests/bench.py --memory, docs/PERFORMANCE.md, Memory); 2.5 leaves room for larger images'
# activations.
WEIGHTS_MEMORY_PER_GRADIENT = 2.5
# Every function below runs the model in eval mode (models.eval_mode): train-mode BatchNorm
# would mix the examples of a batch and update its running statistics.


def batched(fn, x, batch_size):
    """fn over x [N, ...] in batches of batch_size, the results concatenated in order:
    fn(batch) -> [B] gives [N]; fn(batch) -> ([B], steps) gives ([N], the most steps of any
    batch). The one batch loop of the estimators and of measure()."""
    outputs = [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if isinstance(outputs[0], tuple):
        return torch.cat([values for values, _ in outputs]), max(steps for _, steps in outputs)
    return torch.cat(outputs)


@contextlib.contextmanager
def _quiet_jvp():
    """torch.func's jvp triggers torch's own deprecation warning of torch.jit.script: not
    ours, and nothing the caller can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        yield


# ----------------------------------------------------------------------------- weights

def logit_vjp_sqnorms(model, x, directions, chunk=64):
    """Squared norms ||J_w(x_n)^T u_{n,l}||^2 per example, per direction, per layer, with
    J_w = d logits / d w.

    x [N, C, H, W], directions [N, L, k] (constant vectors in logit space) -> {layer: [N, L]}.
    grad_w log p(y|x) = J_w^T (e_y - p), so u = e_y - p gives the gradient norms of log
    p(y|x), and the rows of a factor of diag p - p p^T give the Fisher's trace (see
    fisher_trace_weights). torch.func: vmap over examples of jacrev (L vjps sharing one
    forward pass) of functional_call. w is every parameter of the model, BatchNorm's weight and
    bias included (not its running statistics, which are buffers); a layer is the module
    that owns the parameters ("body.0.0", "head"). Memory ~ 2.1 x chunk * L * (parameters)
    floats (chunk_to_fit).
    Eval mode.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def projected_logits(params, xi, ui):  # xi [C, H, W], ui [L, k] -> ui @ logits [L]
        return ui @ functional_call(model, (params, buffers), (xi[None],))[0]

    per_direction_grads = vmap(jacrev(projected_logits), in_dims=(None, 0, 0))
    chunks = []
    with eval_mode(model):
        for i in range(0, len(x), chunk):
            # name -> [c, L, *shape]
            grads = per_direction_grads(params, x[i:i + chunk], directions[i:i + chunk])
            sqnorms = {}
            for name, g in grads.items():
                layer = name.rpartition(".")[0]  # "body.0.1.weight" -> "body.0.1"
                sqnorms[layer] = sqnorms.get(layer, 0) + g.pow(2).flatten(2).sum(2)  # [c, L]
            chunks.append(sqnorms)
    return {layer: torch.cat([c[layer] for c in chunks]) for layer in chunks[0]}


def chunk_to_fit(memory_mib, directions, num_params, num_values, most=64):
    """The largest chunk (at most `most`, at least 1) whose weights' trace fits in memory_mib
    MiB: WEIGHTS_MEMORY_PER_GRADIENT x chunk x directions x num_params floats, beside the
    parameters twice over (weights and a detached view's gradients) and the num_values floats
    of the examples held."""
    check_number("memory_mib", memory_mib, at_least=0)
    per_example = WEIGHTS_MEMORY_PER_GRADIENT * directions * num_params * 4
    room = memory_mib * 2 ** 20 - 4 * (2 * num_params + num_values)
    return int(max(1, min(most, room // per_example)))


def fisher_factor(probs):
    """L [N, k, k - 1] with L L^T = diag p - p p^T for each row p of probs [N, k].

    diag p - p p^T has the constant vector in its null space (rank <= k - 1), so k - 1
    columns suffice: its eigenvectors scaled by the square roots of the other k - 1
    eigenvalues (eigh in float64; the smallest eigenvalue, ~0, is the one dropped).
    """
    p = probs.double()
    p = p / p.sum(1, keepdim=True)  # a float32 softmax sums to 1 only within ~1e-7
    cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    scale = eigenvalues[:, None, 1:].clamp_min(0).sqrt()
    return (eigenvectors[:, :, 1:] * scale).to(probs.dtype)


def fisher_trace_weights(model, x, y=None, chunk=64, label_samples=None, generator=None):
    """Per-example trace of the weights' Fisher, eq. (1):
    tr F_w(x) = E_y ||grad_w log p(y|x)||^2.

    x [N, C, H, W] -> (trace [N], {layer: [N]}), the per-layer traces summing to the trace.
    y=None: y ~ p(y|x), exactly if label_samples is None: E_y g_y g_y^T = J_w^T (diag p - p p^T)
    J_w, so the trace is ||L^T J_w||_F^2 with L L^T = diag p - p p^T (fisher_factor): k - 1
    vjps per example instead of one per class. With label_samples, the mean over that many
    draws from p (for many classes). y [N] given: the empirical Fisher ||grad_w log
    p(y_n|x_n)||^2 of those (true) labels (y and label_samples together are a ValueError).
    All parameters count, BatchNorm's included. Eval mode. Bad input is a ValueError naming
    the value.
    """
    check_images(x)
    check_number("chunk", chunk, at_least=1, integer=True)
    if label_samples is not None:
        check_number("label_samples", label_samples, at_least=1, integer=True)
    if y is not None:
        check_labels(y, len(x))
        if label_samples is not None:
            raise ValueError("give y (the empirical Fisher of those labels) or label_samples "
                             "(labels drawn from p(y|x)), not both")
    with eval_mode(model), torch.no_grad():
        probs = batched(lambda xb: torch.softmax(model(xb), -1), x, chunk)
    n, k = probs.shape
    if y is not None and not 0 <= int(y.min()) <= int(y.max()) < k:
        raise ValueError(f"y must hold labels 0-{k - 1} (the model's classes), got "
                         f"{int(y.min())} to {int(y.max())}")
    if y is None and label_samples is None:
        directions = fisher_factor(probs).transpose(1, 2)  # [N, k - 1, k]
        sqnorms = logit_vjp_sqnorms(model, x, directions, chunk)
        per_layer = {layer: sq.sum(1) for layer, sq in sqnorms.items()}
        return sum(per_layer.values()), per_layer
    if y is not None:
        labels = y.view(n, 1)
    else:
        labels = torch.multinomial(probs.cpu(), label_samples, replacement=True,
                                   generator=generator).to(x.device)
    directions = torch.eye(k, device=x.device)[labels] - probs[:, None, :]  # e_y - p [N, L, k]
    sqnorms = logit_vjp_sqnorms(model, x, directions, chunk)
    per_layer = {layer: sq.mean(1) for layer, sq in sqnorms.items()}
    return sum(per_layer.values()), per_layer


# ----------------------------------------------------------------------------- input

def input_fisher_trace(model, x, label_samples=None, generator=None):
    """Per-example trace of the output's Fisher about the input, eq. (2).

    tr F_x(x) = tr J^T (diag p - p p^T) J = sum_y p(y|x) ||grad_x log p(y|x)||^2. Exact over
    classes (label_samples None): the k input gradients of an example from one jacrev (k vjps;
    memory ~ N * k * C * H * W floats). With label_samples S (for many classes, e.g. ImageNet's
    1000 at 224 px): the unbiased mean of ||grad_x log p(y_s|x)||^2 over S labels y_s ~ p(y|x),
    S vjps of the batch. x [N, C, H, W] -> [N]. Eval mode. Bad input is a ValueError.
    """
    check_images(x)
    if label_samples is not None:
        check_number("label_samples", label_samples, at_least=1, integer=True)
    with eval_mode(model):
        if label_samples is not None:
            # [N, k]
            log_probs, pullback = vjp(lambda xb: torch.log_softmax(model(xb), -1), x)
            labels = torch.multinomial(log_probs.detach().exp().cpu(), label_samples,
                                       replacement=True, generator=generator).to(x.device)  # [N, S]
            total = torch.zeros(len(x), device=x.device)
            for s in range(label_samples):  # examples are independent (eval mode): one vjp each
                onehot = torch.nn.functional.one_hot(labels[:, s], log_probs.shape[1])
                total += pullback(onehot.to(log_probs.dtype))[0].pow(2).flatten(1).sum(1)
            return (total / label_samples).detach()

        def log_probs(xi):  # [C, H, W] -> [k]
            return torch.log_softmax(model(xi[None])[0], -1)

        jac = vmap(jacrev(log_probs))(x).flatten(2)  # [N, k, C*H*W]
        with torch.no_grad():
            probs = torch.softmax(model(x), -1)  # [N, k]
        return (probs * jac.pow(2).sum(2)).sum(1).detach()


def lanczos_lambda_max(matvec, v, iters=100, tol=1e-4):
    """Largest eigenvalue of a batch of symmetric PSD operators A_n, one per example.

    matvec: v [N, ...] -> A_n v_n for every n; v: the start [N, ...]. Lanczos with full
    reorthogonalisation: the Krylov space of power iteration {v, Av, A^2 v, ...}, but the
    estimate is the top Ritz value of the whole space (eigvalsh of the tridiagonal T [N, k, k])
    instead of the Rayleigh quotient of the last iterate. Same matvecs, far fewer of them when
    the top eigenvalues are close (power iteration's error shrinks as (lambda_2 / lambda_1)^k),
    and exact after rank + 1 steps (F_x has rank < number of classes). Stops when every
    estimate changed by at most tol (relative) in one step, or after iters steps. Returns
    (lambda_max [N], steps taken); the estimate approaches from below.
    """
    shape, n = v.shape, len(v)
    q = v.flatten(1) / v.flatten(1).norm(dim=1, keepdim=True)  # [N, D]
    basis, alphas, betas = [], [], []
    lam = torch.zeros(n, dtype=torch.float64, device=v.device)
    for step in range(1, iters + 1):
        basis.append(q)
        w = matvec(q.view(shape)).detach().flatten(1)
        alphas.append((q * w).sum(1))
        vectors = torch.stack(basis, 1)  # [N, k, D]
        for _ in range(2):  # full reorthogonalisation; twice keeps it orthogonal in float32
            w = w - (vectors.transpose(1, 2) @ (vectors @ w[:, :, None]))[:, :, 0]
        tridiagonal = (torch.diag_embed(torch.stack(alphas, 1))
                       + torch.diag_embed(torch.stack(betas, 1), 1)
                       + torch.diag_embed(torch.stack(betas, 1), -1)
                       if betas else torch.stack(alphas, 1)[:, :, None])
        new = torch.linalg.eigvalsh(tridiagonal.double())[:, -1]
        converged = bool(((new - lam).abs() <= tol * new.abs()).all())
        lam = new
        if converged:
            break
        beta = w.norm(dim=1)  # 0: the Krylov space is invariant, the estimate exact
        betas.append(beta)
        q = w / beta.clamp_min(1e-30)[:, None]
    return lam.float(), step


def input_fisher_lambda_max(model, x, iters=100, tol=1e-4, generator=None):
    """Per-example largest eigenvalue of F_x(x) = J^T (diag p - p p^T) J, eq. (2).

    Lanczos (power iteration's Krylov space) on v -> J^T (diag p - p p^T) J v, batched over
    examples, one jvp (J v, [N, k]) and one vjp (J^T u, [N, C, H, W]) per step: J is never
    formed; exact after at most k + 1 steps, since F_x has rank < k. For small
    eps the worst-case KL divergence in an L2 ball of radius eps is ~ eps^2 lambda_max / 2.
    x [N, C, H, W] -> (lambda_max [N], steps). Eval mode. Bad input is a ValueError.
    """
    check_images(x)
    check_number("iters", iters, at_least=1, integer=True)
    check_number("tol", tol, above=0)
    with eval_mode(model), _quiet_jvp():
        logits, logits_vjp = vjp(model, x)
        probs = torch.softmax(logits.detach(), -1)  # [N, k]

        def fisher_matvec(v):
            jv = jvp(model, (x,), (v,))[1]  # [N, k]
            u = probs * jv - probs * (probs * jv).sum(1, keepdim=True)  # (diag p - p p^T) J v
            return logits_vjp(u)[0]

        start = torch.randn(x.shape, generator=generator).to(x.device)
        return lanczos_lambda_max(fisher_matvec, start, iters, tol)


# ----------------------------------------------------------------------------- representation

def repr_jacobian_frobenius(model, x, probes=16, generator=None):
    """Per-example ||J_f||_F^2 = tr J_f^T J_f, J_f = d model.features(x) / dx, eq. (3).

    Hutchinson: E_r ||J_f^T r||^2 with r Rademacher in feature space [N, d], one vjp per
    probe, averaged over `probes`; exact (sum over the d basis vectors) when d <= probes,
    which costs no more. x [N, C, H, W] -> [N]. Eval mode. Bad input is a ValueError.
    """
    check_images(x)
    check_number("probes", probes, at_least=1, integer=True)
    with eval_mode(model):
        features, features_vjp = vjp(model.features, x)  # [N, d]
        n, d = features.shape
        total = torch.zeros(n, device=x.device)
        for i in range(min(d, probes)):
            if d <= probes:
                r = torch.zeros(n, d, device=x.device)
                r[:, i] = 1
            else:
                r = (torch.randint(0, 2, (n, d), generator=generator) * 2 - 1).float().to(x.device)
            total += features_vjp(r)[0].pow(2).flatten(1).sum(1)
    return (total if d <= probes else total / probes).detach()


def repr_lambda_max(model, x, iters=100, tol=1e-4, generator=None):
    """Per-example largest eigenvalue of J_f^T J_f (the representation's Fisher about the
    input for sigma = 1), eq. (3), by Lanczos with one jvp and one vjp per step.
    x [N, C, H, W] -> (lambda_max [N], steps). Eval mode. Bad input is a ValueError."""
    check_images(x)
    check_number("iters", iters, at_least=1, integer=True)
    check_number("tol", tol, above=0)
    with eval_mode(model), _quiet_jvp():
        _, features_vjp = vjp(model.features, x)

        def matvec(v):
            return features_vjp(jvp(model.features, (x,), (v,))[1])[0]  # J_f^T (J_f v)

        start = torch.randn(x.shape, generator=generator).to(x.device)
        return lanczos_lambda_max(matvec, start, iters, tol)


# ----------------------------------------------------------------------------- statistics

def ratio_mean_se(num, den):
    """mean(num) / mean(den) with its standard error (delta method over examples)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    ratio = num.mean() / den.mean()
    return float(ratio), mean_se((num - ratio * den) / den.mean())[1]


# ----------------------------------------------------------------------------- script

def get_args(argv=None):
    p = ArgumentParser(description="Fisher information of weights, output and representation "
                                   "of a checkpoint, on the first --n test examples.")
    add_checkpoint_args(p)
    p.add_argument("--n", type=positive_int, default=512,
                   help="number of test examples, the first after class filtering")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="evaluation dataset (default: the checkpoint's)")
    p.add_argument("--classes", default=None,
                   help="classes to keep, e.g. 0-4 or 0,3,7 (default: the checkpoint's when the "
                        "dataset is the checkpoint's, else all)")
    p.add_argument("--chunk", type=positive_int, default=64,
                   help="examples per vmapped per-sample-gradient call of the weights' trace (at "
                        "most; see --memory-mib); memory ~ 2.5 x chunk x (classes - 1, or "
                        "--label-samples) x parameters x 4 bytes")
    p.add_argument("--memory-mib", type=positive_int, default=None,
                   help="memory in MiB the weights' trace may use: --chunk is lowered until it "
                        "fits (chunk_to_fit; run_all.sh gives each job its share of the GPU; "
                        "default none: --chunk as given)")
    p.add_argument("--label-samples", type=positive_int, default=8,
                   help="labels drawn from p(y|x) per example for the weights' and the input's "
                        f"Fisher trace when the model has more than {EXACT_MAX_CLASSES} classes; "
                        "with fewer the sum over classes is exact")
    p.add_argument("--probes", type=positive_int, default=16,
                   help="Hutchinson probes for ||J_f||_F^2; exact if the feature dimension is "
                        "<= probes")
    p.add_argument("--power-iters", type=positive_int, default=100,
                   help="cap on Lanczos (power-iteration Krylov) steps for each lambda_max")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="lambda_max iterations stop at this relative change")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="examples per batch for the input and representation estimators")
    p.add_argument("--seed", type=int, default=0, help="seed of probes, Lanczos starts, label "
                   "draws")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="DataLoader processes reading a streamed split (default min(4, CPUs)); "
                        + STREAM_RULE)
    add_common_args(p)
    args = p.parse_args(argv)
    if not args.tol > 0:
        p.error(f"--tol must be > 0, got {args.tol}")
    return args


def load_examples(args, ckpt, device):
    """(x [n, C, H, W] adapted to the model's input, on device; y [n]; dataset; classes; whether
    y are the model's own labels). The --n examples are read batch by batch (streamed from
    disk when large, data.STREAM_RULE) and held: n x C x H x W floats."""
    dataset = args.dataset or ckpt["dataset"]
    own_dataset = dataset == ckpt["dataset"]
    classes = ckpt["classes"]
    if args.classes or not own_dataset:
        classes = parse_classes(args.classes, DATASETS[dataset].num_classes)
    split = open_split(dataset, False, args.data_dir, classes, args.n,
                       download=not args.no_download)
    batches = iterate_batches(split, args.batch_size, ckpt["in_channels"], ckpt["image_size"],
                              device, args.workers)
    x, y = map(torch.cat, zip(*batches))
    # True labels are the model's labels only on its own classes: else no empirical Fisher.
    own_labels = own_dataset and list(classes) == list(ckpt["classes"])
    return x, y, dataset, classes, own_labels


def measure(model, x, y, args, exact, clock):
    """Per-example values {name: tensor [n]} of every quantity (y None: no empirical Fisher),
    and the weights' Fisher per layer {layer: [n]}; one seeded generator for all draws."""
    generator = torch.Generator().manual_seed(args.seed)
    label_samples = None if exact else args.label_samples
    arrays = {}
    arrays["weights_trace"], per_layer = fisher_trace_weights(
        model, x, chunk=args.chunk, generator=generator, label_samples=label_samples)
    clock.log(f"weights trace {arrays['weights_trace'].mean():.4g} "
              f"({'exact over classes' if exact else f'{args.label_samples} label draws'})")
    if y is not None:
        arrays["weights_trace_empirical"] = fisher_trace_weights(model, x, y, chunk=args.chunk)[0]
        clock.log(f"weights trace, empirical (true labels) "
                  f"{arrays['weights_trace_empirical'].mean():.4g}")

    # each estimator over batches of --batch-size, in order: the generator's draws are those of
    # one pass over the examples
    bs = args.batch_size
    arrays["input_trace"] = batched(
        lambda xb: input_fisher_trace(model, xb, label_samples, generator), x, bs)
    clock.log(f"input trace {arrays['input_trace'].mean():.4g}")
    arrays["input_lambda_max"], steps = batched(
        lambda xb: input_fisher_lambda_max(model, xb, args.power_iters, args.tol, generator), x, bs)
    clock.log(f"input lambda_max {arrays['input_lambda_max'].mean():.4g} "
              f"(Lanczos steps: {steps})")
    arrays["repr_trace"] = batched(
        lambda xb: repr_jacobian_frobenius(model, xb, args.probes, generator), x, bs)
    clock.log(f"representation trace {arrays['repr_trace'].mean():.4g}")
    arrays["repr_lambda_max"], steps = batched(
        lambda xb: repr_lambda_max(model, xb, args.power_iters, args.tol, generator), x, bs)
    with eval_mode(model), torch.no_grad():  # ||f(x)||^2
        arrays["repr_sqnorm"] = batched(lambda xb: model.features(xb).pow(2).sum(1), x, bs)
    clock.log(f"representation lambda_max {arrays['repr_lambda_max'].mean():.4g} "
              f"(Lanczos steps: {steps})")
    return arrays, per_layer


def main(args):
    clock = Clock()
    device = get_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt, device, **checkpoint_options(args))
    out = writable_dir(args.out if args.out is not None else ckpt_folder(args))
    x, y, dataset, classes, own_labels = load_examples(args, ckpt, device)
    num_classes, num_params = ckpt["num_classes"], sum(p.numel() for p in model.parameters())
    exact = num_classes <= EXACT_MAX_CLASSES
    if args.memory_mib is not None:
        directions = num_classes - 1 if exact else args.label_samples
        args.chunk = chunk_to_fit(args.memory_mib, directions, num_params, x.numel(), args.chunk)
        clock.log(f"chunk {args.chunk}: the weights' trace fits {args.memory_mib} MiB")
    clock.log(f"data {dataset} classes {classes}: {len(x)} test examples, model {ckpt['arch']} "
              f"eps {ckpt['eps']} {num_params} parameters on {device}")

    arrays, per_layer = measure(model, x, y if own_labels else None, args, exact, clock)
    result = {"n": len(x)}
    result["weights_trace_per_layer"] = {k: mean_se(v.cpu())[0] for k, v in per_layer.items()}
    result["weights_trace_per_layer_se"] = {k: mean_se(v.cpu())[1] for k, v in per_layer.items()}
    arrays = {k: v.double().cpu().numpy() for k, v in arrays.items()}
    for name, values in arrays.items():
        result[name], result[f"{name}_se"] = mean_se(values)
        atomic_save(out / f"fisher_{name}.npy", values)
    if not own_labels:  # the key stays, so every reader finds it
        result["weights_trace_empirical"] = result["weights_trace_empirical_se"] = None
    for name in ("repr_trace", "repr_lambda_max"):
        result[f"{name}_normalized"], result[f"{name}_normalized_se"] = ratio_mean_se(
            arrays[name], arrays["repr_sqnorm"])
    expectation = "exact" if exact else f"{args.label_samples} samples"
    result.update(ckpt=str(args.ckpt), arch=ckpt["arch"], eps=ckpt["eps"], norm=ckpt["norm"],
                  dataset=dataset, classes=list(classes), num_classes=num_classes,
                  num_params=num_params, weights_expectation=expectation,
                  input_expectation=expectation,
                  repr_trace_method="exact" if model.head.in_features <= args.probes
                  else f"hutchinson {args.probes} probes",
                  seconds=clock.elapsed(), provenance=provenance(vars(args)))
    atomic_save(out / "fisher.json", result)
    clock.log(f"wrote {out / 'fisher.json'}")


if __name__ == "__main__":
    with user_errors():
        main(get_args())
