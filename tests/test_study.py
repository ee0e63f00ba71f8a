"""run_all.sh: skip, redo on changed settings, force, failure; the paper preset on synthetic data."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT


FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in interpreter: records the call and writes the output the real script would.
    [ "$1" = -c ] && exit 0  # setup_python.sh asks whether it imports torch: it does
    echo "$1" >> "$CALLS"
    script=$1; shift
    out=""
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    [ "$script" = report.py ] && out=$(cat "$CALLS.out")
    [ "$script" = "$FAIL" ] && { echo "boom from $script" >&2; exit 3; }
    case $script in
      advtrain.py) echo "$(dirname "$out")" > "$CALLS.out"; echo {} > "$out/metrics.json" ;;
      fisher.py) echo {} > "$out/fisher.json" ;;
      transfer.py) echo {} > "$out/transfer.json" ;;
      invert.py) echo {} > "$out/invert.json" ;;
      report.py) echo ok > "$out/report.md" ;;
    esac
""")


def run_all(tmp_path, fail="", force="0", script=ROOT / "run_all.sh", jobs="1"):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), FAIL=fail, FORCE=force,
               OUT=str(tmp_path / "res"), SEEDS="0 1", JOBS=jobs)
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    return proc, calls.read_text().split()


def test_run_all_skips_done_steps_and_forces(tmp_path):
    proc, calls = run_all(tmp_path)
    assert proc.returncode == 0, proc.stderr
    # judge + 2 seeds x 5 eps x (train, fisher, transfer, invert) + report
    assert calls.count("advtrain.py") == 11 and calls.count("invert.py") == 10 and calls[-1] == "report.py"
    assert (tmp_path / "res" / "l2_eps0.25_seed1" / "transfer.json").exists()
    proc, calls = run_all(tmp_path)
    assert proc.returncode == 0 and calls == ["report.py"]
    assert proc.stdout.count(": skip ") == 41
    proc, calls = run_all(tmp_path, force="1")
    assert len(calls) == 42


def test_run_all_redoes_exactly_the_steps_whose_settings_changed(tmp_path):
    script = tmp_path / "run_all.sh"
    shutil.copy(ROOT / "run_all.sh", script)
    shutil.copy(ROOT / "setup_python.sh", tmp_path)
    assert run_all(tmp_path, script=script)[0].returncode == 0

    def edit(old, new):  # the first occurrence: the quick preset's
        text = script.read_text()
        assert old in text, old
        script.write_text(text.replace(old, new, 1))

    edit("FISHER=(--n 512)", "FISHER=(--n 256)")
    proc, calls = run_all(tmp_path, script=script)
    assert proc.returncode == 0 and calls == ["fisher.py"] * 10 + ["report.py"]
    edit('GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "l2 2.0")', 'GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "l2 4.0")')
    proc, calls = run_all(tmp_path, script=script)
    assert calls == ["advtrain.py", "fisher.py", "transfer.py", "invert.py"] * 2 + ["report.py"]
    edit("JUDGE=(--norm l2 --eps 0.5)", "JUDGE=(--norm l2 --eps 1.0)")  # every inversion uses the judge
    proc, calls = run_all(tmp_path, script=script)
    assert calls == ["advtrain.py"] + ["invert.py"] * 10 + ["report.py"]
    edit("--epochs 4", "--epochs 5")  # training settings: every step
    proc, calls = run_all(tmp_path, script=script)
    assert calls.count("advtrain.py") == 11 and calls.count("fisher.py") == 10 and len(calls) == 42


def test_run_all_stops_at_a_failing_step(tmp_path):
    proc, calls = run_all(tmp_path, fail="fisher.py")
    assert proc.returncode != 0
    assert "boom from fisher.py" in proc.stderr and "FAILED" in proc.stderr
    assert calls == ["advtrain.py", "advtrain.py", "fisher.py"]
    assert not (tmp_path / "res" / "report.md").exists()


def test_run_all_in_parallel_runs_every_step_once_and_stops_at_a_failure(tmp_path):
    proc, calls = run_all(tmp_path, jobs="3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(calls) == sorted(["advtrain.py"] * 11 + ["fisher.py", "transfer.py", "invert.py"] * 10 + ["report.py"])
    assert calls.index("advtrain.py") < calls.index("invert.py") and calls[-1] == "report.py"
    # every line names its cell, even when jobs interleave
    assert all(": " in line for line in proc.stdout.splitlines() if line.startswith("[") and " done " in line)
    (tmp_path / "again").mkdir()
    proc, calls = run_all(tmp_path / "again", fail="transfer.py", jobs="3")
    assert proc.returncode != 0 and "study stopped" in proc.stderr and "report.py" not in calls


TIMING_KEYS = {"seconds", "fit_seconds", "train_seconds", "ckpt"}  # wall times and paths differ between runs


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def smoke(out, seeds, jobs):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SEEDS=seeds, JOBS=jobs)
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "paper", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_paper_preset_smoke_parallel_equals_sequential(tmp_path):
    """The paper code path (resnet18, L2 and Linf, several targets) on tiny synthetic data,
    three seeds with 2 jobs at once: the eps = 0 model is attacked in both norms, so each norm's
    grid has its baseline and C1 is decided for both. Seed 0 again, one job at a time, gives
    identical files."""
    smoke(tmp_path / "parallel", "0 1 2", "2")
    runs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "parallel").glob("*/metrics.json")}
    assert set(runs) == {"judge"} | {f"{cell}_seed{s}" for cell in ("l2_eps0", "l2_eps0.5", "linf_eps8_255")
                                     for s in range(3)}
    for name, metrics in runs.items():
        radii = {(r["norm"], round(r["eps"], 6)) for r in metrics["robust_acc"]}
        assert {("l2", 0.5), ("linf", round(8 / 255, 6))} <= radii, name
    assert runs["linf_eps8_255_seed0"]["eps"] == pytest.approx(8 / 255)
    transfer = json.loads((tmp_path / "parallel" / "linf_eps8_255_seed0" / "transfer.json").read_text())
    assert {"synthetic:0-4", "fashion-mnist:5-9"} <= set(transfer)
    summary = json.loads((tmp_path / "parallel" / "summary.json").read_text())
    assert set(summary["claims"]) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    # three seeds and a baseline for each norm: C1 is decided (either way) for L2 and for Linf
    by_norm = summary["claims"]["C1"]["by_norm"]
    assert set(by_norm) == {"l2", "linf"}
    assert all(by_norm[norm]["holds"] is not None and by_norm[norm]["n_seeds"] == 3 for norm in by_norm), by_norm

    proc = smoke(tmp_path / "sequential", "0", "1")
    assert "1 jobs at once" in proc.stdout
    compared = 0
    for path in sorted((tmp_path / "sequential").glob("*/*")):
        twin = tmp_path / "parallel" / path.relative_to(tmp_path / "sequential")
        if path.suffix == ".json":
            assert without_timing(json.loads(path.read_text())) == without_timing(json.loads(twin.read_text())), path
        elif path.suffix == ".npy":
            assert np.array_equal(np.load(path), np.load(twin)), path
        else:
            continue
        compared += 1
    assert compared >= 4 * 3 + 1  # metrics, fisher, transfer, invert of 3 cells, and the judge
