"""run_all.sh: the declaration, skip, redo on changed settings, resume, force, failure, the
order of the pool's jobs; the paper preset on synthetic data."""
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
    [ "$2" = --declare ] && { echo "declare:$3" >> "$CALLS"; echo {} > "$4/study.json"; exit 0; }
    echo "$1" >> "$CALLS"
    script=$1; shift
    out=""
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    [ "$script" = report.py ] && out=$(cat "$CALLS.out")
    echo "start $script $(basename "$out")" >> "$CALLS.order"
    [ "$script" = "$FAIL" ] && { echo "boom from $script" >&2; exit 3; }
    [ "$(basename "$out")" = judge ] && sleep "${JUDGE_SLEEP:-0}"
    case $script in
      advtrain.py) echo "$(dirname "$out")" > "$CALLS.out"; echo {} > "$out/metrics.json" ;;
      fisher.py) echo {} > "$out/fisher.json" ;;
      transfer.py) echo {} > "$out/transfer.json" ;;
      invert.py) echo {} > "$out/invert.json" ;;
      report.py) echo ok > "$out/report.md" ;;
    esac
    echo "end $script $(basename "$out")" >> "$CALLS.order"
""")


def run_all(tmp_path, fail="", force="0", script=ROOT / "run_all.sh", jobs="1", judge_sleep="0",
            **extra_env):
    """The quick preset (seeds 0 1) with the stand-in interpreter: (process, the scripts called
    after the declaration, which must come first and once). jobs None: JOBS unset."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    (tmp_path / "calls.order").write_text("")
    # CUDA_VISIBLE_DEVICES empty: no GPU, whatever the machine has (tests/test_gpu_scripts.py
    # tests the pool on GPUs)
    env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), FAIL=fail, FORCE=force,
               OUT=str(tmp_path / "res"), SEEDS="0 1", JOBS=jobs, JUDGE_SLEEP=judge_sleep,
               CUDA_VISIBLE_DEVICES="", **extra_env)
    if jobs is None:
        del env["JOBS"]
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    calls = calls.read_text().split()
    assert calls[:1] == ["declare:quick"] and calls.count("declare:quick") == 1, calls
    return proc, calls[1:]


def test_run_all_skips_done_steps_and_forces(tmp_path):
    proc, calls = run_all(tmp_path)
    assert proc.returncode == 0, proc.stderr
    # judge + 2 seeds x 5 eps x (train, fisher, transfer, invert) + report
    assert calls.count("advtrain.py") == 11 and calls.count("invert.py") == 10
    assert calls[-1] == "report.py"
    assert (tmp_path / "res" / "l2_eps0.25_seed1" / "transfer.json").exists()
    proc, calls = run_all(tmp_path)
    assert proc.returncode == 0 and calls == ["report.py"]
    assert proc.stdout.count(": skip ") == 41
    proc, calls = run_all(tmp_path, force="1")
    assert len(calls) == 42


def test_run_all_runs_one_job_per_core_whatever_omp_num_threads_says(tmp_path):
    """GNU nproc answers OMP_NUM_THREADS when it is set (the test suite sets it to 1)."""
    proc, _ = run_all(tmp_path, jobs=None, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(os.sched_getaffinity(0))} jobs at once" in proc.stdout, proc.stdout


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
    edit('"l2 1.0" "l2 2.0")', '"l2 1.0" "l2 4.0")')
    proc, calls = run_all(tmp_path, script=script)
    # the two cells' jobs, then their inversions
    cell_jobs = ["advtrain.py", "fisher.py", "transfer.py"] * 2
    assert calls == cell_jobs + ["invert.py"] * 2 + ["report.py"]
    # every inversion uses the judge
    edit("JUDGE=(--norm l2 --eps 0.5)", "JUDGE=(--norm l2 --eps 1.0)")
    proc, calls = run_all(tmp_path, script=script)
    assert calls == ["advtrain.py"] + ["invert.py"] * 10 + ["report.py"]
    edit("--epochs 4", "--epochs 5")  # training settings: every step
    proc, calls = run_all(tmp_path, script=script)
    assert calls.count("advtrain.py") == 11 and calls.count("fisher.py") == 10 and len(calls) == 42


def test_run_all_resumes_a_training_of_the_same_settings_and_restarts_one_of_others(tmp_path):
    """A training stopped before its metrics.json keeps its checkpoint and log (advtrain.py
    --resume continues from them) when its command is the recorded one; with other settings, or
    FORCE=1, they are removed before it runs, so it starts afresh."""
    script = tmp_path / "run_all.sh"
    shutil.copy(ROOT / "run_all.sh", script)
    shutil.copy(ROOT / "setup_python.sh", tmp_path)
    assert run_all(tmp_path, script=script)[0].returncode == 0
    cell = tmp_path / "res" / "l2_eps0.5_seed1"

    def stopped_midway():
        (cell / "metrics.json").unlink()
        (cell / "model.pt").write_text("epoch 2")
        (cell / "log.jsonl").write_text("{}")

    stopped_midway()
    proc, calls = run_all(tmp_path, script=script)
    assert proc.returncode == 0 and calls == ["advtrain.py", "report.py"]
    assert (cell / "model.pt").read_text() == "epoch 2" and (cell / "log.jsonl").exists()
    stopped_midway()
    script.write_text(script.read_text().replace("--epochs 4", "--epochs 5", 1))
    assert run_all(tmp_path, script=script)[0].returncode == 0
    assert not (cell / "model.pt").exists() and not (cell / "log.jsonl").exists()
    stopped_midway()
    assert run_all(tmp_path, script=script, force="1")[0].returncode == 0
    assert not (cell / "model.pt").exists() and not (cell / "log.jsonl").exists()


