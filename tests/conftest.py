"""Shared fixtures: the repository root on sys.path, and a tiny trained checkpoint."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(*args, cwd=ROOT):
    """Run `python script args...` and return the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True)


def assert_user_error(proc):
    """A user error: non-zero exit, exactly one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def one_line_error(match, fn, *args, **kwargs):
    """fn(...) raises a one-line UserError containing `match`; returns the message."""
    import common
    with pytest.raises(common.UserError) as info:
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
                              "--epochs", "2", "--batch-size", "64", "--eps", "0.5", "--steps", "1", "--eval-steps", "2",
                              "--out", str(out)])
    advtrain.main(args)
    return out / "model.pt"
