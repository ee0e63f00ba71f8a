"""The GPU code of the shell scripts, on the CPU: run_all.sh's pool on 1, 2 and 4 GPUs of a
stand-in nvidia-smi (tests/fake_nvidia_smi) with a stand-in interpreter that records which GPU
each step saw, and tests/gpu_check.sh's bookkeeping of its stages."""
import os
import subprocess
import textwrap

import pytest

from conftest import ROOT

FAKE_SMI = ROOT / "tests" / "fake_nvidia_smi"

# Stand-in interpreter: writes the output the real script would, and records when each step
# starts and ends with the GPUs it sees (CUDA_VISIBLE_DEVICES), one line each, in order.
FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    [ "$1" = -c ] && exit 0  # setup_python.sh asks whether it imports torch: it does
    [ "$1" = -m ] && exit 0  # pytest: passes
    [ "$1" = data.py ] && { echo fashion-mnist; exit 0; }  # present
    [ "$1" = tests/bench.py ] && { echo "| stage | rate |"; exit 0; }
    [ "$2" = --declare ] && { echo {} > "$4/study.json"; exit 0; }
    script=$1; shift
    out=""
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    [ "$script" = report.py ] && { echo ok > "$(cat "$LOG.out")/report.md"; exit 0; }
    echo "start $(basename "$out") [${CUDA_VISIBLE_DEVICES-none}]" >> "$LOG"
    case $out in  # gpu_check.sh's study (in OUT/study) trains its judge for STUDY_SLEEP s
      */study/judge) sleep "${STUDY_SLEEP:-0}" ;;
      */judge) sleep "${JUDGE_SLEEP:-0}" ;;
      *) sleep 0.05 ;;
    esac
    case $script in
      advtrain.py) echo "$(dirname "$out")" > "$LOG.out"; echo {} > "$out/metrics.json" ;;
      fisher.py) echo {} > "$out/fisher.json" ;;
      transfer.py) echo {} > "$out/transfer.json" ;;
      invert.py) echo {} > "$out/invert.json" ;;
    esac
    echo "end $(basename "$out") [${CUDA_VISIBLE_DEVICES-none}]" >> "$LOG"
""")


def pool(tmp_path, gpus, judge_sleep="0", device="auto", **env):
    """run_all.sh quick (seeds 0 1: the judge and 10 cells) with `gpus` stand-in GPUs and
    DEVICE=device (None: unset, the preset's CPU): (its stdout, the most steps that ran at once
    on each GPU name, the GPU names of steps)."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "steps.log"
    log.write_text("")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CUDA_VISIBLE_DEVICES", "JOBS", "JOBS_PER_GPU", "DEVICE")}
    if device is not None:
        environ["DEVICE"] = device
    environ.update(PATH=f"{FAKE_SMI}:{os.environ['PATH']}", FAKE_GPUS=str(gpus),
                   PYTHON=str(fake), LOG=str(log), OUT=str(tmp_path / "res"), SEEDS="0 1",
                   JUDGE_SLEEP=judge_sleep, **env)
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    running, most, seen = {}, {}, set()
    for line in log.read_text().splitlines():
        event, _, gpu = line.split(" ", 2)
        gpu = gpu.strip("[]")
        seen.add(gpu)
        running[gpu] = running.get(gpu, 0) + (1 if event == "start" else -1)
        most[gpu] = max(most.get(gpu, 0), running[gpu])
    assert all(n == 0 for n in running.values()) and len(log.read_text().splitlines()) == 2 * 41
    return proc.stdout, most, seen


@pytest.mark.parametrize("gpus,mib,per_gpu", [(1, 143771, 4), (2, 143771, 4), (4, 81559, 2)])
def test_run_all_shares_each_gpu_among_at_most_its_jobs(tmp_path, gpus, mib, per_gpu):
    """1 H200, 2 H200s, 4 80 GB GPUs: JOBS_PER_GPU from the memory (4, 4, 2), JOBS that many
    per GPU; a GPU never runs more than its share, every GPU runs some, and each job sees one
    GPU."""
    out, most, seen = pool(tmp_path, gpus, judge_sleep="0.5", FAKE_GPU_MIB=str(mib))
    assert seen == {str(i) for i in range(gpus)}
    assert max(most.values()) <= per_gpu and max(most.values()) > 1, most
    assert f"{gpus * per_gpu} jobs at once (at most {per_gpu} per GPU, {gpus} GPUs, " in out, out


