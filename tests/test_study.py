"""run_all.sh: the declaration, skip, redo on changed settings, resume, force, failure, the
order of the pool's jobs; the paper preset on synthetic data."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT


FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in interpreter: records the call and writes the output the real script would.
    [ "$1" = -c ] && exit 0  # setup_python.sh asks whether it imports torch: it does
    echo "threads $OMP_NUM_THREADS $MKL_NUM_THREADS gpus ${CUDA_VISIBLE_DEVICES-unset}: $*" \
      >> "$CALLS.full"
    [ "$2" = --declare ] && { echo "declare:$3" >> "$CALLS"; echo {} > "$4/study.json"; exit 0; }
    echo "$1" >> "$CALLS"
    script=$1; shift
    out=""
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    [ "$script" = report.py ] && out=$(cat "$CALLS.out")
    echo "start $script $(basename "$out")" >> "$CALLS.order"
    if [ "$script" = "$FAIL" ] && [ -z "$FAIL_CELL" -o "$(basename "$out")" = "$FAIL_CELL" ]; then
      echo "boom from $script" >&2; exit 3
    fi
    echo $$ >> "$CALLS.pids"
    [ "$(basename "$out")" = judge ] && sleep "${JUDGE_SLEEP:-0}"
    sleep "${STEP_SLEEP:-0}"
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
            seeds="0 1", out="res", args=(), **extra_env):
    """The quick preset (default seeds 0 1) with the stand-in interpreter: (process, the
    scripts called after the declaration, which must come first and once). jobs None: JOBS
    unset; out None: OUT unset (the default folder, under the script's folder)."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    (tmp_path / "calls.order").write_text("")
    (tmp_path / "calls.full").write_text("")
    # CUDA_VISIBLE_DEVICES empty: no GPU, whatever the machine has (tests/test_gpu_scripts.py
    # tests the pool on GPUs)
    env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), FAIL=fail, FORCE=force,
               OUT=str(tmp_path / (out or "")), SEEDS=seeds, JOBS=jobs, JUDGE_SLEEP=judge_sleep,
               CUDA_VISIBLE_DEVICES="", **extra_env)
    for name, value in (("JOBS", jobs), ("OUT", out)):
        if value is None:
            del env[name]
    # output to files, not pipes: a process the study leaves behind cannot hold the call open
    with open(tmp_path / "stdout", "w+") as out_file, open(tmp_path / "stderr", "w+") as err_file:
        proc = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=env, stdout=out_file,
                              stderr=err_file, text=True, timeout=300)
        out_file.seek(0), err_file.seek(0)
        proc.stdout, proc.stderr = out_file.read(), err_file.read()
    calls = calls.read_text().split()
    declare = f"declare:{args[0] if args and not args[0].startswith('-') else 'quick'}"
    assert calls[:1] == [declare] and calls.count(declare) == 1, calls
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
    """One seed: the judge and five cells."""
    script = tmp_path / "run_all.sh"
    shutil.copy(ROOT / "run_all.sh", script)
    shutil.copy(ROOT / "setup_python.sh", tmp_path)
    assert run_all(tmp_path, script=script, seeds="0")[0].returncode == 0

    def edit(old, new):  # the first occurrence: the quick preset's
        text = script.read_text()
        assert old in text, old
        script.write_text(text.replace(old, new, 1))

    edit("FISHER=(--n 512)", "FISHER=(--n 256)")
    proc, calls = run_all(tmp_path, script=script, seeds="0")
    assert proc.returncode == 0 and calls == ["fisher.py"] * 5 + ["report.py"]
    edit('"l2 1.0" "l2 2.0")', '"l2 1.0" "l2 4.0")')
    proc, calls = run_all(tmp_path, script=script, seeds="0")
    # the new cell's job, then its inversion
    assert calls == ["advtrain.py", "fisher.py", "transfer.py", "invert.py", "report.py"]
    # every inversion uses the judge
    edit("JUDGE=(--norm l2 --eps 0.5)", "JUDGE=(--norm l2 --eps 1.0)")
    proc, calls = run_all(tmp_path, script=script, seeds="0")
    assert calls == ["advtrain.py"] + ["invert.py"] * 5 + ["report.py"]
    edit("--epochs 4", "--epochs 5")  # training settings: every step
    proc, calls = run_all(tmp_path, script=script, seeds="0")
    assert calls.count("advtrain.py") == 6 and calls.count("fisher.py") == 5 and len(calls) == 22


