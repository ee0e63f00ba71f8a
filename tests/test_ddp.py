"""advtrain.py under torchrun on the CPU (gloo, 2 processes): the global batch is split
exactly, one process writes, and a killed run resumes to the uninterrupted result."""
import gc
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import advtrain
from conftest import ROOT


def tiny_data(n=301):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def tiny_net():
    torch.manual_seed(0)  # no BatchNorm: SyncBatchNorm does not run on the CPU
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def one_epoch(model, shard=None):
    x, y = tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)  # the same order in every process
    return advtrain.train_epoch(model, opt, x, y, batch_size=64, eps=0.0, steps=0, shard=shard)


def test_shards_split_each_global_batch_and_weigh_their_losses():
    """Two processes' shares of a batch of 45: 23 + 22 examples, every one once; the weights
    make the average of the two mean losses the mean over the batch."""
    idx = torch.randperm(45)
    shares = [advtrain.ddp_shard(rank, 2)(idx) for rank in range(2)]
    assert sorted(torch.cat([share for share, _ in shares]).tolist()) == sorted(idx.tolist())
    assert [(len(share), weight) for share, weight in shares] == [(23, 46 / 45), (22, 44 / 45)]
    losses = torch.rand(45)
    mean_of_weighted = sum(w * losses[share].mean() for share, w in shares) / 2
    torch.testing.assert_close(mean_of_weighted, losses[idx].mean())


def ddp_worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(tiny_net())
    loss, acc, _ = one_epoch(model, advtrain.ddp_shard(rank, 2))
    if rank == 0:
        torch.save({"state": model.module.state_dict(), "loss": loss, "acc": acc}, out)
    del model
    gc.collect()  # DDP's reducer goes before the group it talks to (else a C++ terminate at exit)
    dist.barrier()  # neither process leaves the group while the other still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_take_the_global_batch_exactly(tmp_path):
    """Batches of 64 of 301 examples (the last one 45: 23 + 22 per process): after one epoch,
    DDP's weights equal one process's up to float summation order."""
    mp.spawn(ddp_worker, args=(tmp_path / "store", tmp_path / "ddp.pt"), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = tiny_net()
    loss, acc, _ = one_epoch(single)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-5, atol=1e-6)
    assert ddp["loss"] == pytest.approx(loss, rel=1e-5) and ddp["acc"] == pytest.approx(acc)


def torchrun(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "advtrain.py", "--classes", "0-4", "--train-size", "3000", "--test-size", "200",
           "--epochs", "3", "--eps", "0.5", "--steps", "1", "--eval-steps", "2", "--device", "cpu",
           "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_torchrun_writes_once_and_a_killed_run_resumes_to_the_same_result(tmp_path):
    full = torchrun(tmp_path / "full")
    assert full.returncode == 0, full.stdout + full.stderr
    # one process speaks and writes
    assert full.stdout.count("epoch 1/3") == 1 and "2 processes" in full.stdout
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "log.jsonl", "metrics.json", "model.pt"]

    cut = torchrun(tmp_path / "cut", wait=False)  # killed once its first epoch is saved
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 300
    while (not (log.exists() and log.read_text().count("\n") >= 1) and time.time() < deadline
           and cut.poll() is None):
        time.sleep(0.05)
    # torchrun's workers live in process groups of their own: kill every process of this run
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "cut")], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    cut.wait()
    epochs_done = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["epoch"]
    assert epochs_done < 3, "the run finished before it could be killed"
    resumed = torchrun(tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from epoch {epochs_done}" in resumed.stdout
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "cut")]
    assert metrics[0]["clean_acc"] == metrics[1]["clean_acc"]
    assert metrics[0]["robust_acc"] == metrics[1]["robust_acc"]


def test_sync_bn_without_cuda_is_one_line():
    from conftest import assert_user_error, run_script
    assert_user_error(run_script("advtrain.py", "--sync-bn", "--epochs", "1", "--train-size", "64",
                                 "--test-size", "32"), "needs torchrun with CUDA")