@pytest.mark.parametrize("free,per_gpu,share", [(24000, 1, 23552), (100000, 3, 32768)])
def test_jobs_per_gpu_and_the_fisher_chunk_follow_the_free_memory(tmp_path, free, per_gpu, share):
    """A GPU with 24000 or 100000 MiB free: as many jobs as it holds of the preset's largest
    stage (the quick preset's JOB_MIB, 32768; at least 1), and every Fisher step gets the job's
    share in whole GiB (fisher.py --memory-mib fits its chunk to it); FISHER_CHUNK sets the
    chunk instead; on the CPU neither (the README's numbers keep their commands)."""
    out, most, _ = pool(tmp_path, 1, FAKE_GPU_FREE_MIB=str(free))
    assert f"(at most {per_gpu} per GPU, 1 GPUs, {share} MiB each)" in out, out
    assert max(most.values()) <= per_gpu, most
    stamps = list((tmp_path / "res").glob("*/.fisher.json.cmd"))
    assert len(stamps) == 10 and all(f"--memory-mib {share} " in p.read_text() for p in stamps)
    (tmp_path / "chunk").mkdir()
    pool(tmp_path / "chunk", 1, FAKE_GPU_FREE_MIB=str(free), FISHER_CHUNK="16")
    commands = [p.read_text() for p in (tmp_path / "chunk" / "res").glob("*/.fisher.json.cmd")]
    assert all("--chunk 16 " in c and "--memory-mib" not in c for c in commands), commands[0]
    (tmp_path / "cpu").mkdir()
    pool(tmp_path / "cpu", 1, device=None, FAKE_GPU_FREE_MIB=str(free))
    commands = [p.read_text() for p in (tmp_path / "cpu" / "res").glob("*/.fisher.json.cmd")]
    assert commands and not any("--memory-mib" in c or "--chunk" in c for c in commands)


def test_a_gpu_without_a_free_memory_reading_runs_one_job_and_the_presets_chunk(tmp_path):
    """nvidia-smi answering [N/A] for memory.free (as for a MIG instance): one line says so,
    one job per GPU, and Fisher keeps the preset's chunk."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / "steps.log").write_text("")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CUDA_VISIBLE_DEVICES", "JOBS", "JOBS_PER_GPU")}
    environ.update(PATH=f"{FAKE_SMI}:{os.environ['PATH']}", FAKE_GPU_FREE_MIB="[N/A]",
                   PYTHON=str(fake), LOG=str(tmp_path / "steps.log"), OUT=str(tmp_path / "res"),
                   SEEDS="0", DEVICE="auto")
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gives no free memory of GPU 0" in proc.stderr, proc.stderr
    assert "1 jobs at once (at most 1 per GPU, 1 GPUs)," in proc.stdout, proc.stdout
    commands = [p.read_text() for p in (tmp_path / "res").glob("*/.fisher.json.cmd")]
    assert len(commands) == 5 and not any("--memory-mib" in c for c in commands), commands


def test_a_task_run_alone_takes_its_gpus_free_memory(tmp_path):
    """--task (a Slurm task, with a GPU of its own): one job on it, so its Fisher step gets all
    of the 100000 MiB free in whole GiB, where the pool would share it among 3 jobs."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / "steps.log").write_text("")
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "JOBS")}
    environ.update(PATH=f"{FAKE_SMI}:{os.environ['PATH']}", FAKE_GPU_FREE_MIB="100000",
                   PYTHON=str(fake), LOG=str(tmp_path / "steps.log"), OUT=str(tmp_path / "res"),
                   SEEDS="0", DEVICE="auto")
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--task", "l2_eps0.5_seed0"],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stamp = (tmp_path / "res" / "l2_eps0.5_seed0" / ".fisher.json.cmd").read_text()
    assert "--memory-mib 99328 " in stamp, stamp  # 97 GiB


@pytest.mark.parametrize("gpus", [2, 4])
def test_run_all_starts_a_job_on_a_free_gpu_not_a_busy_one(tmp_path, gpus):
    """One job per GPU (JOBS_PER_GPU=1) while the judge's long training holds GPU 0: the next
    jobs go to the GPUs that are free at that moment, never onto GPU 0 beside the judge (a
    launch counter put the third job on GPU 0 while GPU 1 sat idle)."""
    out, most, seen = pool(tmp_path, gpus, judge_sleep="1", JOBS=str(gpus), JOBS_PER_GPU="1")
    assert seen == {str(i) for i in range(gpus)} and max(most.values()) == 1, most
    assert f"{gpus} jobs at once (at most 1 per GPU, {gpus} GPUs, " in out, out


