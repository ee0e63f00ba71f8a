"""Performance of each stage against its ideal or a naive baseline, as ratios (a script, not a
test), the paper preset's projected hours on one H200, and on an accelerator its measured
rates and hours.

    python tests/bench.py            # full run, a few minutes on two CPU cores
    python tests/bench.py --quick    # smaller sizes, under a minute (run by the test suite)
    python tests/bench.py --projection-only   # the H200 projection and its inputs alone
    python tests/bench.py --bf16-attacks   # attacks under bf16 autocast vs float32
    python tests/bench.py --apgd-working-batch   # APGD with fooled examples dropped vs today
    python tests/bench.py --study results/quick   # and the quick study's time split
    python tests/bench.py --device cuda --device-only   # GPU rows, the paper preset's hours
    python tests/bench.py --quick --device cpu --device-only   # their code on a tiny model

Prints Markdown tables. Ratios compare two timings taken on the same inputs in the same
process (medians over repeats after a warm-up), so they stay meaningful on a noisy machine.
The projection on one H200 adds the paper preset's work, its FLOPs counted here
(count_flops), at stated assumptions (fraction of the dense peak, host round trip, CUDA
start-up) and with the host reads measured here. The device rows (--device; CUDA by default
where present) time the PGD-7 training step of the CIFAR ResNet-18 in float32, bf16
autocast, bf16 + channels_last, as several processes at once (run_all.sh's JOBS_PER_GPU) and
under torch.compile, with the fraction of the device's dense bf16 peak they reach, time the
other stages of the paper preset, and project the hours of `bash run_all.sh paper` from these
rates and the preset's settings, read from run_all.sh.
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the scripts, and test_fisher's loop
import advtrain  # noqa: E402
import data  # noqa: E402
import fisher  # noqa: E402
import invert  # noqa: E402
import models  # noqa: E402
import transfer  # noqa: E402


def median_time(fn, repeats, warmup=1):
    """Median wall time of fn() in seconds over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fashion_mnist(n, train=True, classes=(0, 1, 2, 3, 4)):
    return data.load_split("fashion-mnist", train, classes=list(classes), size=n, download=False)


def model_for(arch, num_classes=5):
    torch.manual_seed(0)
    if arch == "cnn":
        return models.build_model("cnn", num_classes, 1, 28, (0.286,), (0.353,))
    return models.build_model("resnet18", num_classes, 3, 32, (0.5,) * 3, (0.25,) * 3)


def bench_adversarial_step(arch, k, batch, repeats):
    """Time of one PGD-k training step / ((k + 1) x one standard step). Ideal < 1: the k
    attack steps need input gradients only (no weight gradients, no optimizer step)."""
    model = model_for(arch)
    if arch == "cnn":
        x, y = fashion_mnist(batch)
    else:
        x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 5, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step(eps, steps):
        return lambda: advtrain.train_epoch(model, opt, x, y, batch_size=batch, norm="l2", eps=eps,
                                            steps=steps)

    standard = median_time(step(0.0, 0), repeats)
    adversarial = median_time(step(0.5, k), repeats)
    return standard, adversarial, adversarial / ((k + 1) * standard)


def trained_cnn(n=5000, epochs=1):
    """A cnn trained (standard) on Fashion-MNIST 0-4 for the stages that need sensible features."""
    model = model_for("cnn")
    x, y = fashion_mnist(n)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    steps = epochs * -(-n // 128)
    for epoch in range(epochs):
        advtrain.train_epoch(model, opt, x, y, batch_size=128, eps=0.0, steps=0,
                             step0=epoch * (steps // epochs),
                             lr_schedule=lambda step: advtrain.lr_at(step, steps, 0.05))
    return model.eval()


def nngeometry_trace(model, x):
    """tr F_w by nngeometry's diagonal FIM (the true Fisher, k - 1 backward passes per
    example), or None when nngeometry is not importable (it is not a dependency)."""
    try:
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag
    except ImportError:
        return None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    return FIM(model, loader, PMatDiag, variant="classif_logits", device="cpu").trace().item()


def bench_fisher(model, n, repeats):
    """Weights trace: ours (k - 1 vjps per example, vmap(jacrev)) vs one vjp per class (the
    same vmap with e_y - p directions), the per-example Python loop of the tests, and
    nngeometry's diagonal FIM when importable; same data, one thread. Returns {name: (seconds,
    trace)}."""
    from test_fisher import loop_grad_sqnorms
    x, _ = fashion_mnist(n, train=False)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    k = probs.shape[1]

    def per_class():  # E_y ||J^T (e_y - p)||^2 with one vjp per class
        directions = torch.eye(k)[None] - probs[:, None, :]
        sq = sum(fisher.logit_vjp_sqnorms(model, x, directions).values())
        return (probs * sq).sum(1)

    def loop():
        return (probs * sum(loop_grad_sqnorms(model, x).values())).sum(1)

    results = {}
    for name, fn in (("ours, k - 1 vjps", lambda: fisher.fisher_trace_weights(model, x)[0]),
                     ("one vjp per class", per_class), ("per-example loop", loop)):
        seconds = median_time(fn, repeats if name != "per-example loop" else 1)
        results[name] = (seconds, fn().mean().item())
    if nngeometry_trace(model, x[:8]) is not None:
        results["nngeometry PMatDiag"] = (median_time(lambda: nngeometry_trace(model, x), repeats),
                                          nngeometry_trace(model, x))
    power = median_time(lambda: fisher.input_fisher_lambda_max(model, x), repeats)
    return results, power / n


def bench_channels_last(batch, repeats):
    """Time of a PGD-3 training step of the cnn in channels_last / contiguous layout."""
    x, y = fashion_mnist(batch)
    times = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = model_for("cnn").to(memory_format=layout)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        times.append(median_time(lambda: advtrain.train_epoch(
            model, opt, x, y, batch_size=batch, eps=0.5, steps=3,
            channels_last=layout == torch.channels_last), repeats))
    return times


def study_split(results_dir):
    """The study's wall time and its split by stage and seed, from run_all.sh's steps.tsv
    (cell, step, seconds per step; `total study` is the wall time)."""
    text = (Path(results_dir) / "steps.tsv").read_text()
    lines = [line.split("\t") for line in text.splitlines()]
    wall = sum(int(s) for cell, step, s in lines if cell == "total")
    stages, seeds = {}, {}
    for cell, step, seconds in lines:
        if cell == "total":
            continue
        stage = {"metrics": "train"}.get(step, step)
        stages[stage] = stages.get(stage, 0) + int(seconds)
        seed = cell.rpartition("_seed")[2] if "_seed" in cell else cell
        seeds[seed] = seeds.get(seed, 0) + int(seconds)
    return wall, stages, seeds


def sgd_linear_head(model, x, y, x_test, y_test, epochs, batch=128, lr=0.1):
    """The common practice: a linear head trained by SGD on the frozen network, which runs
    forward over the training images every epoch. Returns test accuracy."""
    head = torch.nn.Linear(model.head.in_features, int(y.max()) + 1)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            with torch.no_grad():
                feats = model.features(x[idx])
            loss = torch.nn.functional.cross_entropy(head(feats), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return (head(model.features(x_test)).argmax(1) == y_test).float().mean().item()


def bench_transfer(model, n_train, sgd_epochs):
    """L-BFGS probe on features extracted once vs SGD on the frozen network (same data)."""
    x, y = fashion_mnist(n_train, classes=(5, 6, 7, 8, 9))
    x_test, y_test = fashion_mnist(1000, train=False, classes=(5, 6, 7, 8, 9))
    t = time.perf_counter()
    with torch.no_grad():
        f_train, f_test = model.features(x), model.features(x_test)
    probe = transfer.linear_probe(f_train, y, f_test, y_test)
    probe_time = time.perf_counter() - t
    t = time.perf_counter()
    sgd_acc = sgd_linear_head(model, x, y, x_test, y_test, sgd_epochs)
    return probe_time, probe["acc"], time.perf_counter() - t, sgd_acc


def bench_few_shot_and_finetune(model, shots, n_finetune, repeats):
    """Seconds of one few-shot probe draw (rule 4: the penalty fixed per K) on
    the cnn's 784-d features, and of transfer.finetune on n_finetune images (2 epochs, as
    docs/PERFORMANCE.md records), evaluated on 1000 test images."""
    x, y = fashion_mnist(5000, classes=(5, 6, 7, 8, 9))
    x_test, y_test = fashion_mnist(1000, train=False, classes=(5, 6, 7, 8, 9))
    with torch.no_grad():
        f_train, f_test = model.features(x), model.features(x_test)
    few = {k: median_time(lambda: transfer.few_shot_probe(f_train, y, f_test, y_test, k, draws=1),
                          repeats)
           for k in shots}
    finetune = median_time(lambda: transfer.finetune(model, x[:n_finetune], y[:n_finetune],
                                                     (x_test, y_test), 1, 28, epochs=2),
                           repeats)
    return few, finetune


def bench_inversion(model, n, steps, repeats):
    """images x steps per second for each method of invert.py."""
    x0, _ = fashion_mnist(n, train=False)
    with torch.no_grad():
        z0 = model.features(x0)
    start = invert.grey_start(x0.shape, 0)
    rates = {}
    for method, kwargs in (("baseline", {}), ("noise-tv", dict(noise_std=0.05, tv_weight=0.1))):
        seconds = median_time(lambda: invert.invert_features(model, z0, start, steps, **kwargs),
                              repeats)
        rates[method] = n * steps / seconds
    return rates


# ----------------------------------------------------------------------------- device rows
# The paper preset's work on one accelerator (or, with --device cpu, the same code on a tiny
# model: the code path, not the numbers): the PGD-7 training step of the CIFAR ResNet-18 in
# images per second and as a fraction of the device's dense bf16 peak, the rates of the other
# stages, and from them the projected time of `bash run_all.sh paper`.

# Dense (without sparsity) bf16 tensor-core peak in TFLOPS, from the vendors' spec sheets, by a
# substring of torch.cuda.get_device_name(), first match first ("H100 PCIe" before "H100", "L40S"
# before "L4"). NVL variants run at other clocks: unknown, so only the absolute rate is given.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756), ("NVL", None), ("GH200", 989), ("H200", 989), ("H100", 989),
                    ("A100", 312), ("L40S", 362), ("L4", 121))

# Sizes of the datasets the paper preset reads: (training images, test images).
SPLIT_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032),
               "fashion-mnist": (60000, 10000), "mnist": (60000, 10000)}