def test_run_all_stops_at_a_failing_step(tmp_path):
    proc, calls = run_all(tmp_path, fail="fisher.py")
    assert proc.returncode != 0
    assert "boom from fisher.py" in proc.stderr and "FAILED" in proc.stderr
    assert calls == ["advtrain.py", "advtrain.py", "fisher.py"]
    assert not (tmp_path / "res" / "report.md").exists()


def test_run_all_in_parallel_runs_every_step_once_and_stops_at_a_failure(tmp_path):
    proc, calls = run_all(tmp_path, jobs="3", judge_sleep="1")
    assert proc.returncode == 0, proc.stderr
    steps = ["advtrain.py"] * 11 + ["fisher.py", "transfer.py", "invert.py"] * 10 + ["report.py"]
    assert sorted(calls) == sorted(steps)
    assert calls[-1] == "report.py"
    # every inversion starts after the judge's training (slow here) and its own cell's transfer
    order = (tmp_path / "calls.order").read_text().splitlines()
    cells = {line.split()[2] for line in order if line.startswith("start invert.py")}
    assert len(cells) == 10
    for cell in cells:
        start = order.index(f"start invert.py {cell}")
        assert start > order.index("end advtrain.py judge")
        assert start > order.index(f"end transfer.py {cell}")
    # every line names its cell, even when jobs interleave
    done = [line for line in proc.stdout.splitlines() if line.startswith("[") and " done " in line]
    assert done and all(": " in line for line in done)
    (tmp_path / "again").mkdir()
    proc, calls = run_all(tmp_path / "again", fail="transfer.py", jobs="3")
    assert proc.returncode != 0 and "study stopped" in proc.stderr and "report.py" not in calls


# wall times and paths differ between runs
TIMING_KEYS = {"seconds", "fit_seconds", "train_seconds", "ckpt"}


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def smoke(out, seeds, jobs):
    # on the CPU (no GPU visible): identical files for any JOBS are a CPU property
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SEEDS=seeds, JOBS=jobs,
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "paper", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_paper_preset_smoke_parallel_equals_sequential(tmp_path):
    """The paper code path (resnet18, L2 and Linf, several targets) on tiny synthetic data,
    one seed with 2 jobs at once: the eps = 0 model is attacked in both norms, so each norm's
    grid has its baseline (report.py's use of it: tests/test_report.py). The same, one job at
    a time, gives identical files."""
    smoke(tmp_path / "parallel", "0", "2")
    runs = {p.parent.name: json.loads(p.read_text())
            for p in (tmp_path / "parallel").glob("*/metrics.json")}
    assert set(runs) == {"judge"} | {f"{cell}_seed{s}" for s in range(1)
                                     for cell in ("l2_eps0", "l2_eps0.5", "linf_eps8_255")}
    for name, metrics in runs.items():
        radii = {(r["norm"], round(r["eps"], 6)) for r in metrics["robust_acc"]}
        assert {("l2", 0.5), ("linf", round(8 / 255, 6))} <= radii, name
    assert runs["linf_eps8_255_seed0"]["eps"] == pytest.approx(8 / 255)
    transfer = json.loads((tmp_path / "parallel" / "linf_eps8_255_seed0" / "transfer.json")
                          .read_text())
    assert {"synthetic:0-4", "fashion-mnist:5-9"} <= set(transfer)
    assert json.loads((tmp_path / "parallel" / "study.json").read_text())["preset"] == "paper-smoke"
    summary = json.loads((tmp_path / "parallel" / "summary.json").read_text())
    assert set(summary["claims"]) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    # one seed of a two-eps grid per norm: judged per norm, decided at no level
    by_norm = summary["claims"]["C1"]["by_norm"]
    assert set(by_norm) == {"l2", "linf"}, by_norm
    assert all(claim["verdict"] == "undetermined" for claim in summary["claims"].values())

    proc = smoke(tmp_path / "sequential", "0", "1")
    assert "1 jobs at once" in proc.stdout
    compared = 0
    for path in sorted((tmp_path / "sequential").glob("*/*")):
        twin = tmp_path / "parallel" / path.relative_to(tmp_path / "sequential")
        if path.suffix == ".json":
            assert (without_timing(json.loads(path.read_text()))
                    == without_timing(json.loads(twin.read_text()))), path
        elif path.suffix == ".npy":
            assert np.array_equal(np.load(path), np.load(twin)), path
        else:
            continue
        compared += 1
    assert compared >= 4 * 3 + 1  # metrics, fisher, transfer, invert of 3 cells, and the judge