def test_run_all_uses_the_visible_gpus_and_none_when_none_are_visible(tmp_path):
    """CUDA_VISIBLE_DEVICES names the GPUs to use (JOBS given: spread over them); set but empty
    it hides them all: one job per CPU core, and the steps see no CUDA_VISIBLE_DEVICES."""
    out, most, seen = pool(tmp_path, 4, CUDA_VISIBLE_DEVICES="3,1", JOBS="3")
    assert "3 jobs at once (at most 2 per GPU, 2 GPUs, " in out, out
    assert seen == {"3", "1"} and max(most.values()) <= 2
    (tmp_path / "cpu").mkdir()
    out, _, seen = pool(tmp_path / "cpu", 4, CUDA_VISIBLE_DEVICES="")
    assert f"{len(os.sched_getaffinity(0))} jobs at once," in out and seen == {""}, (out, seen)
    # as CUDA reads the list: up to its first invalid entry, so -1 hides every GPU
    (tmp_path / "none").mkdir()
    out, _, seen = pool(tmp_path / "none", 4, CUDA_VISIBLE_DEVICES="-1")
    assert f"{len(os.sched_getaffinity(0))} jobs at once," in out and seen == {"-1"}, (out, seen)
    (tmp_path / "first").mkdir()
    out, _, seen = pool(tmp_path / "first", 4, CUDA_VISIBLE_DEVICES="2,-1,3", JOBS="2")
    assert "(at most 2 per GPU, 1 GPUs, " in out and seen == {"2"}, (out, seen)


def test_the_quick_preset_runs_on_the_cpu_unless_a_device_is_asked_for(tmp_path):
    """Its numbers (the README's) were made on the CPU in float32: with GPUs present, every step
    still runs with --device cpu, one job per core, and sees no GPU; DEVICE=cuda moves it."""
    out, _, seen = pool(tmp_path, 2, device=None)
    assert " on cpu;" in out and f"{len(os.sched_getaffinity(0))} jobs at once," in out, out
    assert seen == {"none"}, seen
    calls = (tmp_path / "res" / "plan.tsv").read_text()
    assert "DEVICE=cpu" in calls, calls
    stamps = list((tmp_path / "res").glob("*/.*.cmd"))
    assert len(stamps) == 41 and all("--device cpu" in p.read_text() for p in stamps)
    (tmp_path / "gpu").mkdir()
    out, _, seen = pool(tmp_path / "gpu", 2, device="cuda")
    assert seen == {"0", "1"} and " on cuda;" in out, (out, seen)


def test_run_all_refuses_a_job_count_that_is_not_a_positive_integer(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    environ = dict(os.environ, JOBS_PER_GPU="two", OUT=str(tmp_path), PYTHON=str(fake))
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "JOBS_PER_GPU must be a positive integer, got 'two'" in \
        proc.stderr, proc.stderr


@pytest.mark.slow
def test_gpu_check_counts_the_studys_planned_stop_as_no_failure(tmp_path):
    """tests/gpu_check.sh's CUDA form with stand-ins (nvidia-smi, an interpreter whose tests
    pass and whose study's judge trains for 60 s): the study is stopped as planned, in time
    for the bench, every other stage is ok, and the check exits 0 (it used to record its own
    planned stop as a timeout and exit 1)."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "check"
    environ = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    # BUDGET 445 s, of which 420 are kept for the bench, compile, attacks and memory: the
    # study's limit is 10 s
    environ.update(PATH=f"{FAKE_SMI}:{os.environ['PATH']}", PYTHON=str(fake), DEVICE="cuda",
                   OUT=str(out), BUDGET="445", LOG=str(tmp_path / "steps.log"),
                   STUDY_SLEEP="60")
    proc = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh")], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=300)
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]]
    status = {row[0]: row[1] for row in rows}
    assert status["study"].startswith("stopped as planned"), (status, proc.stdout)
    assert all(status[name] == "ok" for name in ("smoke", "tests", "device", "bench",
                                                  "compile", "attacks", "memory")), status
    assert proc.returncode == 0, proc.stdout + proc.stderr