def paper_preset(run_all=HERE.parent / "run_all.sh"):
    """`bash run_all.sh paper` as run_all.sh sets it: its arrays (GRID, TRAIN, JUDGE, TARGETS,
    FISHER, INVERT, before the smoke's) read from the script and parsed by the scripts' own
    argument parsers, so that their defaults count too; the preset's SEEDS default."""
    import re
    import shlex
    from common import parse_eps
    text = run_all.read_text()
    block = text[text.index("\n  paper)\n"):]
    block = block[:block.index("\n    if [[")]  # the smoke's settings follow
    arrays = {name: shlex.split(body) for name, body in re.findall(r"(\w+)=\(([^)]*)\)", block)}
    seeds = re.search(r'PRESET_SEEDS="([^"]*)"', block).group(1).split()
    ckpt = ["--ckpt", "model.pt"]
    train = advtrain.get_args(arrays["TRAIN"])
    judge = advtrain.get_args(arrays["TRAIN"] + arrays["JUDGE"])
    targets = transfer.get_args(ckpt + arrays["TARGETS"])
    inversion = invert.get_args(ckpt + arrays["INVERT"])
    fisher_args = fisher.get_args(ckpt + arrays["FISHER"])
    return dict(
        grid=[(norm, parse_eps(eps)) for norm, eps in map(str.split, arrays["GRID"])],
        seeds=len(seeds), judge=(judge.norm, judge.eps), epochs=train.epochs, steps=train.steps,
        batch=train.batch_size, eval_batch=train.eval_batch_size or train.batch_size,
        train_images=SPLIT_SIZES[train.dataset][0], test_images=SPLIT_SIZES[train.dataset][1],
        eval_radii=train.eval_eps, eval_steps=train.eval_steps, eval_attack=train.eval_attack,
        eval_restarts=train.eval_restarts, fisher_n=fisher_args.n,
        fisher_iters=fisher_args.power_iters, fisher_probes=fisher_args.probes,
        targets={t: (*SPLIT_SIZES[t], data.DATASETS[t].num_classes) for t in targets.target},
        shots=targets.shots, draws={k: transfer.draws_for(targets.draws, k) for k in targets.shots},
        finetune_size=targets.finetune_size, finetune_epochs=targets.finetune_epochs,
        invert_images=inversion.n_images, invert_steps=inversion.steps,
        invert_methods=len(inversion.method), invert_noise=inversion.n_noise)


# attack runs per example at evaluation; apgd: APGD-CE, then APGD-DLR towards 3 other classes
APGD_RUNS = {"apgd": 4, "apgd-ce": 1, "pgd": 1}


def peak_bf16_tflops(device_name):
    """The dense bf16 peak of a device by its name (BF16_PEAK_TFLOPS), or None when unknown."""
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in device_name), None)


