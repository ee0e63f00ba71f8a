"""advtrain.py under torchrun on the CPU (gloo, 2 processes): the global batch is split
exactly, one process writes, a killed run resumes to the uninterrupted result, and every
collective's tensor lives on the process's device; the CUDA lines of the distributed set-up
(the GPU of each process, NCCL, SyncBatchNorm) run here with the group faked."""
import gc
import math
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


def torchrun(out, *extra, wait=True, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "advtrain.py", "--classes", "0-4", "--train-size", "1500", "--test-size", "200",
           "--epochs", "3", "--eps", "0.5", "--steps", "1", "--eval-steps", "2", "--device", "cpu",
           "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
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


def test_a_process_without_examples_in_a_batch_gets_a_stand_in_of_weight_zero():
    """A last batch of 1 example over 2 processes: process 1's share would be empty (the mean
    loss of an empty batch is NaN); it trains on the batch's example with weight 0 instead."""
    idx = torch.tensor([7])
    assert [(share.tolist(), weight) for share, weight in
            (advtrain.ddp_shard(rank, 2)(idx) for rank in range(2))] == [([7], 2.0), ([7], 0.0)]


def starts_and_order(rank, world_size):
    """The batch order and the first attack's random starts (step 0 after the start, inside
    [0, 1]: x_adv - x is the start) of one epoch."""
    x, y = tiny_data(60)
    x = 0.25 + 0.5 * x
    model = torch.nn.parallel.DistributedDataParallel(tiny_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    orders, starts, shard = [], [], advtrain.ddp_shard(rank, world_size)
    pgd = advtrain.pgd_attack

    def recording_pgd(model, xb, *args, **kwargs):
        x_adv = pgd(model, xb, *args, **kwargs)
        starts.append(x_adv - xb)
        return x_adv
    advtrain.pgd_attack = recording_pgd
    try:
        torch.manual_seed(1)  # what run_epochs does: every process seeds alike
        advtrain.train_epoch(model, opt, x, y, batch_size=60, norm="linf", eps=0.01, steps=1,
                             step_size=0.0, shard=lambda idx: (orders.append(idx), shard(idx))[1])
    finally:
        advtrain.pgd_attack = pgd
    return {"order": orders[0], "start": starts[0]}


def last_batch_of_one(rank, world_size):
    """An epoch of 65 examples in batches of 32: the last batch of 1 leaves processes empty."""
    x, y = tiny_data(65)
    model = torch.nn.parallel.DistributedDataParallel(tiny_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    epoch = advtrain.train_epoch(model, opt, x, y, batch_size=32, eps=0.0, steps=0,
                                 shard=advtrain.ddp_shard(rank, world_size))
    return {"epoch": epoch, "state": model.module.state_dict()}


def guard_on_one_process(rank, world_size):
    """The guard, where process 1's share of the held-out examples falls and the others'
    survive (labelled as predicted, at a radius too small to change a prediction)."""
    import argparse
    net = tiny_net()
    x = tiny_data(8)[0]
    with torch.no_grad():
        predicted = net(x).argmax(1)
    y = (predicted + 1) % 3 if rank == 1 else predicted
    guard = {"history": [1.0], "best_epoch": 1, "stopped_epoch": None,
             "best_model": {k: v.clone() for k, v in net.state_dict().items()}}
    run = argparse.Namespace(eval_batch_size=64, norm="linf", eps=1e-6, guard_drop=0.2)
    stop = advtrain.watch_guard(guard, net, x, y, 2, run, world_size)
    return {"stop": stop, "acc": guard["history"][-1]}


def one_test_example(rank, world_size):
    """The final evaluation's sharding of a test set of 1 example: processes beyond the first
    have nothing to evaluate."""
    net = tiny_net()
    x = tiny_data(1)[0]
    with torch.no_grad():
        y = net(x).argmax(1)
    x, y = x[rank::world_size], y[rank::world_size]
    metrics = advtrain.evaluate(net, x, y, [("linf", 1e-6)], steps=1)
    return advtrain.reduce_metrics(metrics, len(x), world_size, torch.device("cpu"))


RANK_CHECKS = (starts_and_order, last_batch_of_one, guard_on_one_process, one_test_example)


def ranks_worker(rank, world_size, store, out):
    """Each of RANK_CHECKS in one process of world_size, its result (or its error, as text) to
    out/<rank>.pt; a check that hangs is ended by spawn_bounded."""
    from datetime import timedelta
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    result = {}
    try:
        for check in RANK_CHECKS:
            try:
                result[check.__name__] = check(rank, world_size)
            except Exception as e:  # the test of this check fails; the others still run
                result[check.__name__] = f"{type(e).__name__}: {e}"
            gc.collect()  # a DDP model's reducer goes before the group
    finally:
        torch.save(result, out / f"{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()


def spawn_bounded(fn, args, nprocs, timeout=180):
    """mp.spawn with a deadline: a process that hangs (one waiting in a collective the others
    never join) is killed and the test fails, rather than waiting for gloo's own timeout."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not context.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f"{nprocs} processes still running after {timeout} s: a hang")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)],
                ids=lambda n: f"{n}processes")
def ranks(request, tmp_path_factory):
    world_size, folder = request.param, tmp_path_factory.mktemp("ranks")
    spawn_bounded(ranks_worker, (world_size, folder / "store", folder), world_size)
    return [torch.load(folder / f"{rank}.pt", weights_only=True) for rank in range(world_size)]


def results(ranks, check):
    """Every process's result of one check; one that raised fails the test with its error."""
    found = [r[check.__name__] for r in ranks]
    errors = [f"process {rank}: {r}" for rank, r in enumerate(found) if isinstance(r, str)]
    assert not errors, "; ".join(errors)
    return found


def test_ranks_share_the_batch_order_but_not_the_attack_starts(ranks):
    found = results(ranks, starts_and_order)
    assert all(torch.equal(r["order"], found[0]["order"]) for r in found)
    starts = [r["start"] for r in found]
    assert all(s.abs().max() > 0 for s in starts)  # a random start of up to eps
    # (x + start) - x rounds differently for each process's images: equal starts would
    # differ by about 1e-9, independent ones by about eps / 3 on average
    assert all((a - b).abs().mean() > 1e-3 for i, a in enumerate(starts) for b in starts[i + 1:])


def test_a_last_batch_with_fewer_examples_than_processes_trains(ranks):
    """65 examples in batches of 32: the last batch of 1 leaves a process or two nothing. The
    epoch ends with a finite loss, and the weights of one process trained on everything."""
    found = results(ranks, last_batch_of_one)
    loss, acc, steps = found[0]["epoch"]
    assert math.isfinite(loss) and steps == 3
    assert all(r["epoch"] == found[0]["epoch"] for r in found)
    single = tiny_net()
    x, y = tiny_data(65)
    opt = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    single_loss, single_acc, _ = advtrain.train_epoch(single, opt, x, y, batch_size=32,
                                                      eps=0.0, steps=0)
    assert loss == pytest.approx(single_loss, rel=1e-5) and acc == pytest.approx(single_acc)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(found[0]["state"][k], v, rtol=1e-5, atol=1e-6)


def test_a_guard_that_fires_on_one_process_stops_every_process(ranks):
    found = results(ranks, guard_on_one_process)
    assert all(r["stop"] for r in found)
    assert len({r["acc"] for r in found}) == 1  # one accuracy, reduced over the shares


def test_a_test_set_smaller_than_the_processes_is_evaluated(ranks):
    found = results(ranks, one_test_example)
    assert all(r == found[0] for r in found)
    assert found[0]["clean_acc"] == 1.0  # its one example, labelled as predicted


@pytest.mark.slow
def test_torchrun_trains_a_last_batch_of_one_and_evaluates_one_test_example(tmp_path):
    """The whole run under torchrun, 2 processes: 65 training examples in batches of 32 (the
    last batch of 1), fgsm's guard on 1 held-out example and a test set of 1 example, each
    leaving process 1 nothing; it finishes (a hang fails at the timeout) and writes."""
    run = torchrun(tmp_path / "run", "--dataset", "synthetic", "--classes", "0-9",
                   "--train-size", "66", "--batch-size", "32", "--attack", "fgsm",
                   "--guard-size", "1", "--test-size", "1", "--epochs", "2", "--eval-steps", "1",
                   timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_size"] == 1 and metrics["clean_acc"] in (0.0, 1.0)


def test_compile_wraps_the_ddp_model_in_the_documented_order(tmp_path):
    """--compile under torchrun: DDP wraps the network, then torch.compile wraps DDP (the
    order PyTorch documents); the attack's network (DDP's module) is the network itself. (A
    group of one process stands in for torchrun's; nothing is compiled until it runs.)"""
    import argparse
    import data as data_module
    ds = data_module.DATASETS["synthetic"]
    model_args = dict(arch="cnn", num_classes=10, in_channels=ds.channels, image_size=ds.size,
                      mean=list(ds.mean), std=list(ds.std))
    run = argparse.Namespace(seed=0, sync_bn=False, compile=True, lr=0.1, momentum=0.9,
                             weight_decay=5e-4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        net, model, _ = advtrain.setup_model(run, {"model_args": model_args},
                                             torch.device("cpu"), 2)
        ddp = model._orig_mod  # torch.compile's wrapper, not yet run
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is net
        assert model.module is net  # what train_epoch attacks
        del model, ddp
        gc.collect()  # DDP's reducer goes before the group it talks to
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_an_attack_under_compile_computes_no_parameter_gradient():
    """pgd_attack on a torch.compile'd network (as --compile trains it): gradients with
    respect to the input alone; every parameter's grad stays None."""
    problem = advtrain.compile_problem(torch.device("cpu"))
    if problem:
        pytest.skip(problem)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 3))
    compiled = torch.compile(net)
    x, y = tiny_data(16)
    x_adv = advtrain.pgd_attack(compiled, x, y, "l2", 0.5, 2)
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in net.parameters())
    assert net.training  # the mode given back
