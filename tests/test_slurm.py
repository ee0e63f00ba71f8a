"""run_all.sh beyond one machine, against a real Slurm: a one-node cluster (munged, slurmctld,
slurmd from Debian's munge and slurm-wlm) started in a temporary folder by the `cluster`
fixture and stopped by its process ids. Through Slurm, whose tasks run the plan's lines, the
paper smoke gives every output of the local runner, number for number; a cell that fails and
a task cancelled midway leave the other cells complete, the report names them, and a
resubmission finishes the study with the same outputs. The local run is also the paper
preset's end-to-end smoke test, which needs no Slurm.

Every run works in a copy of the repository (its tracked files), so that the planted failure
edits a copy and every run records the same code revision."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, under_ci

pytestmark = pytest.mark.slow

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld",
           "slurmd": "/usr/sbin/slurmd"}
INSTALL = "apt-get install -y slurm-wlm munge (Debian/Ubuntu; run as root)"
SMOKE_CELLS = ("l2_eps0_seed0", "l2_eps0.5_seed0", "linf_eps8_255_seed0")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout, what):
    """Poll condition() every 0.2 s until it is true; fail the test after timeout seconds."""
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


SLURM_CONF = """\
ClusterName=test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Slurm cluster with this machine's cores: the environment its clients need
    (SLURM_CONF). Skipped (failed under CI=true) with one line where Slurm is absent."""
    missing = [path for path in DAEMONS.values() if not os.access(path, os.X_OK)]
    missing += [c for c in ("sbatch", "squeue", "scancel", "sinfo") if not shutil.which(c)]
    reason = (f"Slurm is not installed ({', '.join(missing)} missing): {INSTALL}" if missing
              else None if os.geteuid() == 0 else "the one-node Slurm of these tests runs as root")
    if reason:
        if under_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(SLURM_CONF.format(
        host=host, dir=folder, ctld_port=free_port(), d_port=free_port(),
        cpus=len(os.sched_getaffinity(0))))
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"))
    commands = [  # each in the foreground (-F, -D): its process id is the daemon's
        # --force: munged wants every folder above its socket open to all (pytest's are not)
        [DAEMONS["munged"], "-F", "--force", f"--key-file={key}", f"--socket={folder}/munge.sock",
         f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
         f"--seed-file={folder}/munge.seed"],
        [DAEMONS["slurmctld"], "-D", "-i"],
        [DAEMONS["slurmd"], "-D"],
    ]
    daemons = []
    try:
        for command in commands:
            daemons.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
            if command[0] == DAEMONS["munged"]:
                wait_for(lambda: (folder / "munge.sock").exists(), 30, "munged's socket")

        def idle():
            proc = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                  text=True)
            return proc.stdout.strip() == "idle"
        wait_for(idle, 60, "the Slurm node to be idle")
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for daemon in reversed(daemons):  # slurmd, slurmctld, munged: by their process ids
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the repository's tracked files (and the local runner's reference run of the
    paper smoke in it, results/local)."""
    copy = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    proc = study(copy, JOBS="2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (copy / "results" / "smoke").rename(copy / "results" / "local")
    return copy


def study(repo, *options, env=None, **settings):
    """`bash run_all.sh paper --smoke OPTIONS` in the copy, seed 0, into results/smoke."""
    environ = dict(env or os.environ, PYTHON=sys.executable, SEEDS="0", CUDA_VISIBLE_DEVICES="",
                   OUT="results/smoke", **settings)
    return subprocess.run(["bash", str(repo / "run_all.sh"), "paper", "--smoke", *options],
                          cwd=repo, env=environ, capture_output=True, text=True, timeout=600)


def submit(repo, env):
    """--slurm: the job ids (judge, cells, inversions, report) and the process."""
    proc = study(repo, "--slurm", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = (repo / "results" / "smoke" / "slurm" / "jobs").read_text().split()
    assert len(ids) == 4, ids
    return ids, proc


def wait_jobs(ids, env, timeout=480):
    def ended():
        proc = subprocess.run(["squeue", "-h", "-j", ",".join(ids)], env=env,
                              capture_output=True, text=True)
        return proc.returncode == 0 and not proc.stdout.strip()
    wait_for(ended, timeout, f"Slurm jobs {ids} to end")


def without_timings(value):
    """A JSON value less its wall-clock fields (train_seconds, seconds, ...)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def outputs(folder):
    """Every output of a results folder a run must reproduce: {relative path: content}, JSON
    (and JSON lines) less timings, .npy arrays as bytes, report.md. Logs, the plan, the
    scheduler's files and the step timings are where and how long, not what."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not path.is_file() or name.startswith("slurm/") or name in ("study.json",):
            continue
        if path.suffix == ".json":
            found[name] = without_timings(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            found[name] = [without_timings(json.loads(line))
                           for line in path.read_text().splitlines()]
        elif path.suffix == ".npy":
            found[name] = np.load(path).tobytes()
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                found[name] = {k: arrays[k].tobytes() for k in arrays.files}
        elif path.suffix == ".md" or path.name.endswith(".cmd"):
            found[name] = path.read_bytes()
    return found


def assert_same_outputs(run, reference):
    got, want = outputs(run), outputs(reference)
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    different = [name for name in want if got[name] != want[name]]
    assert not different, different


def test_slurm_runs_the_local_study_and_a_failed_or_cancelled_cell_is_named_then_finished(
        cluster, repo):
    """One submission with a planted bad setting (the Linf cell's eps 8/0) and the eps 0 cell's
    task cancelled midway: the eps 0.5 cell completes, the report (after every task) names both
    others; the settings restored, a resubmission finishes the study with the local runner's
    outputs, redoing only what was missing."""
    out = repo / "results" / "smoke"
    script = repo / "run_all.sh"
    good = script.read_text()
    smoke_grid = 'GRID=("l2 0" "l2 0.5" "linf 8/255")'
    assert good.count(smoke_grid) == 1
    script.write_text(good.replace(smoke_grid, smoke_grid.replace("8/255", "8/0")))
    try:  # (each task runs the checkout's scripts as they are when it starts)
        ids, proc = submit(repo, cluster)
        judge, cells, inversions, report = ids
        assert f"array {cells}" in proc.stdout and "squeue -j" in proc.stdout, proc.stdout
        again = study(repo, "--slurm", env=cluster)  # one submission at a time: one writer
        assert again.returncode == 2 and "still queued or running" in again.stderr, again.stderr
        # the eps 0 cell runs last of the cells (robust cells first): cancel it once it trains
        plain_log = out / "l2_eps0_seed0" / "train.log"
        wait_for(plain_log.exists, 300, "the eps 0 cell's training to start")
        subprocess.run(["scancel", f"{cells}_3"], env=cluster, check=True)
        wait_jobs(ids, cluster)
    finally:
        script.write_text(good)
    summary = json.loads((out / "summary.json").read_text())
    unfinished = {s["cell"] for s in summary["incomplete"]}
    assert unfinished == {"linf_eps8_0_seed0", "l2_eps0_seed0"}, summary["incomplete"]
    text = (out / "report.md").read_text()
    assert "Did not finish" in text and "linf_eps8_0_seed0" in text and "l2_eps0_seed0" in text
    for name in ("metrics.json", "fisher.json", "transfer.json", "invert.json"):
        assert (out / "l2_eps0.5_seed0" / name).is_file(), name
    # the same command again: only what is missing runs, and the study is the local one
    ids, _ = submit(repo, cluster)
    wait_jobs(ids, cluster)
    shutil.rmtree(out / "linf_eps8_0_seed0")  # the planted setting's cell: not of this study
    assert_same_outputs(out, repo / "results" / "local")
    log = next((out / "slurm").glob(f"cells-{ids[1]}_1.out")).read_text()
    assert "l2_eps0.5_seed0: skip metrics.json" in log and " done " not in log, log


def test_the_local_paper_smoke_writes_every_file_and_judges_nothing(repo):
    """The reference run itself (no Slurm needed): the paper code path (resnet18, L2 and Linf,
    several targets) on tiny synthetic data, one seed with 2 jobs at once. Every step of every
    cell writes its files; the eps = 0 model is attacked in both norms, so each norm's grid has
    its baseline (report.py's use of it: tests/test_report.py). That another JOBS gives the
    same files: tests/test_study.py::test_run_all_gives_each_step_the_same_command_whatever_jobs."""
    out = repo / "results" / "local"
    runs = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/metrics.json")}
    assert set(runs) == {"judge", *SMOKE_CELLS}
    for name, metrics in runs.items():
        radii = {(r["norm"], round(r["eps"], 6)) for r in metrics["robust_acc"]}
        assert {("l2", 0.5), ("linf", round(8 / 255, 6))} <= radii, name
    assert runs["linf_eps8_255_seed0"]["eps"] == pytest.approx(8 / 255)
    for cell in SMOKE_CELLS:
        for name in ("fisher.json", "transfer.json", "invert.json"):
            assert (out / cell / name).is_file(), (cell, name)
    transfer = json.loads((out / "linf_eps8_255_seed0" / "transfer.json").read_text())
    assert {"synthetic:0-4", "fashion-mnist:5-9"} <= set(transfer)
    assert json.loads((out / "study.json").read_text())["preset"] == "paper-smoke"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["claims"]) == {"C1", "C2", "C3", "C4", "C5", "C6"}
    # one seed of a two-eps grid per norm: judged per norm, decided at no level
    by_norm = summary["claims"]["C1"]["by_norm"]
    assert set(by_norm) == {"l2", "linf"}, by_norm
    assert all(claim["verdict"] == "undetermined" for claim in summary["claims"].values())
