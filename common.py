"""Helpers every script shares that need only numpy and the standard library: main's error
boundary (user_errors), the scalar checks of the core functions (check_number), the
command-line vocabulary, eps and class parsing, mean and standard error, the one-cycle
learning rate, atomic writes, provenance and progress lines. It imports no other module of
the project; report.py imports it alone, so it starts without torch; data.py (datasets),
models.py (models, tensor helpers) and checkpoints.py (checkpoint files) hold the torch parts.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import numbers
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """An error of the command line that a script's main finds itself (arguments that
    contradict each other or a checkpoint): one line, no traceback. Library functions raise
    standard exceptions instead (ValueError, FileNotFoundError)."""


@contextlib.contextmanager
def user_errors():
    """main's one error boundary: a UserError, or the ValueError (a bad value) or
    FileNotFoundError (a missing file) of a library function, becomes one line on stderr,
    `error: <the message's first line>`, and exit status 2; anything else keeps its
    traceback."""
    try:
        yield
    except (UserError, ValueError, FileNotFoundError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_number(name, value, at_least=None, above=None, integer=False):
    """ValueError naming `name` unless value is a finite real number (an integer when
    `integer`; never a bool), >= at_least and > above where given. For core functions'
    scalar arguments."""
    kind = numbers.Integral if integer else numbers.Real
    ok = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
          and (at_least is None or value >= at_least) and (above is None or value > above))
    if not ok:
        bounds = [f" {sign} {bound:g}" for sign, bound in ((">=", at_least), (">", above))
                  if bound is not None]
        what = ("an integer" if integer else "a finite number") + "".join(bounds)
        raise ValueError(f"{name} must be {what}, got {value!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default once (from add_argument), help wrapped at about 100 columns."""

    def __init__(self, prog):
        super().__init__(prog, width=100, max_help_position=32)

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help  # "(default: None)" / "(default: False)" say nothing
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), not usage + error, and
    --help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def positive_int(text):
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text):
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def nonnegative_float(text):
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text!r}")
    return value


def parse_eps(text):
    """'0.5', '8/255' -> float >= 0 (pixel units, images in [0, 1])."""
    try:
        num, _, den = str(text).partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"eps must be a number or a fraction like 8/255, got {text!r}")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"eps must be finite and >= 0, got {text!r}")
    return value


def parse_classes(text, num_classes):
    """'0-4' -> [0, 1, 2, 3, 4]; '0,3,7' -> [0, 3, 7]; None or '' -> all classes. A text that
    selects nothing, repeats a class or names one out of range is a ValueError."""
    if not text:
        return list(range(num_classes))
    classes = []
    try:
        for part in str(text).split(","):
            lo, sep, hi = part.partition("-")
            classes += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ValueError(f"classes must look like 0-4 or 0,3,7, got {text!r}") from None
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes {text!r} select nothing or repeat a class")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} out of range: the dataset has classes 0-{num_classes - 1}")
    return classes


def add_common_args(p, download=True):
    """The shared --device, --data-dir (and --no-download) options of every script."""
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--data-dir", default="./data",
                   help="where datasets are looked up and downloaded")
    if download:
        p.add_argument("--no-download", action="store_true",
                       help="never download; fail if a dataset is absent")


CKPT_HELP = ("checkpoint: ours (model.pt of advtrain.py), a robustness/RMT checkpoint, or a "
             "torchvision ResNet state dict (normalised for ImageNet)")
UNSAFE_LOAD_HELP = ("allow a checkpoint that needs unpickling of Python objects (robustness "
                    "saves with dill): it can run arbitrary code, so only for files from a "
                    "source you trust")


# Inversion methods' former names (invert.py, collect.py): older invert.json files and
# commands spell noise-tv `improved`.
RENAMED_METHODS = {"improved": "noise-tv"}


def add_classifier_args(p, when="with --arch torchvision:NAME or --model: "):
    """--model, --head, --mean, --std and --image-size: any classifier, beside a checkpoint
    (add_checkpoint_args; advtrain.py's --eval-only)."""
    p.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                   help="your own classifier: package.module:function, imported (its code run) "
                        "only when given; the function, called without arguments, returns the "
                        "nn.Module (normalised images -> logits)")
    p.add_argument("--head", default=None,
                   help=when + "the name of the last linear layer (default: found, the last "
                        "nn.Linear whose output is the output)")
    for name in ("mean", "std"):
        p.add_argument(f"--{name}", type=float, nargs="+", default=None,
                       help=f"{when}the per-channel {name} of the normalisation it was trained "
                            f"with (default: the file's normaliser; none if the model "
                            f"normalises inside; else its dataset's, when named; else the "
                            f"torchvision weights'; else ImageNet's)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help=when + "the model's input size in pixels (default: its dataset's, "
                        "when named; else the torchvision weights' crop size; else 224)")