def test_run_all_resumes_a_training_of_the_same_settings_and_restarts_one_of_others(tmp_path):
    """A training stopped before its metrics.json keeps its checkpoint and log (advtrain.py
    --resume continues from them) when its command is the recorded one; with other settings, or
    FORCE=1, they are removed before it runs, so it starts afresh (one seed)."""
    script = tmp_path / "run_all.sh"
    shutil.copy(ROOT / "run_all.sh", script)
    shutil.copy(ROOT / "setup_python.sh", tmp_path)
    assert run_all(tmp_path, script=script, seeds="0")[0].returncode == 0
    cell = tmp_path / "res" / "l2_eps0.5_seed0"

    def stopped_midway():
        (cell / "metrics.json").unlink()
        (cell / "model.pt").write_text("epoch 2")
        (cell / "log.jsonl").write_text("{}")

    stopped_midway()
    proc, calls = run_all(tmp_path, script=script, seeds="0")
    assert proc.returncode == 0 and calls == ["advtrain.py", "report.py"]
    assert (cell / "model.pt").read_text() == "epoch 2" and (cell / "log.jsonl").exists()
    stopped_midway()
    script.write_text(script.read_text().replace("--epochs 4", "--epochs 5", 1))
    assert run_all(tmp_path, script=script, seeds="0")[0].returncode == 0
    assert not (cell / "model.pt").exists() and not (cell / "log.jsonl").exists()
    stopped_midway()
    assert run_all(tmp_path, script=script, seeds="0", force="1")[0].returncode == 0
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


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # (a zombie has ended)


def test_a_failing_step_stops_every_job_with_all_its_processes_and_a_rerun_finishes(tmp_path):
    """Three jobs at once, each step 1.5 s: the first cell's Fisher fails while the other jobs
    are inside their steps. The study stops, and with it every process it started: none is
    alive when it returns, and none goes on to its next step (each job is a process group of
    its own, stopped whole). Run again, the study finishes."""
    proc, calls = run_all(tmp_path, fail="fisher.py", jobs="3", STEP_SLEEP="1.5",
                          FAIL_CELL="l2_eps2.0_seed0")
    assert proc.returncode == 1 and "study stopped: a step failed" in proc.stderr, proc.stderr
    pids = [int(p) for p in (tmp_path / "calls.pids").read_text().split()]
    assert pids and not [p for p in pids if alive(p)]
    order = (tmp_path / "calls.order").read_text()
    time.sleep(2.5)  # an orphan would now start its next step
    assert (tmp_path / "calls.order").read_text() == order
    assert (tmp_path / "calls.pids").read_text().split() == [str(p) for p in pids]
    proc, calls = run_all(tmp_path, jobs="3")
    assert proc.returncode == 0, proc.stderr
    assert calls.count("invert.py") == 10 and calls[-1] == "report.py"


def test_another_seed_set_is_a_study_of_its_own_folder(tmp_path):
    """SEEDS=0 (any set but the preset's) writes to results/quick-seeds0, not beside the
    preset's study (the report judges every run in its folder); the preset's own seeds, given
    or not, write to results/quick; OUT still decides when given."""
    script = tmp_path / "run_all.sh"
    shutil.copy(ROOT / "run_all.sh", script)
    shutil.copy(ROOT / "setup_python.sh", tmp_path)
    for seeds, folder in (("0", "quick-seeds0"), ("1  0", "quick-seeds1-0"),
                          ("0 1 2 3 4 5", "quick")):
        proc, calls = run_all(tmp_path, script=script, seeds=seeds, out=None, jobs="2")
        assert proc.returncode == 0, proc.stderr
        cells = sorted(p.parent.name for p in (tmp_path / "results" / folder).glob(
            "l2_eps0_seed*/metrics.json"))
        assert cells == [f"l2_eps0_seed{s}" for s in sorted(seeds.split())], (seeds, cells)
        assert f" in results/{folder} on cpu;" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == \
        ["quick", "quick-seeds0", "quick-seeds1-0"]


def test_run_all_passes_a_redeclaration_on_and_a_refused_declaration_stops_it(tmp_path):
    """--redeclare reaches report.py --declare; a declaration refused (exit 2) stops the study
    before any step."""
    proc, _ = run_all(tmp_path, args=("quick", "--redeclare"))
    assert proc.returncode == 0, proc.stderr
    assert "--declare quick " + str(tmp_path / "res") + " --redeclare" in \
        (tmp_path / "calls.full").read_text()
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.replace('echo {} > "$4/study.json"; exit 0;',
                                        'echo "error: declares other decisions" >&2; exit 2;'))
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=str(fake),
                                              CALLS=str(tmp_path / "calls"),
                                              OUT=str(tmp_path / "other"), SEEDS="0"))
    assert proc.returncode == 2 and "declares other decisions" in proc.stderr
    assert not list((tmp_path / "other").glob("*/.*.cmd"))


def test_run_all_gives_each_step_the_same_command_whatever_jobs(tmp_path):
    """What makes JOBS=1 and JOBS=3 give identical files on the CPU (run_all.sh's promise):
    every step gets the same command line, torch threads and GPUs (none) whatever JOBS, and a
    script's output is a function of those (on the CPU: test_resume_matches_uninterrupted_run)."""
    commands = {}
    for jobs in ("1", "3"):
        folder = tmp_path / f"jobs{jobs}"
        folder.mkdir()
        proc, _ = run_all(folder, jobs=jobs)
        assert proc.returncode == 0, proc.stderr
        commands[jobs] = sorted((folder / "calls.full").read_text().replace(str(folder), "OUT")
                                .splitlines())
    assert len(commands["1"]) == 43 and commands["1"] == commands["3"]
    assert all(line.startswith("threads 1 1 gpus : ") for line in commands["1"]), commands["1"]


