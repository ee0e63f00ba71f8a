"""Shared fixtures: the repository root on sys.path, the scripts run in a new process or in
this one, a tiny trained checkpoint, the outside references (skipped when absent, failing
under CI=true) and the Fashion-MNIST check."""
import contextlib
import importlib
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(*args, cwd=ROOT):
    """Run `python script args...` in a new process and return the CompletedProcess (text
    output). For what needs a process of its own (torchrun, what an import loads); otherwise
    run_main, seconds faster."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


def run_main(script, *args):
    """`python script args...` in this process: the script's `if __name__ == "__main__"` block
    (its main inside common.user_errors) run by runpy, with sys.argv set, from the repository
    root. Returns a CompletedProcess: returncode 0, or that of the SystemExit raised; stdout and
    stderr as printed. An exception that main lets through (a traceback) propagates."""
    argv = [str(ROOT / script), *map(str, args)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, os.getcwd()
    try:
        sys.argv = argv
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter exits: None is 0, a message is 1 (printed)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_user_error(proc, expected, *more):
    """A user error: non-zero exit, exactly one line on stderr, no traceback, and the line says
    what is wrong: it contains `expected` and each of `more` (the flag, value or file it names).
    Returns the line."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(text in lines[0] for text in (expected, *more)), (lines[0], expected, more)
    return lines[0]


def one_line_error(match, fn, *args, **kwargs):
    """fn(...), a library function, raises a one-line ValueError or FileNotFoundError (never
    the command line's UserError: main alone turns errors into one line and exit 2)
    containing `match`; returns the message."""
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A cnn trained for two epochs on 1024 Fashion-MNIST images of classes 0-4 (seconds)."""
    import advtrain
    out = tmp_path_factory.mktemp("tiny")
    args = advtrain.get_args(["--classes", "0-4", "--train-size", "1024", "--test-size", "128",
                              "--epochs", "2", "--batch-size", "64", "--eps", "0.5", "--steps", "1",
                              "--eval-steps", "2", "--out", str(out)])
    advtrain.main(args)
    return out / "model.pt"


# ----------------------------------------------------------------------------- one thread
# The tests' tensors are small: one thread is about as fast, and on a busy two-core machine
# two threads spin-wait on each other, many times slower. The scripts the tests start inherit
# OMP_NUM_THREADS=1.

@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = omp


# ----------------------------------------------------------------------------- outside references
# tests/test_references.py compares our estimators with scikit-learn, scipy, torchattacks and
# scikit-image (requirements-dev.txt, installed by tests/run.sh). Absent, their tests are
# skipped, saying how to install them; under CI=true an absent reference fails its test.

def under_ci():
    """True when env CI says so (CI=true, as CI services set it)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def reference(name):
    """The outside reference module `name` (e.g. "sklearn.linear_model"); when it cannot be
    imported the calling test is skipped, or fails under CI=true, with one line saying how
    to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        message = (f"outside reference {name} not importable ({e}); "
                   f"install them with: python -m pip install -r requirements-dev.txt")
        if under_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)


# ----------------------------------------------------------------------------- Fashion-MNIST
# Most tests read Fashion-MNIST (from ./data or the Debian package's system copy) and never
# download it. When it is absent the run stops before any test, with one line saying how
# to get it, instead of failing test after test.

def fashion_mnist_missing(data_dir=ROOT / "data"):
    """None when Fashion-MNIST is where the tests read it, else the one line saying how to
    get it."""
    import data
    if data.dataset_present("fashion-mnist", str(data_dir)):
        return None
    download = "import torchvision; torchvision.datasets.FashionMNIST('data', download=True)"
    return (f"Fashion-MNIST is in neither {data_dir} nor {data.SYSTEM_FASHION_MNIST}, and the "
            "tests need it: install the Debian/Ubuntu package (sudo apt-get install "
            "dataset-fashion-mnist), or let torchvision download it into ./data on a machine "
            f"with internet: python -c \"{download}\"")


# The test files that take longest on two cores, longest first (pytest --durations=0)
LONGEST_FILES = ("test_imagenet_preset.py", "test_slurm.py", "test_ddp.py", "test_regime.py",
                 "test_gpu_scripts.py", "test_study.py", "test_report.py")


def pytest_configure(config):
    # pytest-xdist re-sorts whole files by their number of tests unless told not to (its
    # --no-loadscope-reorder, from 3.6): keep the order below, whatever xdist version is in use
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    # the longest files first, then the others with end-to-end tests, then the rest (each in
    # file order): tests/run.sh's workers (--dist loadfile) take whole files in this order, so
    # the longest start at once rather than last and the workers end together
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)),  # stable sort
                                 item.path not in slow_files))
    # a device comparison on the CPU would compare the CPU with itself: skipped, before its
    # fixtures are made
    if requested_device() == "cpu":
        for item in items:
            marker = item.get_closest_marker("accelerator")
            if marker:
                item.add_marker(pytest.mark.skip(reason=f"on the CPU this is {marker.args[0]}"))
    if items and not config.option.collectonly:
        missing = fashion_mnist_missing()
        if missing:
            raise pytest.UsageError(missing)


# ----------------------------------------------------------------------------- device (env DEVICE)
# tests/test_device.py runs the device code paths on torch.device(DEVICE) (default cpu) and
# compares them with the CPU: `DEVICE=cuda bash tests/run.sh`. A device that cannot be used
# stops the whole run with one line, before any test.

def requested_device():
    """The device name the device tests run on: env DEVICE, default cpu."""
    return os.environ.get("DEVICE") or "cpu"


def pytest_sessionstart(session):
    """DEVICE names a device torch can use, or the run stops here with one line."""
    name = requested_device()
    if name == "cpu":
        return
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"DEVICE={name} asked for, but CUDA is not available (torch "
                                f"{torch.__version__}); unset DEVICE to test on the CPU")
    try:
        torch.zeros(1, device=name)
    except (RuntimeError, AssertionError, ValueError) as e:  # no such device or index
        raise pytest.UsageError(f"DEVICE={name} cannot be used: {str(e).splitlines()[0]}")


@pytest.fixture(scope="session")
def device():
    """torch.device of env DEVICE (default cpu), checked usable in pytest_sessionstart."""
    import torch
    return torch.device(requested_device())


def cli_user_error(script, argv, expect, ckpt, tmp_path):
    """`python script argv...` in this process, with a corrupt checkpoint at {tmp}/bad.pt and
    --ckpt ckpt unless argv names one: one line containing each of `expect`, and exit 2."""
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--ckpt" not in argv:
        argv = ["--ckpt", ckpt, *argv]
    proc = run_main(script, *argv, "--out", tmp_path)
    assert proc.returncode == 2, proc
    assert_user_error(proc, *expect)
