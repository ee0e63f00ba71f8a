"""advtrain.py under torchrun on the CPU (gloo, 2 processes): the global batch is split
exactly, one process writes, a killed run resumes to the uninterrupted result, and every
collective's tensor lives on the process's device; the CUDA lines of the distributed set-up
(the GPU of each process, NCCL, SyncBatchNorm) run here with the group faked."""
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


def metrics_worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        n_local = (3, 5)[rank]
        metrics = {"clean_acc": (1 / 3, 3 / 5)[rank],
                   "robust_acc": [{"norm": "l2", "eps": 0.5, "acc": (0.0, 1 / 5)[rank]}]}
        # a tensor made without device= lands on the default device, here not the process's
        # (as a CPU tensor is not a CUDA process's: NCCL refuses it)
        with torch.device("meta"):
            reduced = advtrain.reduce_metrics(metrics, n_local, 2, torch.device("cpu"))
            totals = advtrain.all_reduce_sum(torch.tensor([1.0, 2.0], device="cpu"),
                                             torch.device("cpu"))
        if rank == 0:
            out.write_text(json.dumps({"metrics": reduced, "totals": totals.tolist(),
                                       "device": str(totals.device)}))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_collectives_put_their_tensors_on_the_process_device(tmp_path):
    """The evaluation's metrics of two processes (3 and 5 test examples) become those of all 8,
    reduced on the process's device even where a tensor made without device= would land
    elsewhere (the default device set to meta): the class of the NCCL failure ("No backend
    type associated with device type cpu") after a CUDA run's last epoch."""
    out = tmp_path / "reduced.json"
    mp.spawn(metrics_worker, args=(tmp_path / "store", out), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["metrics"]["clean_acc"] == pytest.approx(4 / 8)
    assert result["metrics"]["robust_acc"][0]["acc"] == pytest.approx(1 / 8)
    assert result["totals"] == [2.0, 4.0] and result["device"] == "cpu"


def test_init_distributed_gives_each_process_its_gpu_and_nccl(monkeypatch):
    """Under torchrun on CUDA each process takes the GPU of its LOCAL_RANK and joins an NCCL
    group; on the CPU a gloo group (the group itself is faked: these lines run here)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("gpu", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert advtrain.init_distributed(torch.device("cuda")) == (1, 2, torch.device("cuda", 1))
    assert calls == [("gpu", torch.device("cuda", 1)), "nccl"]
    calls.clear()
    assert advtrain.init_distributed(torch.device("cpu")) == (1, 2, torch.device("cpu"))
    assert calls == ["gloo"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert advtrain.init_distributed(torch.device("cuda")) == (0, 1, torch.device("cuda"))


def test_setup_model_converts_batchnorm_and_compiles_on_request():
    """--sync-bn's SyncBatchNorm and --compile's torch.compile, as setup_model builds them
    (main refuses --sync-bn but under torchrun on CUDA; SyncBatchNorm's forward needs both)."""
    import argparse
    import data as data_module
    ds = data_module.DATASETS["synthetic"]
    model_args = dict(arch="resnet18", num_classes=10, in_channels=ds.channels,
                      image_size=ds.size, mean=list(ds.mean), std=list(ds.std), width=8)
    run = argparse.Namespace(seed=0, sync_bn=True, compile=True, lr=0.1, momentum=0.9,
                             weight_decay=5e-4)
    net, model, opt = advtrain.setup_model(run, {"model_args": model_args}, torch.device("cpu"), 1)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert model is not net and model._orig_mod is net  # torch.compile's wrapper, not yet run
    run.sync_bn = run.compile = False
    net, model, _ = advtrain.setup_model(run, {"model_args": model_args}, torch.device("cpu"), 1)
    assert model is net and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())


def test_sync_bn_without_cuda_is_one_line():
    from conftest import assert_user_error, run_main
    assert_user_error(run_main("advtrain.py", "--sync-bn", "--epochs", "1", "--train-size", "64",
                               "--test-size", "32"), "needs torchrun with CUDA")