def cifar_resnet18(device, width=64, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    ds = data.DATASETS["cifar10"]
    net = models.build_model("resnet18", 10, 3, 32, ds.mean, ds.std, width=width)
    return net.to(device, memory_format=memory_format)


def count_flops(fn):
    """(fn(), its model FLOPs) by torch.utils.flop_counter's rules (convolutions and matrix
    products; a multiply-add is 2 FLOPs), counted as the CPU runs fn. FlopCounterMode's own
    module hooks fail under the Lanczos' nested autograd, so its rules are applied here."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            rule = flop_registry.get(func._overloadpacket)
            if rule is not None:
                self.flops += rule(*args, **kwargs, out_val=out)
            return out

    with Count() as counter:
        result = fn()
    return result, counter.flops


def training_step_flops(width, steps, batch=2):
    """Model FLOPs per image of one PGD-`steps` training step of the CIFAR ResNet-18 (Linf
    8/255), counted on the CPU (count_flops): each attack step is a forward and a backward
    pass to the input only (no weight gradients), the training step a forward and a full
    backward. Returns (total, attack step, training forward-backward, forward) per image."""
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    counts = []
    for k in (steps, 0):
        model = cifar_resnet18("cpu", width)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        counts.append(count_flops(lambda: advtrain.train_epoch(
            model, opt, x, y, batch_size=batch, norm="linf", eps=8 / 255 if k else 0.0,
            steps=k))[1] / batch)
    model = cifar_resnet18("cpu", width).eval()
    with torch.no_grad():
        forward = count_flops(lambda: model(x))[1] / batch
    total, standard = counts
    return total, (total - standard) / steps, standard, forward


def fisher_flops(width, iters, probes):
    """FLOPs per example of fisher.py's estimators at its settings (one example, counted on the
    CPU): the weights' trace (exact over the 10 classes, and empirical), the input trace,
    Hutchinson's `probes` and the two Lanczos runs at their cap of `iters` steps (each step
    counted from runs of 2 and 4 steps), so an upper bound: Lanczos stops at its tolerance."""
    model = cifar_resnet18("cpu", width).eval()
    x = torch.rand(1, 3, 32, 32)

    def flops(fn):
        return count_flops(fn)[1]

    def lanczos(estimator):
        runs = [flops(lambda: estimator(model, x, n, 1e-30, torch.Generator().manual_seed(0)))
                for n in (2, 4)]
        return runs[0] + (iters - 2) * (runs[1] - runs[0]) / 2

    return (flops(lambda: fisher.fisher_trace_weights(model, x))
            + flops(lambda: fisher.fisher_trace_weights(model, x, torch.tensor([0])))
            + flops(lambda: fisher.input_fisher_trace(model, x))
            + flops(lambda: fisher.repr_jacobian_frobenius(model, x, probes,
                                                           torch.Generator().manual_seed(0)))
            + lanczos(fisher.input_fisher_lambda_max) + lanczos(fisher.repr_lambda_max))


def synced(fn, device):
    """fn followed by a wait for the device's queued work, so that wall time measures it."""
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def training_rate(device, width, batch, n_batches, steps, amp, channels_last, compiled, repeats):
    """Images per second of train_epoch on random CIFAR-shaped data held on the device: PGD
    (Linf 8/255, `steps` steps; 0 = standard training), bf16 autocast (amp), channels_last,
    torch.compile'd (compiled) or not. The first epoch (warm-up, compilation) is not timed."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = cifar_resnet18(device, width, layout)
    net = torch.compile(model) if compiled else model
    opt = models.make_optimizer(model, 0.01)
    x = torch.rand(n_batches * batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    epoch = synced(lambda: advtrain.train_epoch(
        net, opt, x, y, batch_size=batch, norm="linf", eps=8 / 255 if steps else 0.0, steps=steps,
        amp=amp, channels_last=channels_last), device)
    return len(x) / median_time(epoch, repeats)


def concurrent_training_rate(device, width, batch, steps, amp, jobs, seconds):
    """Images per second of `jobs` processes training at once on one device (as run_all.sh
    runs JOBS_PER_GPU jobs on a GPU), summed: each (train_worker) trains a CIFAR ResNet-18 on
    random data, PGD-`steps` (Linf 8/255), channels_last, amp, and counts the images of the
    epochs it runs in a common window of `seconds`, which opens once all have started."""
    import subprocess
    start_at = time.time() + (15 if device.type == "cuda" else 10) + 2 * jobs
    cmd = [sys.executable, __file__, "--train-worker", str(device), str(width), str(batch),
           str(steps), str(int(amp)), str(start_at), str(seconds)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    outs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"a training worker failed: {outs}")
    return sum(float(out.split()[-1]) for out in outs)


def train_worker(device, width, batch, steps, amp, start_at, seconds):
    """concurrent_training_rate's process: prints the images per second of the whole epochs
    (8 batches each) it trains between start_at and start_at + seconds (time.time())."""
    device = torch.device(device)
    torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True  # as advtrain.py trains
    model = cifar_resnet18(device, width, torch.channels_last)
    opt = models.make_optimizer(model, 0.01)
    x = torch.rand(8 * batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    epoch = synced(lambda: advtrain.train_epoch(model, opt, x, y, batch_size=batch, norm="linf",
                                                eps=8 / 255 if steps else 0.0, steps=steps,
                                                amp=amp, channels_last=True), device)
    epoch()  # warm-up (cuDNN's choices, the allocator)
    while time.time() < start_at:
        epoch()
    images, t = 0, time.time()
    while time.time() < start_at + seconds or images == 0:
        epoch()
        images += len(x)
    print(f"rate {images / (time.time() - t)}", flush=True)


def apgd_rate(device, width, batch, steps):
    """Image-steps per second of APGD-CE (the evaluation's attack; float32, as advtrain.py
    evaluates) on a batch of random CIFAR-shaped images."""
    model = cifar_resnet18(device, width).eval()
    x = torch.rand(batch, 3, 32, 32, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)  # every example starts correct: APGD attacks all of them
    # a radius too small to fool: a fooled example leaves APGD's working batch, and this is
    # the rate per image-step of the examples that stay (the time of a robust model's)
    run = synced(lambda: advtrain.apgd_single(model, x, y, "linf", 1e-4, steps), device)
    return batch * steps / median_time(run, 1)


def fisher_seconds_per_example(device, width, n, iters=100):
    """Seconds per example of fisher.py's estimators with its defaults (chunk 64, batches of 64,
    Lanczos up to `iters` = 100 steps, 16 Hutchinson probes), on n random CIFAR-shaped images.
    One call, its set-up included."""
    model = cifar_resnet18(device, width).eval()
    x = torch.rand(n, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (n,), device=device)

    def run():
        g = torch.Generator().manual_seed(0)
        fisher.fisher_trace_weights(model, x, chunk=64)
        fisher.fisher_trace_weights(model, x, y, chunk=64)
        for i in range(0, n, 64):
            xb = x[i:i + 64]
            fisher.input_fisher_trace(model, xb)
            fisher.input_fisher_lambda_max(model, xb, iters, 1e-4, g)
            fisher.repr_jacobian_frobenius(model, xb, 16, g)
            fisher.repr_lambda_max(model, xb, iters, 1e-4, g)
    return median_time(synced(run, device), 1, warmup=0) / n


def transfer_rates(device, width, n_extract, n_probe, shots):
    """(images per second of extract_features at transfer.py's batch 128, grayscale 28-px images
    held on the CPU and adapted on the device; (seconds of one linear probe on 5/6 of n_probe
    features of the model's dimension, 10 classes, that number of features); {K: seconds of one
    draw of few_shot_probe for K in shots}), probes fitted on the device as transfer.py does."""
    model = cifar_resnet18(device, width).eval()
    x = torch.rand(n_extract, 1, 28, 28)
    split = (x, torch.zeros(len(x), dtype=torch.long))
    extract = synced(lambda: transfer.extract_features(model, split, 3, 32, 128), device)
    rate = n_extract / median_time(extract, 1)
    g = torch.Generator().manual_seed(0)
    dim = model.head.in_features
    labels = torch.arange(n_probe) % 10
    feats = torch.randn(10, dim, generator=g)[labels] + 3 * torch.randn(n_probe, dim, generator=g)
    feats = feats.to(device)
    labels = labels.to(device)
    split = n_probe * 5 // 6
    args = (feats[:split], labels[:split], feats[split:], labels[split:])
    probe = median_time(synced(lambda: transfer.linear_probe(*args), device), 1, warmup=0)
    few = {k: median_time(synced(lambda: transfer.few_shot_probe(*args, k, draws=1), device), 1,
                          warmup=0) for k in shots}
    return rate, (probe, split), few


def inversion_rate(device, width, n, steps, noise):
    """Image-steps per second of invert_features (noise: the noise-averaged objective)."""
    model = cifar_resnet18(device, width).eval()
    x0 = torch.rand(n, 3, 32, 32, device=device)
    with torch.no_grad():
        z0 = model.features(x0)
    start = invert.grey_start(x0.shape, 0).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    noise_std = 0.05 if noise else 0.0
    run = synced(lambda: invert.invert_features(model, z0, start, steps, noise_std=noise_std,
                                                generator=gen), device)
    return n * steps / median_time(run, 1)


def process_start_seconds(device):
    """Seconds for a fresh Python to import torch and reach the device (every step of
    run_all.sh is a process of its own)."""
    import subprocess
    t = time.perf_counter()
    code = f"import torch; torch.zeros(1, device='{device}')"
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def paper_cells(paper):
    """[(norm, eps, seed or 'judge')]: the trainings of the preset, its cells and the judge."""
    cells = [(norm, eps, seed) for seed in range(paper["seeds"]) for norm, eps in paper["grid"]]
    return cells + [(*paper["judge"], "judge")]


def eval_radii_count(paper):
    """Radii attacked over every training of the preset: its own radius (eps > 0) and the
    evaluation radii, each once per model (advtrain.evaluate attacks set(radii))."""
    return sum(sum(e > 0 for _, e in {(norm, eps), *paper["eval_radii"]})
               for norm, eps, _ in paper_cells(paper))


def paper_projection(paper, rates, jobs=1):
    """[(stage, work, seconds low, seconds high)] of `bash run_all.sh paper` on one GPU at the
    given rates (measured on a device, or flop_rates'). The GPU's work adds up: its jobs share
    it. What waits for the host instead (the probes' L-BFGS, process start-ups) overlaps with
    the GPU work of the other jobs, so those rows count 1 / `jobs` of their seconds (run_all.sh
    runs JOBS_PER_GPU jobs per GPU). The evaluation's APGD runs once (low: APGD-CE fools every
    example it can) to 4 times (high: no run fools any) on every test image at every radius,
    as rates["apgd"] measures APGD-CE."""
    p = paper
    cells = paper_cells(p)
    robust = sum(eps > 0 for _, eps, _ in cells)
    standard = len(cells) - robust
    measured = len(cells) - 1  # the judge is trained, not measured
    images = p["epochs"] * p["train_images"]
    radii = eval_radii_count(p)
    eval_steps = radii * p["test_images"] * p["eval_steps"] * p["eval_restarts"]
    runs = APGD_RUNS[p["eval_attack"]]
    extract = sum(tr + te for tr, te, _ in p["targets"].values())
    # a probe's cost grows with the features, a few-shot probe's with the classes
    probe_seconds, probe_n = rates["probe"]
    per_draw = rates["few_shot"]
    few = sum(per_draw.get(k, max(per_draw.values())) * d for k, d in p["draws"].items())
    probes = sum(probe_seconds * tr / probe_n + few * k / 10 for tr, _, k in p["targets"].values())
    finetune = p["finetune_size"] * p["finetune_epochs"] * len(p["targets"])
    inversion = p["invert_images"] * p["invert_steps"] * p["invert_methods"]
    processes = len(cells) + 3 * measured + 2  # + report.py's declaration and report
    shared = f", 1/{jobs} (overlaps the other jobs)" if jobs > 1 else ""
    rows = [
        (f"training, {robust} robust models (PGD-{p['steps']}, bf16, channels_last, "
         f"batch {p['batch']})", f"{robust} x {p['epochs']} epochs x {p['train_images']} images",
         robust * images / rates["pgd"]),
        (f"training, {standard} models at eps 0", f"{standard} x {images} images",
         standard * images / rates["standard"]),
        (f"evaluation, {p['eval_attack']} {p['eval_steps']} steps at {radii} radii over the "
         f"models (float32, batch {p['eval_batch']})",
         f"{radii} x {p['test_images']} images x {p['eval_steps']} steps x {p['eval_restarts']} "
         f"restarts x 1 to {runs} runs",
         (eval_steps / rates["apgd"], runs * eval_steps / rates["apgd"])),
        (f"Fisher, {measured} models", f"{measured} x {p['fisher_n']} examples",
         measured * p["fisher_n"] * rates["fisher"]),
        ("transfer: features", f"{measured} x {extract} target images",
         measured * extract / rates["extract"]),
        (f"transfer: probes and few-shot probes{shared}",
         f"{measured} x {len(p['targets'])} targets", measured * probes / jobs),
        ("transfer: fine-tuning (float32, batch 128)", f"{measured} x {finetune} images",
         measured * finetune / rates["finetune"]),
        ("inversion", f"{measured} x {p['invert_images']} images x {p['invert_steps']} steps x "
         f"{p['invert_methods']} methods", measured * inversion / rates["inversion"]),
        (f"process start-ups{shared}", f"{processes} processes", processes * rates["start"] / jobs)]
    return [(stage, work, *(s if isinstance(s, tuple) else (s, s))) for stage, work, s in rows]


# ----------------------------------------------------------------------------- projection
# One H200 (the paper preset's target) from FLOP counts, before any GPU is rented: the work is
# counted here (count_flops), the host's share measured here, and what only a GPU can say is
# assumed, in the open: tests/bench.py --device cuda replaces every assumption by a rate.

# dense TFLOPS: bf16 on the tensor cores; float32 with TF32 off (models.full_float32) on the
# CUDA cores, 67 (NVIDIA's H200 SXM sheet), not TF32's 494; JOBS_PER_GPU
H200 = {"name": "NVIDIA H200", "bf16": 989, "fp32": 67, "jobs": 4}
# The assumptions: the fraction of its dense peak that each kind of work reaches on the GPU
# (bf16 training; float32 work: evaluation, Fisher, features, fine-tuning, inversion), the
# time of one host read that waits for the device (its queue drained, a copy back), and a
# process's CUDA start-up beyond importing torch.
ASSUMED = {"fraction": 0.30, "round_trip": 20e-6, "cuda_start": 3.0}


def host_inputs(quick):
    """What the host costs, measured here with the code the GPU runs: host reads per training
    step (tests/test_device.py's host_reads), host reads per L-BFGS iteration of the probes'
    fit_logistic (synthetic clustered features [n, 512], 10 classes; n 1000 with quick, else
    5000), and seconds of a process's start-up (import torch)."""
    from test_device import host_reads
    torch.manual_seed(0)
    model = model_for("cnn")
    opt = models.make_optimizer(model, 0.01)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 5, (16,))

    def epoch(n):
        return host_reads(lambda: advtrain.train_epoch(model, opt, x[:n], y[:n], batch_size=8,
                                                       eps=0.1, steps=1))[1]

    n = 1000 if quick else 5000
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    feats = torch.randn(10, 512, generator=g)[labels] + 3 * torch.randn(n, 512, generator=g)
    fit, reads = host_reads(lambda: transfer.fit_logistic(feats, labels, 1e-3, 10))
    return {"step_reads": epoch(16) - epoch(8), "lbfgs_reads": reads / fit["iterations"],
            "start": process_start_seconds(torch.device("cpu"))}


def flop_rates(flops, inputs, gpu=H200, assumed=ASSUMED, max_iter=1000):
    """paper_projection's rates on `gpu` from FLOPs per unit (stage_flops) at the assumed
    fraction of its dense peaks; the probes from the host reads per L-BFGS iteration measured
    here (host_inputs) at the assumed round trip each, every fit at its cap of `max_iter`
    iterations (an upper bound: a probe is 4 penalties and a refit, of about 60000 training
    features; a few-shot draw one fit)."""
    bf16 = assumed["fraction"] * gpu["bf16"] * 1e12
    fp32 = assumed["fraction"] * gpu["fp32"] * 1e12
    fit = max_iter * inputs["lbfgs_reads"] * assumed["round_trip"]
    return {"pgd": bf16 / flops["pgd"], "standard": bf16 / flops["standard"],
            "apgd": fp32 / flops["attack"], "fisher": flops["fisher"] / fp32,
            "extract": fp32 / flops["forward"], "finetune": fp32 / flops["standard"],
            "inversion": fp32 / flops["attack"], "probe": (5 * fit, 60000),
            "few_shot": {None: fit}, "start": inputs["start"] + assumed["cuda_start"]}


def stage_flops(paper, width=64):
    """FLOPs per unit of each stage of the paper preset's model, counted here: {pgd, standard,
    attack, forward: per image (training_step_flops), fisher: per example (fisher_flops)}."""
    pgd, attack, standard, forward = training_step_flops(width, paper["steps"])
    return {"pgd": pgd, "standard": standard, "attack": attack, "forward": forward,
            "fisher": fisher_flops(width, paper["fisher_iters"], paper["fisher_probes"])}


def print_h200_projection(quick):
    """The paper preset's projected hours on one H200 from FLOP counts, the inputs measured
    here and the assumptions, each printed."""
    torch.set_num_threads(1)
    paper = paper_preset()
    flops = stage_flops(paper)
    inputs = host_inputs(quick)
    print("\nprojection inputs measured here (FLOPs counted as the CPU runs the code):")
    print("| input | value |\n|---|---|")
    for name, value in flops.items():
        unit = "example" if name == "fisher" else "image" if name != "attack" else "image-step"
        print(f"| FLOPs, {name} | {value / 1e9:.3g} GFLOP per {unit} |")
    print(f"| host reads per training step (in the batch loop) | {inputs['step_reads']} |")
    print(f"| host reads per L-BFGS iteration of a probe (torch.optim.LBFGS) | "
          f"{inputs['lbfgs_reads']:.1f} |")
    print(f"| process start-up here (import torch) | {inputs['start']:.1f} s |")
    gpu, assumed = H200, ASSUMED
    print(f"\nassumed on one {gpu['name']} (dense peaks bf16 {gpu['bf16']}, float32 {gpu['fp32']} "
          f"TFLOPS): {assumed['fraction']:.0%} of the peak, {assumed['round_trip'] * 1e6:.0f} us "
          f"per host read, {assumed['cuda_start']:.0f} s of CUDA start-up per process, "
          f"{gpu['jobs']} jobs per GPU")
    rows = paper_projection(paper, flop_rates(flops, inputs), gpu["jobs"])
    low, high = sum(r[2] for r in rows) / 3600, sum(r[3] for r in rows) / 3600
    print(f"\nprojected `bash run_all.sh paper` on one {gpu['name']} from FLOP counts: {low:.2f} "
          f"to {high:.2f} hours\n\n| stage | work | hours |\n|---|---|---|")
    for stage, work, s_low, s_high in rows:
        hours = f"{s_low / 3600:.2f}" + (f" to {s_high / 3600:.2f}" if s_low != s_high else "")
        print(f"| {stage} | {work} | {hours} |")
    print(f"| total | | {low:.2f} to {high:.2f} |", flush=True)


# Sizes of the device section: on CUDA the paper's model and batches (None: the preset's batch
# size, or shots); on the CPU (--device cpu) a tiny model, one batch, few steps: the code path
# in seconds, not a measurement.
DEVICE_SIZES = {
    "cuda": dict(width=64, big=512, small=None, apgd_batches=(None, 1024), apgd_steps=20,
                 fisher_n=64, fisher_iters=100, extract=10000, probe=60000, shots=None, invert_n=32,
                 invert_steps=20),
    "tiny": dict(width=8, big=8, small=4, apgd_batches=(4,), apgd_steps=2, fisher_n=1,
                 fisher_iters=5, extract=64, probe=120, shots=(1,), invert_n=4, invert_steps=2)}


class DeviceBench(NamedTuple):
    """What every device row needs: the device, its name and dense bf16 peak (TFLOPS or None),
    the preset (paper_preset), the sizes (DEVICE_SIZES), the FLOPs per image
    (training_step_flops), how many batches per timed epoch and timed repeats, and the jobs
    run_all.sh would run on it at once (JOBS_PER_GPU)."""
    device: torch.device
    name: str
    peak: Optional[float]
    paper: dict
    size: dict
    flops: tuple
    n_batches: int
    reps: int
    jobs: int

    @property
    def small(self):  # the preset's batch size, or the tiny one
        return self.size["small"] or self.paper["batch"]

    def train_rate(self, batch, steps, amp, channels_last, compiled=False):
        """training_rate over the same number of images at every batch size."""
        n_batches = self.n_batches * self.size["big"] // batch
        return training_rate(self.device, self.size["width"], batch, n_batches, steps, amp,
                             channels_last, compiled, self.reps)

    def cell(self, measured, unit, flops):
        """(measured text, fraction of the peak text) of a rate with its FLOPs per unit."""
        achieved = measured * flops / 1e12
        return (f"{measured:,.0f} {unit}, {achieved:.3g} TFLOPS",
                f"{achieved / self.peak:.3f}" if self.peak else "")


def device_rows(device, quick, compile_rows="after"):
    """The device section: rows (stage, measured, fraction of the dense bf16 peak) and the
    projection of the paper preset, then (compile_rows "after"; "only": these alone; "skip":
    not) torch.compile's rows, last because compilation takes a minute."""
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True  # as advtrain.py trains and evaluates
    if not cuda:
        torch.set_num_threads(1)  # tiny work: on a shared CPU more threads only wait for each other
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    size = DEVICE_SIZES["cuda" if cuda else "tiny"]
    paper = paper_preset()
    flops = training_step_flops(size["width"], paper["steps"])
    # run_all.sh's JOBS_PER_GPU default: one job per 32 GiB of the GPU's memory
    jobs = max(1, torch.cuda.get_device_properties(device).total_memory // 2 ** 35) if cuda else 2
    bench = DeviceBench(device, name, peak_bf16_tflops(name) if cuda else None, paper, size, flops,
                        *((4, 3) if quick and cuda else (8, 5) if cuda else (1, 1)), jobs)
    total, attack, standard, forward = (f / 1e9 for f in flops)
    peak = f"{bench.peak} TFLOPS (vendor spec sheet)" if bench.peak else "unknown"
    tiny = "" if cuda else " (tiny: the code path only)"
    print(f"\ndevice {name}: dense bf16 peak {peak}; CIFAR ResNet-18 width {size['width']}{tiny}: "
          f"PGD-{paper['steps']} training step {total:.3g} GFLOPs per image (attack step "
          f"{attack:.3g}, training forward-backward {standard:.3g}, forward {forward:.3g}; "
          f"count_flops)", flush=True)
    if compile_rows != "only":
        rates = measure_device(bench)
        print_projection(bench, rates)
    if compile_rows != "skip":
        measure_compiled(bench)


def measure_device(bench):
    """Prints the device rows as they are measured, then their table; returns the rates the
    projection needs."""
    cuda, size, k = bench.device.type == "cuda", bench.size, bench.paper["steps"]
    width, big, small = size["width"], size["big"], bench.small
    total, attack, standard, forward = bench.flops
    rows, rates = [], {}

    def row(stage, measured, fraction=""):
        rows.append((stage, measured, fraction))
        print(f"  {rows[-1]}", flush=True)

    configs = [("float32", False, False), ("bf16 autocast", True, False),
               ("bf16 + channels_last", True, True)]
    for label, amp, channels_last in configs if cuda else configs[::2]:  # CPU bf16: emulated, slow
        row(f"PGD-{k} training step, batch {big}, {label}",
            *bench.cell(bench.train_rate(big, k, amp, channels_last), "images/s", total))
    bf16 = "bf16 + " if cuda else ""  # advtrain.py: bf16 autocast on CUDA only
    rates["pgd"] = bench.train_rate(small, k, cuda, True)
    preset = " (the paper preset)" if cuda else ""
    row(f"PGD-{k} training step, batch {small}{preset}, {bf16}channels_last (advtrain.py on CUDA)",
        *bench.cell(rates["pgd"], "images/s", total))
    jobs = bench.jobs
    aggregate = concurrent_training_rate(bench.device, width, small, k, cuda, jobs,
                                         seconds=10 if cuda else 3)
    row(f"PGD-{k} training step, batch {small}, {bf16}channels_last, {jobs} processes at once "
        f"(run_all.sh's JOBS_PER_GPU): their sum", *bench.cell(aggregate, "images/s", total))
    rates["pgd"] = max(rates["pgd"], aggregate)  # the study runs its jobs at once
    rates["standard"] = bench.train_rate(small, 0, cuda, True)
    row(f"standard training step (eps 0), batch {small}, {bf16}channels_last",
        *bench.cell(rates["standard"], "images/s", standard))
    rates["finetune"] = bench.train_rate(small, 0, False, False)
    row(f"fine-tuning step (standard, float32), batch {small}",
        *bench.cell(rates["finetune"], "images/s", standard))
    for batch in (b or bench.paper["eval_batch"] for b in size["apgd_batches"]):
        rate = apgd_rate(bench.device, width, batch, size["apgd_steps"])
        rates.setdefault("apgd", rate)  # the preset evaluates at its --eval-batch-size
        row(f"APGD-CE evaluation, float32, batch {batch}",
            *bench.cell(rate, "image-steps/s", attack))
    rates["fisher"] = fisher_seconds_per_example(bench.device, width, size["fisher_n"],
                                                 size["fisher_iters"])
    row("Fisher, fisher.py's estimators and defaults",
        f"{rates['fisher'] * 1e3:.1f} ms per example")
    rates["extract"], rates["probe"], rates["few_shot"] = transfer_rates(
        bench.device, width, size["extract"], size["probe"], size["shots"] or bench.paper["shots"])
    row("transfer: frozen features (28-px grayscale adapted on the device), batch 128",
        *bench.cell(rates["extract"], "images/s", forward))
    few = ", ".join(f"{shots}-shot {s:.2f} s" for shots, s in rates["few_shot"].items())
    row(f"transfer: linear probe on {rates['probe'][1]} x {8 * width} features, 10 classes; "
        f"few-shot probes, one draw", f"{rates['probe'][0]:.2f} s; {few}")
    for noise in (False, True):
        rate = inversion_rate(bench.device, width, size["invert_n"], size["invert_steps"], noise)
        rates["inversion"] = min(rate, rates.get("inversion", rate))
        objective = "noise-averaged" if noise else "plain"
        row(f"inversion, {size['invert_n']} images, {objective} objective",
            *bench.cell(rate, "image-steps/s", attack))
    rates["start"] = process_start_seconds(bench.device)
    row("process start-up (import torch, reach the device)", f"{rates['start']:.1f} s")

    print(f"\n| stage on {bench.name} | measured | fraction of dense bf16 peak |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return rates


def print_projection(bench, rates):
    projection = paper_projection(bench.paper, rates, bench.jobs)
    low, high = sum(r[2] for r in projection) / 3600, sum(r[3] for r in projection) / 3600
    tiny = " (tiny model: not the real cost)" if bench.device.type != "cuda" else ""
    print(f"\nprojected `bash run_all.sh paper` on one {bench.name}{tiny}: {low:.1f} to "
          f"{high:.1f} hours\n\n| stage | work | hours |\n|---|---|---|")
    for stage, work, s_low, s_high in projection:
        hours = f"{s_low / 3600:.2f}"
        if s_low != s_high:
            hours += f" to {s_high / 3600:.2f}"
        print(f"| {stage} | {work} | {hours} |")
    print(f"| total | | {low:.2f} to {high:.2f} |", flush=True)


def measure_compiled(bench):
    """torch.compile'd PGD training steps (bf16, channels_last) at both batch sizes; a failure
    to compile is reported in its row."""
    if bench.device.type != "cuda":
        print("\ntorch.compile: not tried on the CPU")
        return
    k = bench.paper["steps"]
    print(f"\n| torch.compile on {bench.name} | measured | fraction of dense bf16 peak |\n"
          f"|---|---|---|", flush=True)
    for batch in (bench.size["big"], bench.small):
        stage = f"PGD-{k} training step, batch {batch}, bf16 + channels_last + torch.compile"
        try:
            rate = bench.train_rate(batch, k, True, True, compiled=True)
            cells = bench.cell(rate, "images/s", bench.flops[0])
        except Exception as e:  # a compiler failure is a finding to report, not a crash
            cells = (f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", "")
        print(f"| {stage} | {' | '.join(cells)} |", flush=True)


# ----------------------------------------------------------------------------- bf16 attacks
# DESIGN.md, Precision: on CUDA the training attack runs under bf16 autocast only if it keeps
# its strength within 0.5 points of float32 at every radius of the paper grid. CPU autocast
# casts convolutions and matrix products to bf16 as CUDA's does, so this measures it here.
PAPER_RADII = (("l2", 0.25), ("l2", 0.5), ("l2", 1.0),
               ("linf", 2 / 255), ("linf", 4 / 255), ("linf", 8 / 255))
BF16_BOUND = 0.5  # points: DESIGN.md, Precision


def fashion_mnist_32x3(n, train):
    """Fashion-MNIST (10 classes) as 32x32 three-channel images, the shape of CIFAR-10."""
    x, y = data.load_split("fashion-mnist", train, size=n, download=False)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return x.clamp(0, 1).repeat(1, 3, 1, 1), y


def attack_precisions(device):
    """{name: a context manager factory} of the precisions an attack is computed in on device:
    float32 (TF32 off on CUDA, as models.get_device leaves it), bf16 autocast, and on CUDA
    TF32 (PyTorch's default for float32 convolutions and matrix products)."""
    import contextlib

    @contextlib.contextmanager
    def tf32():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            models.full_float32()
    precisions = {"float32": contextlib.nullcontext,
                  "bf16": lambda: torch.autocast(device.type, dtype=torch.bfloat16)}
    if device.type == "cuda":
        precisions["tf32"] = tf32
    return precisions


def bf16_attack_strength(n_train=4000, n_test=800, width=8, epochs=2, apgd_steps=20,
                         batch=128, norms=("l2", "linf"), device=torch.device("cpu")):
    """Rows (norm, eps, attack, {precision: acc}) for a resnet18 of `width` trained on device
    with PGD-7 (models.sgd_epoch, float32) at the middle radius of each norm of the paper grid,
    attacked at every radius of the grid by PGD-7 (the training attack's settings) and by
    APGD (apgd_steps steps, 3 targets) computed in each of attack_precisions(device), from the
    same random starts (the same seed before each); the adversarial examples are then judged
    in float32, so the difference is the attack's strength alone."""
    device = models.get_device(str(device))  # on CUDA: TF32 off
    x, y = (t.to(device) for t in fashion_mnist_32x3(n_train, True))
    x_test, y_test = (t.to(device) for t in fashion_mnist_32x3(n_test, False))
    precisions = attack_precisions(device)
    rows = []
    for norm in norms:
        radii = [eps for n, eps in PAPER_RADII if n == norm]
        torch.manual_seed(0)
        model = models.build_model("resnet18", 10, 3, 32, (0.286,) * 3, (0.353,) * 3,
                                   width=width).to(device)
        opt = models.make_optimizer(model, 0.1)
        steps = epochs * -(-n_train // batch)
        for epoch in range(epochs):
            advtrain.train_epoch(model, opt, x, y, batch_size=batch, norm=norm, eps=radii[1],
                                 steps=7, step0=epoch * (steps // epochs),
                                 lr_schedule=lambda step: advtrain.lr_at(step, steps, 0.1))
        model.eval()
        print(f"  resnet18 width {width} trained at {norm} {radii[1]:.4g} on {device}: clean "
              f"acc {advtrain.accuracy(model, x_test, y_test):.3f}", flush=True)
        attacks = {"PGD-7": lambda xb, yb, eps: advtrain.pgd_attack(model, xb, yb, norm, eps, 7),
                   f"APGD-{apgd_steps}": lambda xb, yb, eps: advtrain.apgd_attack(
                       model, xb, yb, norm, eps, apgd_steps)}
        for eps in radii:
            for name, attack in attacks.items():
                acc = {}
                for precision, computed_in in precisions.items():
                    correct = 0
                    for i in range(0, n_test, 250):
                        xb, yb = x_test[i:i + 250], y_test[i:i + 250]
                        torch.manual_seed(1 + i)
                        with computed_in():
                            xa = attack(xb, yb, eps)
                        with torch.no_grad():
                            correct += (model(xa).argmax(1) == yb).sum().item()
                    acc[precision] = correct / n_test
                rows.append((norm, eps, name, acc))
                print(f"  {rows[-1]}", flush=True)
    return rows


def print_bf16_attacks(rows):
    """The table of bf16_attack_strength's rows and, per attack and lower precision, the
    rule's verdict (at most BF16_BOUND points weaker than float32 at every radius)."""
    lower = [p for p in rows[0][3] if p != "float32"]
    print("\n| radius | attack | float32 acc | " + " | ".join(f"{p} acc" for p in lower)
          + " | " + " | ".join(f"{p} - float32 (points)" for p in lower) + " |\n|"
          + "---|" * (3 + 2 * len(lower)))
    worst = {}
    for norm, eps, name, acc in rows:
        radius = f"{norm} {round(eps * 255)}/255" if norm == "linf" else f"{norm} {eps:g}"
        # points; rounded so that 0.5 is not 0.5000001
        diffs = {p: round((acc[p] - acc["float32"]) * 100, 6) for p in lower}
        for p, diff in diffs.items():
            worst[name, p] = max(worst.get((name, p), diff), diff)
        print(f"| {radius} | {name} | {acc['float32']:.5f} | "
              + " | ".join(f"{acc[p]:.5f}" for p in lower) + " | "
              + " | ".join(f"{diffs[p]:+.2f}" for p in lower) + " |")
    for (name, precision), diff in worst.items():
        verdict = "met" if diff <= BF16_BOUND else "missed"
        print(f"{name}: {precision} weaker than float32 by at most {max(diff, 0):.2f} points at "
              f"every radius (bound {BF16_BOUND} points, DESIGN.md Precision): {verdict}")


def apgd_working_batch(n_train=2000, n_test=200, epochs=2, width=8, steps=50, repeats=1):
    """Rows (arch, training, radius, today's seconds, new seconds, today's robust acc, new
    robust acc, examples judged alike) of advtrain.apgd_attack (APGD-CE then 3 targeted
    APGD-DLR runs, `steps` steps each), where an example fooled within a run leaves the working
    batch, against today's algorithm kept in tests/test_advtrain.py (apgd_reference), on the
    same n_test test images from the same seed. Models: the cnn on Fashion-MNIST 0-4 and a
    resnet18 of `width` on Fashion-MNIST at 32x32x3, each trained `epochs` epochs on n_train
    images standard and with PGD-3 at the radius it is attacked at (l2 0.5 for the cnn, the
    quick preset's; linf 8/255 for the resnet18, the paper's)."""
    from test_advtrain import apgd_reference
    rows = []
    for arch, norm, eps in (("cnn", "l2", 0.5), ("resnet18", "linf", 8 / 255)):
        if arch == "cnn":
            (x, y), (x_test, y_test) = fashion_mnist(n_train), fashion_mnist(n_test, False)
        else:
            (x, y), (x_test, y_test) = fashion_mnist_32x3(n_train, True), fashion_mnist_32x3(
                n_test, False)
        for training, train_eps in (("standard", 0.0), ("robust", eps)):
            torch.manual_seed(0)
            if arch == "cnn":
                model = model_for("cnn")
            else:
                model = models.build_model("resnet18", 10, 3, 32, (0.286,) * 3, (0.353,) * 3,
                                           width=width)
            opt = models.make_optimizer(model, 0.05)
            total = epochs * -(-n_train // 128)
            for epoch in range(epochs):
                advtrain.train_epoch(model, opt, x, y, batch_size=128, norm=norm, eps=train_eps,
                                     steps=3 if train_eps else 0, step0=epoch * (total // epochs),
                                     lr_schedule=lambda step: advtrain.lr_at(step, total, 0.05))
            model.eval()
            timed, judged = {}, {}
            for name, attack in (("today", apgd_reference), ("new", advtrain.apgd_attack)):
                def run():
                    torch.manual_seed(1)
                    judged[name] = attack(model, x_test, y_test, norm, eps, steps)
                timed[name] = median_time(run, repeats, warmup=0)
                with torch.no_grad():
                    judged[name] = model(judged[name]).argmax(1) == y_test
            radius = f"{norm} {round(eps * 255)}/255" if norm == "linf" else f"{norm} {eps:g}"
            rows.append((arch, training, radius, timed["today"], timed["new"],
                         judged["today"].float().mean().item(), judged["new"].float().mean().item(),
                         int((judged["today"] == judged["new"]).sum())))
            print(f"  {rows[-1]}", flush=True)
    return rows, n_test, steps


def print_apgd_working_batch(result):
    rows, n_test, steps = result
    print(f"\nAPGD-{steps} (CE, then 3 targeted DLR runs), {n_test} test images, "
          f"{torch.get_num_threads()} threads: fooled examples leave the working batch vs today"
          "\n\n| model | radius | today | new | new / today | robust acc today | robust acc new |"
          " examples judged alike |\n|---|---|---|---|---|---|---|---|")
    for arch, training, radius, today, new, acc_today, acc_new, alike in rows:
        print(f"| {arch} {training} | {radius} | {today:.1f} s | {new:.1f} s | {new / today:.2f} |"
              f" {acc_today:.3f} | {acc_new:.3f} | {alike}/{n_test} |")
    worst = max(new / today for arch, training, _, today, new, *_ in rows if training == "robust")
    same = all(alike == n_test for *_, alike in rows)
    print(f"\nrobust models: new / today at most {worst:.2f} (target <= 0.7) at "
          f"{'identical' if same else 'DIFFERENT'} robust accuracy: "
          f"{'met' if worst <= 0.7 and same else 'missed'}")


# ----------------------------------------------------------------------------- memory

def peak_growth_mib(fn, device):
    """MiB that fn() adds at its peak to what the process holds, measured on a second call (the
    first loads kernels and code, which the CPU's resident set would count). On CUDA: the
    allocator's peak (torch.cuda.max_memory_allocated) over what was allocated before. On the
    CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident
    set before, in a process started with MALLOC_MMAP_THRESHOLD_ (MEMORY_ENV), so that freed
    tensors go back to the system instead of a heap the second call would reuse unseen."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20

    def status_kib(field):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith(field + ":"))
        return int(line.split()[1])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) / 1024


# glibc: every allocation of 64 KiB or more its own mapping, given back when freed
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# the paper preset's stages at its shapes (CIFAR-10 ResNet-18, width 64, 10 classes; run_all.sh
# paper), each as one call: the memory a job's process adds to its model and data
MEMORY_STAGES = ("train", "evaluate", "fisher-input", "features", "finetune", "invert")
FISHER_CHUNKS = (1, 2, 4, 8)  # the weights' trace, whose memory grows with --chunk


def memory_stage(device, stage, chunk=None):
    """The peak MiB of one stage of the paper preset on device (peak_growth_mib), set up with
    its shapes: one PGD-7 training step at batch 128 (bf16 autocast on CUDA, as advtrain.py);
    APGD (every run, 2 steps) on an evaluation batch of 128; the weights' Fisher trace at
    `chunk` (two chunks); the input and representation estimators on a batch of 64 (3 Lanczos
    steps); features of 1000 target images held on the CPU; fine-tuning at batch 128 on 256
    images; the noise-tv inversion of 32 images (2 steps)."""
    torch.manual_seed(0)
    model = cifar_resnet18(device, memory_format=torch.channels_last)
    x = torch.rand(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    g = torch.Generator().manual_seed(0)
    if stage == "train":
        opt = models.make_optimizer(model, 0.1)
        run = lambda: advtrain.train_epoch(
            model, opt, x, y, batch_size=128, norm="linf", eps=8 / 255, steps=7, augment=True,
            amp=device.type == "cuda", channels_last=True)
    elif stage == "evaluate":
        model.eval()
        run = lambda: advtrain.evaluate(model, x, y, [("l2", 0.5)], batch_size=128, steps=2,
                                        attack="apgd")
    elif stage == "fisher-weights":
        model.eval()
        run = lambda: fisher.fisher_trace_weights(model, x[:2 * chunk], chunk=chunk)
    elif stage == "fisher-input":
        model.eval()

        def run():
            fisher.input_fisher_trace(model, x[:64])
            fisher.input_fisher_lambda_max(model, x[:64], 3, 1e-4, g)
            fisher.repr_jacobian_frobenius(model, x[:64], 16, g)
            fisher.repr_lambda_max(model, x[:64], 3, 1e-4, g)
    elif stage == "features":
        split = (torch.rand(1000, 1, 28, 28), torch.zeros(1000, dtype=torch.long))
        run = lambda: transfer.extract_features(model, split, 3, 32, 128)
    elif stage == "finetune":
        xt, yt = torch.rand(256, 1, 28, 28), torch.arange(256) % 10
        run = lambda: transfer.finetune(model, xt, yt, (xt[:128], yt[:128]), 3, 32, epochs=1,
                                        batch_size=128)
    elif stage == "invert":
        model.eval()
        with torch.no_grad():
            z0 = model.features(x[:32])
        start = invert.grey_start(x[:32].shape, 0).to(device)
        run = lambda: invert.invert_features(model, z0, start, 2, noise_std=0.05, tv_weight=0.1,
                                             generator=torch.Generator(device).manual_seed(1))
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return peak_growth_mib(run, device)


def memory_table(device):
    """{stage: peak MiB}, each stage (and the weights' trace at each FISHER_CHUNKS) measured in
    a process of its own; and the weights' trace's line in chunk (least squares)."""
    import subprocess
    import numpy as np

    def measure(*stage):
        import os
        proc = subprocess.run([sys.executable, __file__, "--memory-stage", str(device), *stage],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, **MEMORY_ENV})
        return float(proc.stdout.split()[-1])
    peaks = {stage: measure(stage) for stage in MEMORY_STAGES}
    fisher_peaks = [measure("fisher-weights", str(c)) for c in FISHER_CHUNKS]
    slope, intercept = np.polyfit(FISHER_CHUNKS, fisher_peaks, 1)
    for c, peak in zip(FISHER_CHUNKS, fisher_peaks):
        peaks[f"fisher-weights chunk {c}"] = peak
    return peaks, (float(slope), float(intercept))


def print_memory_table(device):
    peaks, (slope, intercept) = memory_table(device)
    model = cifar_resnet18(torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    directions = 9  # the exact weights' trace: classes - 1 vector-Jacobian products
    print(f"\n| stage (paper preset, CIFAR ResNet-18, on {device}) | peak MiB |\n|---|---|")
    for stage, peak in peaks.items():
        print(f"| {stage} | {peak:.0f} |")
    gradients = directions * params * 4 / 2 ** 20  # one example's per-sample gradients, MiB
    print(f"\nfisher-weights: {intercept:.0f} MiB + {slope:.0f} MiB per chunk example; "
          f"{directions} directions x {params} parameters x 4 bytes = {gradients:.0f} MiB "
          f"(ratio {slope / gradients:.2f}); projected at chunk 64: "
          f"{intercept + 64 * slope:.0f} MiB")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p.add_argument("--study", default=None, help="also split the wall time of a run_all.sh results "
                   "folder (its steps.tsv) by stage and seed, e.g. results/quick")
    p.add_argument("--device", default=None,
                   help="also measure the paper preset's work on this device (cuda, cuda:N; cpu "
                        "runs the code on a tiny model) and project run_all.sh paper (default: "
                        "cuda when present, except with --quick)")
    p.add_argument("--device-only", action="store_true",
                   help="only the device rows (not the CPU ratios)")
    p.add_argument("--compile", default="after", choices=("after", "skip", "only"),
                   help="torch.compile's device rows: after the others, skipped, or only they")
    p.add_argument("--projection-only", action="store_true",
                   help="only the paper preset's projection on one H200 from FLOP counts and "
                        "the inputs measured here")
    p.add_argument("--bf16-attacks", action="store_true",
                   help="only the strength of PGD-7 and APGD under bf16 autocast (and TF32 on "
                        "CUDA) against float32 at the paper grid's radii, on --device (default "
                        "cpu), on a resnet18 of width 8 trained 2 epochs on 4000 Fashion-MNIST "
                        "images at 32x32x3, 800 test images")
    p.add_argument("--apgd-working-batch", action="store_true",
                   help="only the time of APGD (50 steps, 200 test images) where fooled examples "
                        "leave the working batch against today's, with both robust accuracies, on "
                        "a cnn and a resnet18 of width 8, standard and robust (minutes)")
    p.add_argument("--memory", action="store_true",
                   help="only the peak memory of each stage of the paper preset at its shapes, "
                        "each in a process of its own, on --device (default cpu)")
    p.add_argument("--memory-stage", nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-worker", nargs=7, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(args):
    # torch.func's jvp triggers torch's own deprecation warning of torch.jit.script: not ours.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    if args.train_worker:  # one of concurrent_training_rate's processes
        device, *numbers = args.train_worker
        width, batch, steps, amp = map(int, numbers[:4])
        return train_worker(device, width, batch, steps, bool(amp), *map(float, numbers[4:]))
    if args.memory_stage:  # one of memory_table's processes: prints the stage's peak MiB
        device, stage, *chunk = args.memory_stage
        return print(memory_stage(torch.device(device), stage, *map(int, chunk)))
    if args.memory:
        return print_memory_table(torch.device(args.device or "cpu"))
    if args.bf16_attacks:
        device = torch.device(args.device or "cpu")
        return print_bf16_attacks(bf16_attack_strength(device=device))
    if args.apgd_working_batch:
        return print_apgd_working_batch(apgd_working_batch())
    if args.projection_only:
        return print_h200_projection(args.quick)
    if not args.device_only:
        cpu_rows(args)
        print_h200_projection(args.quick)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else None)
    if device is not None:
        device_rows(torch.device(device), args.quick, args.compile)
    elif args.device_only:
        print("no device rows: CUDA is not available (--device cpu runs their code on the CPU)")


def cpu_rows(args):
    """The CPU section: ratios of each stage against its ideal or a naive baseline."""
    torch.manual_seed(0)
    q = args.quick
    reps = 3 if q else 7
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu", flush=True)

    for arch, batch in (("cnn", 128), ("resnet18", 16 if q else 32)):
        for k in ((3,) if q else (3, 7)):
            std, adv, ratio = bench_adversarial_step(arch, k, batch, reps)
            rows.append((f"PGD-{k} training step, {arch}, batch {batch}",
                         f"{adv * 1e3:.0f} ms vs {(k + 1)} x {std * 1e3:.0f} ms standard",
                         f"{ratio:.2f}", "<= 1.0", "met" if ratio <= 1.0 else "missed"))
            print(f"  {rows[-1]}", flush=True)

    before, after = bench_channels_last(128, reps)
    rows.append(("PGD-3 training step, cnn, batch 128: channels_last vs contiguous",
                 f"{after * 1e3:.0f} ms vs {before * 1e3:.0f} ms", f"{after / before:.2f}", "< 1",
                 "met" if after < before else "missed"))
    print(f"  {rows[-1]}", flush=True)

    model = trained_cnn(2000 if q else 5000)
    n = 32 if q else 128
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Fisher comparison is on one thread, as run_all.sh runs it
    fisher_times, power = bench_fisher(model, n, reps)
    torch.set_num_threads(threads)
    ours = fisher_times["ours, k - 1 vjps"][0]
    for name, (seconds, trace) in fisher_times.items():
        rows.append((f"Fisher weights trace, cnn, {n} examples, 5 classes, 1 thread: {name}",
                     f"{seconds:.2f} s (mean trace {trace:.4g})", f"{seconds / ours:.2f}x ours", "",
                     ""))
        print(f"  {rows[-1]}", flush=True)
    rows.append(("input-Fisher lambda_max (Lanczos, jvp/vjp), cnn",
                 f"{power * 1e3:.1f} ms per example", "", "", ""))
    print(f"  {rows[-1]}", flush=True)

    n_train, epochs = (2000, 30) if q else (5000, 150)
    probe_time, probe_acc, sgd_time, sgd_acc = bench_transfer(model, n_train, epochs)
    equal = round(abs(probe_acc - sgd_acc), 4) <= 0.005  # 1000 test images: steps of 0.001
    rows.append((f"linear probe, {n_train} target images: L-BFGS on cached features vs SGD "
                 f"{epochs} epochs",
                 f"{probe_time:.1f} s (acc {probe_acc:.3f}) vs {sgd_time:.1f} s (acc "
                 f"{sgd_acc:.3f})",
                 f"{sgd_time / probe_time:.0f}x", ">= 20x at equal accuracy (0.5 points)",
                 "met" if sgd_time / probe_time >= 20 and equal else
                 ("missed" if equal else
                  f"accuracies differ by {abs(probe_acc - sgd_acc) * 100:.1f} points")))
    print(f"  {rows[-1]}", flush=True)

    few, finetune = bench_few_shot_and_finetune(model, (1, 10, 100), 1000, 1 if q else 3)
    for k, seconds in few.items():
        rows.append((f"few-shot probe, {k} per class, one draw at its fixed penalty (rule 4), "
                     f"cnn features",
                     f"{seconds:.2f} s", "", "< 1 s", "met" if seconds < 1 else "missed"))
        print(f"  {rows[-1]}", flush=True)
    rows.append(("fine-tuning every weight, cnn, 1000 images x 2 epochs (quick preset), 1000 test "
                 "images",
                 f"{finetune:.2f} s", "", "", ""))
    print(f"  {rows[-1]}", flush=True)

    steps = 20 if q else 100
    for method, rate in bench_inversion(model, 16, steps, 1 if q else 3).items():
        rows.append((f"inversion, {method}, cnn, 16 images", f"{rate:.0f} image-steps per second",
                     "", "", ""))
        print(f"  {rows[-1]}", flush=True)

    print("\n| stage | measured | ratio | target | |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.study:
        wall, stages, seeds = study_split(args.study)
        print(f"\nstudy {args.study}: wall time {wall // 60} min {wall % 60} s; step seconds "
              f"summed over jobs:")
        print("| stage | seconds |\n|---|---|")
        for stage, seconds in stages.items():
            print(f"| {stage} | {seconds} |")
        split = (f"seed {k}: {v} s" if k.isdigit() else f"{k}: {v} s" for k, v in seeds.items())
        print("| " + " | ".join(split) + " |")


if __name__ == "__main__":
    main(get_args())