def add_checkpoint_args(p):
    """The options of every script that reads a model: --ckpt, --arch, --unsafe-load, and for
    any other classifier --model, --head, --mean, --std, --image-size, --trained-on
    (checkpoint_options turns them into checkpoints.load_checkpoint's arguments)."""
    p.add_argument("--ckpt", default=None, help=CKPT_HELP + "; with --arch torchvision:NAME or "
                   "--model, a state dict of that network (required, unless --model builds "
                   "the model with its weights)")
    p.add_argument("--arch", default=None,
                   help="architecture of a foreign checkpoint, e.g. resnet50, wide_resnet50_2, "
                        "cifar_resnet18 (default: detected from its keys and shapes), or "
                        "torchvision:NAME, any classifier of torchvision.models (e.g. "
                        "torchvision:convnext_tiny), whose state dict --ckpt is")
    add_classifier_args(p)
    p.add_argument("--trained-on", default=None,
                   help="the dataset a published or --arch torchvision:NAME / --model "
                        "classifier was trained on: its classes, test images, channels and "
                        "default normalisation (default imagenet; cifar10 for cifar_*)")
    p.add_argument("--unsafe-load", action="store_true", help=UNSAFE_LOAD_HELP)


def ckpt_folder(args):
    """--out's default: the folder of --ckpt, or the current one without it (--model)."""
    return Path(args.ckpt).parent if args.ckpt else Path(".")


def checkpoint_options(args):
    """checkpoints.load_checkpoint's keyword arguments from add_checkpoint_args' options."""
    return dict(arch=args.arch, dataset=args.trained_on, unsafe=args.unsafe_load,
                model=args.model, head=args.head, mean=args.mean, std=args.std,
                image_size=args.image_size)


def mean_se(values):
    """(mean, standard error of the mean) of the finite values of a 1-d array or tensor;
    SE = 0.0 (no noise estimate) for a single value, (nan, 0.0) when none is finite. No values
    at all is a ValueError. Used for every reported number."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values must hold at least one value, got none")
    v = v[np.isfinite(v)]
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def lr_at(step, total_steps, max_lr, warmup=0.25):
    """One-cycle schedule: linear 0 -> max_lr over the first `warmup` fraction of total_steps,
    then linear -> 0. step counts from 0 over the whole run."""
    t = step / max(total_steps, 1)
    return max_lr * (t / warmup if t < warmup else (1 - t) / (1 - warmup))


def format_eps(eps):
    """The key of an eps in file names and tables: '0.5', '0.0313725' (8/255)."""
    return f"{eps:.6g}"


def writable_dir(path):
    """Create path if needed and check that files can be written in it; returns a Path."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write_test.{os.getpid()}"  # one per process (torchrun)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {path}: {e.strerror}")
    return Path(path)


def atomic_save(path, obj):
    """Write obj to path atomically (temporary file, then os.replace): .pt via torch.save,
    .json via json.dump, .npy via np.save, .npz via np.savez of a dict {name: array}, bytes
    or text otherwise. A killed run never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if path.suffix == ".pt":
            import torch  # only the scripts that write checkpoints need it
            torch.save(obj, f)
        elif path.suffix == ".json":
            f.write(json.dumps(obj, indent=2).encode() + b"\n")
        elif path.suffix == ".npy":
            np.save(f, np.asarray(obj))
        elif path.suffix == ".npz":
            np.savez(f, **{name: np.asarray(array) for name, array in obj.items()})
        else:
            f.write(obj if isinstance(obj, bytes) else str(obj).encode())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- provenance

@functools.lru_cache(maxsize=1)
def code_revision():
    """The git commit of this code ('+dirty' with uncommitted changes), or 'unknown'."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Options that change where or how fast a script runs, never what it computes.
NOT_SETTINGS = ("device", "data_dir", "no_download", "out", "resume", "ckpt", "judge")
# Options of any other classifier (add_classifier_args, --trained-on): settings only when
# given, so the settings of our own checkpoints' runs stay as they were.
CLASSIFIER_OPTIONS = ("model", "head", "mean", "std", "image_size", "trained_on")


def provenance(settings):
    """{settings, settings_hash, code_revision} for an output file. settings: a dict (vars of
    the parsed arguments); options in NOT_SETTINGS are left out, so moving a run elsewhere
    does not change its hash; CLASSIFIER_OPTIONS not given (None) are left out too."""
    kept = {k: v for k, v in sorted(settings.items()) if k not in NOT_SETTINGS
            and not (k in CLASSIFIER_OPTIONS and v is None)}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    return {"settings": kept, "settings_hash": digest[:16], "code_revision": code_revision()}


# ----------------------------------------------------------------------------- progress

class Clock:
    """Plain progress lines: `clock.log(text)` prints text with the elapsed time, flushed;
    `clock.progress(items, label)` also reports rate and time left every `every` seconds."""

    def __init__(self, prefix="", every=10.0):
        self.t0, self.prefix, self.every = time.time(), prefix, every

    def elapsed(self):
        return time.time() - self.t0

    def log(self, text):
        print(f"{self.prefix}{text} ({self.elapsed():.1f}s)", flush=True)

    def progress(self, items, label, unit="batches"):
        """Yield from items (a sized iterable), with a line every `every` seconds."""
        total, start = len(items), time.time()
        last = start
        for i, item in enumerate(items):
            yield item
            now = time.time()
            if now - last >= self.every and i + 1 < total:
                rate = (i + 1) / (now - start)
                left = (total - i - 1) / rate
                self.log(f"{label}: {i + 1}/{total} {unit}, {rate:.2f}/s, {left:.0f}s left")
                last = now
