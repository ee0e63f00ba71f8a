"""Performance of each stage against its ideal or a naive baseline, as ratios (a script, not a test).

    python tests/bench.py            # full run, a few minutes on two CPU cores
    python tests/bench.py --quick    # smaller sizes, under a minute (run by the test suite)

Prints a Markdown table. Ratios compare two timings taken on the same inputs in the same
process (medians over repeats after a warm-up), so they stay meaningful on a noisy machine.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import advtrain  # noqa: E402
import fisher  # noqa: E402
import invert  # noqa: E402
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
    return advtrain.load_split("fashion-mnist", train, classes=list(classes), size=n, download=False)


def model_for(arch, num_classes=5):
    torch.manual_seed(0)
    if arch == "cnn":
        return advtrain.build_model("cnn", num_classes, 1, 28, (0.286,), (0.353,))
    return advtrain.build_model("resnet18", num_classes, 3, 32, (0.5,) * 3, (0.25,) * 3)


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
        args = SimpleNamespace(batch_size=batch, augment=False, norm="l2", eps=eps, steps=steps,
                               step_size=None, lr=0.01)
        return lambda: advtrain.train_epoch(model, opt, x, y, args, 0, 1)

    standard = median_time(step(0.0, 0), repeats)
    adversarial = median_time(step(0.5, k), repeats)
    return standard, adversarial, adversarial / ((k + 1) * standard)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    return p.parse_args(argv)


def main(args):
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

    print("\n| stage | measured | ratio | target | |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main(get_args())