def test_the_plan_runs_through_another_engine_as_the_pool_would(tmp_path):
    """--plan's lines, run stage by stage by `xargs -P 2` (no run_all.sh pool, no Slurm), run
    every step of the study, each inversion after its cell and the judge, the report last; the
    local pool then finds every step done by its own command and skips it. (The real scripts
    through the plan's lines give the local outputs number for number: tests/test_slurm.py.)"""
    proc, _ = run_all(tmp_path, args=("--plan",))
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    cells = [f"{norm}_eps{eps}_seed{seed}" for seed in (0, 1)
             for norm, eps in (("l2", "0.25"), ("l2", "0.5"), ("l2", "1.0"), ("l2", "2.0"))]
    cells += ["l2_eps0_seed0", "l2_eps0_seed1"]
    assert [(stage, name) for stage, name, _ in lines] == (
        [("1", "judge")] + [("1", c) for c in cells] + [("2", f"invert:{c}") for c in cells]
        + [("3", "report")])
    env = dict(os.environ, CALLS=str(tmp_path / "calls"))
    for stage in "123":
        commands = "\n".join(command for s, _, command in lines if s == stage) + "\n"
        run = subprocess.run(["xargs", "-d", "\n", "-n", "1", "-P", "2", "bash", "-c"],
                             input=commands, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    order = (tmp_path / "calls.order").read_text().splitlines()
    for cell in cells:
        assert order.index(f"start invert.py {cell}") > max(
            order.index(f"end transfer.py {cell}"), order.index("end advtrain.py judge"))
    assert order[-2:] == ["start report.py res", "end report.py res"], order[-2:]
    assert (tmp_path / "res" / "report.md").is_file()
    proc, calls = run_all(tmp_path)
    assert proc.returncode == 0 and calls == ["report.py"], (calls, proc.stderr)
    assert proc.stdout.count(": skip ") == 1 + 4 * len(cells), proc.stdout


FAKE_SBATCH = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in sbatch: records its arguments, a line per call, and answers a job id
    echo "$*" >> "$SBATCH_CALLS"
    wc -l < "$SBATCH_CALLS"
""")


@pytest.mark.parametrize("preset,threads,gpu", [("quick", "1", False), ("paper", "4", True)])
def test_slurm_tasks_ask_the_presets_resources_and_the_users_options(tmp_path, preset, threads,
                                                                     gpu):
    """What --slurm asks of sbatch (the real Slurm runs the study in tests/test_slurm.py; a GPU
    node is not there to ask): THREADS cores a task, one GPU unless the preset runs on the CPU,
    SBATCH_ARGS on every job; the report, after every task, on one core."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    calls = tmp_path / "sbatch.calls"
    proc, _ = run_all(tmp_path, args=(preset, "--slurm"), THREADS=threads,
                      PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_CALLS=str(calls),
                      SBATCH_ARGS="--partition=lab --time=01:00:00")
    assert proc.returncode == 0, proc.stderr
    judge, cells, inversions, report = calls.read_text().splitlines()
    n = 2 * (5 if preset == "quick" else 7)  # seeds 0 1 x the grid
    for job in (judge, cells, inversions):
        assert f"--cpus-per-task {threads}" in job and ("--gres gpu:1" in job) == gpu, job
    assert f"--array 1-{n} " in cells and f"--array 1-{n} " in inversions
    assert "--dependency aftercorr:2,afterok:1" in inversions
    assert "--kill-on-invalid-dep yes" in inversions
    assert "--dependency afterany:1:2:3" in report and "--gres" not in report
    assert "--cpus-per-task 1 " in report
    assert all("--partition=lab --time=01:00:00" in job for job in (judge, cells, inversions,
                                                                     report))
    assert (tmp_path / "res" / "slurm" / "jobs").read_text().split() == ["1", "2", "3", "4"]
    assert "squeue -j 1,2,3,4" in proc.stdout


def test_run_all_help_and_bad_options_are_one_line(tmp_path):
    """--help prints the header (how to run it, here or on a cluster); an unknown option, a
    second preset or an unknown task: one line, exit 2, before any step."""
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "--slurm" in proc.stdout and "--plan" in proc.stdout
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), CALLS=str(tmp_path / "calls"),
               OUT=str(tmp_path / "res"))
    for args, expect in ((("--bogus",), "unknown option '--bogus'"),
                         (("quick", "paper"), "one preset, got 'quick' and 'paper'"),
                         (("quick", "--smoke"), "unknown option '--smoke' for preset quick"),
                         (("quick", "--task", "l2_eps9_seed0"), "no task 'l2_eps9_seed0'")):
        proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True,
                              text=True, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr
        assert not (tmp_path / "calls").exists() and not (tmp_path / "res").exists()
