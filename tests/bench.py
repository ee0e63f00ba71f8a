"""Performance of each stage against its ideal or a naive baseline, as ratios (a script, not a test).

    python tests/bench.py            # full run, a few minutes on two CPU cores
    python tests/bench.py --quick    # smaller sizes, under a minute (run by the test suite)
    python tests/bench.py --study results/quick   # and the quick study's time split (after run_all.sh)

Prints a Markdown table. Ratios compare two timings taken on the same inputs in the same
process (medians over repeats after a warm-up), so they stay meaningful on a noisy machine.
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

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
        return lambda: advtrain.train_epoch(model, opt, x, y, batch_size=batch, norm="l2", eps=eps, steps=steps)

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
        advtrain.train_epoch(model, opt, x, y, batch_size=128, eps=0.0, steps=0, step0=epoch * (steps // epochs),
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
    nngeometry's diagonal FIM when importable; same data, one thread. Returns {name: (seconds, trace)}."""
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
        results[name] = (median_time(fn, repeats if name != "per-example loop" else 1), fn().mean().item())
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
    lines = [line.split("\t") for line in (Path(results_dir) / "steps.tsv").read_text().splitlines()]
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
    """Seconds of one few-shot probe draw (penalty by cross-validation on the K-shot set) on
    the cnn's 784-d features, and of transfer.finetune on n_finetune images (2 epochs; the
    quick preset's setting), evaluated on 1000 test images."""
    x, y = fashion_mnist(5000, classes=(5, 6, 7, 8, 9))
    x_test, y_test = fashion_mnist(1000, train=False, classes=(5, 6, 7, 8, 9))
    with torch.no_grad():
        f_train, f_test = model.features(x), model.features(x_test)
    few = {k: median_time(lambda: transfer.few_shot_probe(f_train, y, f_test, y_test, k, draws=1), repeats)
           for k in shots}
    finetune = median_time(lambda: transfer.finetune(model, x[:n_finetune], y[:n_finetune], (x_test, y_test), 1, 28),
                           repeats)
    return few, finetune


def bench_inversion(model, n, steps, repeats):
    """images x steps per second for each method of invert.py."""
    x0, _ = fashion_mnist(n, train=False)
    with torch.no_grad():
        z0 = model.features(x0)
    start = invert.grey_start(x0.shape, 0)
    rates = {}
    for method, kwargs in (("baseline", {}), ("improved", dict(noise_std=0.05, tv_weight=0.1))):
        seconds = median_time(lambda: invert.invert_features(model, z0, start, steps, **kwargs), repeats)
        rates[method] = n * steps / seconds
    return rates


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    p.add_argument("--study", default=None, help="also split the wall time of a run_all.sh results folder "
                   "(its steps.tsv) by stage and seed, e.g. results/quick")
    return p.parse_args(argv)


def main(args):
    # torch.func's jvp triggers torch's own deprecation warning of torch.jit.script: not ours.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
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
                     f"{seconds:.2f} s (mean trace {trace:.4g})", f"{seconds / ours:.2f}x ours", "", ""))
        print(f"  {rows[-1]}", flush=True)
    rows.append(("input-Fisher lambda_max (Lanczos, jvp/vjp), cnn", f"{power * 1e3:.1f} ms per example", "", "", ""))
    print(f"  {rows[-1]}", flush=True)

    n_train, epochs = (2000, 30) if q else (5000, 150)
    probe_time, probe_acc, sgd_time, sgd_acc = bench_transfer(model, n_train, epochs)
    equal = round(abs(probe_acc - sgd_acc), 4) <= 0.005  # 1000 test images: steps of 0.001
    rows.append((f"linear probe, {n_train} target images: L-BFGS on cached features vs SGD {epochs} epochs",
                 f"{probe_time:.1f} s (acc {probe_acc:.3f}) vs {sgd_time:.1f} s (acc {sgd_acc:.3f})",
                 f"{sgd_time / probe_time:.0f}x", ">= 20x at equal accuracy (0.5 points)",
                 "met" if sgd_time / probe_time >= 20 and equal else
                 ("missed" if equal else f"accuracies differ by {abs(probe_acc - sgd_acc) * 100:.1f} points")))
    print(f"  {rows[-1]}", flush=True)

    few, finetune = bench_few_shot_and_finetune(model, (1, 10, 100), 1000, 1 if q else 3)
    for k, seconds in few.items():
        rows.append((f"few-shot probe, {k} per class, one draw with its cross-validated penalty, cnn features",
                     f"{seconds:.2f} s", "", "< 1 s", "met" if seconds < 1 else "missed"))
        print(f"  {rows[-1]}", flush=True)
    rows.append(("fine-tuning every weight, cnn, 1000 images x 2 epochs (quick preset), 1000 test images",
                 f"{finetune:.2f} s", "", "", ""))
    print(f"  {rows[-1]}", flush=True)

    steps = 20 if q else 100
    for method, rate in bench_inversion(model, 16, steps, 1 if q else 3).items():
        rows.append((f"inversion, {method}, cnn, 16 images", f"{rate:.0f} image-steps per second", "", "", ""))
        print(f"  {rows[-1]}", flush=True)

    print("\n| stage | measured | ratio | target | |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.study:
        wall, stages, seeds = study_split(args.study)
        print(f"\nstudy {args.study}: wall time {wall // 60} min {wall % 60} s; step seconds summed over jobs:")
        print("| stage | seconds |\n|---|---|")
        for stage, seconds in stages.items():
            print(f"| {stage} | {seconds} |")
        print("| " + " | ".join(f"seed {k}: {v} s" if k.isdigit() else f"{k}: {v} s" for k, v in seeds.items()) + " |")


if __name__ == "__main__":
    main(get_args())
