"""The device code paths on the device named by env DEVICE (default cpu), each compared with
the same computation on the CPU where the two must agree.

    DEVICE=cuda bash tests/run.sh                           # the suite, these tests on the GPU
    DEVICE=cuda python -m pytest -q tests/test_device.py    # these tests alone
    python -m pytest -q tests/test_device.py                # on the CPU: what can fail there

Without DEVICE (on the CPU) a comparison would be the CPU against itself, which cannot fail:
those tests (marked `accelerator`) skip, naming the test of the suite that covers their CPU
form; the tests that stand on their own run (the attacks draw only through the *_like
functions, an epoch's host reads do not grow with its batches, compiled training within the
band of eager). With DEVICE=cuda and no GPU, tests/conftest.py stops the run with one line.

Tolerances. The comparisons run in float32 with TF32 off (fixture full_float32: a CUDA
convolution may otherwise round its inputs to 10 mantissa bits). Two devices sum in other
orders, so each tolerance is set to hold when the weights of one side are changed by a
relative 1e-5 (Gaussian) and to fail at 1e-3, except where a band is said to be one:
- one PGD step from the same random start: L2, the images within 1e-3 (pixel units, images
  in [0, 1]); Linf, a sign flips where a gradient entry is ~0: 99.9% of pixels within 1e-5;
- PGD-5 and APGD-10 (a band: many steps bend with the weights, so the outcomes are
  compared): the fooled examples differ in at most one of 16, the others' losses within 1e-2;
- a PGD training epoch in float32, with and without channels_last, and DDP in one process:
  the change of the weights and BatchNorm statistics within rtol 3e-3 (Euclidean norm);
- bf16 autocast training, with and without channels_last (a band): clean and PGD accuracy
  within 0.04 of float32 training (500 test images);
- Fisher estimators: within rtol 3e-3 (traces, and Lanczos lambda_max from the same start);
- frozen features: rtol 1e-3, atol 1e-4;
- probes and fine-tuning (a band): accuracy within 0.01, the linear probe's and fine-tuning's
  per-example correctness agreeing on 98%, the probes' penalties equal;
- inversion (a band; its path is chaotic): mean feature error within 0.02, mean SSIM within 0.03.
The scripts on the device (test_paper_mini_smoke_on_the_device) run as the study runs them,
TF32 on for cuDNN convolutions (PyTorch's default): their Fisher numbers within rtol 5e-2 of
the CPU's on the same checkpoint.
"""
import copy
import gc
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import advtrain
import data
import fisher
import invert
import models
import transfer
from common import lr_at
from conftest import ROOT, run_script

CPU = torch.device("cpu")


def accelerator(duplicate):
    """Marks a comparison of the device with the CPU: skipped on the CPU (tests/conftest.py,
    before its fixtures are made), where its CPU form is `duplicate`, another test."""
    return pytest.mark.accelerator(duplicate)


TRAIN_RTOL = 3e-3  # the change of the state over a training epoch (assert_same_update)
FISHER_RTOL = 3e-3


@pytest.fixture(autouse=True)
def full_float32():
    """Float32 matmuls and convolutions at full precision on CUDA (no TF32), and cuDNN's
    deterministic algorithms (a rerun on the device gives the same numbers; advtrain.main,
    which tests call in this process, turns on cudnn.benchmark) while a test runs."""
    backends = torch.backends
    flags = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32,
             backends.cudnn.deterministic, backends.cudnn.benchmark)
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False
    backends.cudnn.deterministic, backends.cudnn.benchmark = True, False
    yield
    (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.deterministic,
     backends.cudnn.benchmark) = flags


def draw_likes_on_the_cpu(monkeypatch, generator=None):
    """torch.rand_like and torch.randn_like draw on the CPU (from generator, default the global
    one) and move the numbers to the tensor's device."""
    for name, draw in (("rand_like", torch.rand), ("randn_like", torch.randn)):
        def like(t, *_, draw=draw, **__):
            return draw(t.shape, dtype=t.dtype, generator=generator).to(t.device)
        monkeypatch.setattr(torch, name, like)


@pytest.fixture
def cpu_random(monkeypatch):
    """The attacks' random starts are the same numbers on every device, given the same seed:
    every random draw of the attacks is a rand_like or randn_like of the data
    (test_the_attacks_draw_only_through_the_like_functions), drawn here on the CPU."""
    draw_likes_on_the_cpu(monkeypatch)


def on(device, model, memory_format=torch.preserve_format):
    """A copy of model on device (the original stays where it is)."""
    return copy.deepcopy(model).to(device, memory_format=memory_format)


@pytest.fixture(scope="module")
def resnet():
    """(resnet18 of width 8 trained for 2 epochs on 512 synthetic CIFAR-shaped images, in eval
    mode, on the CPU; its test images x [64, 3, 32, 32], labels y [64]). Width 8, not 4:
    torch's CPU backward of a strided 1x1 convolution with 4 input channels in channels_last
    corrupts memory on one thread."""
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, width=8)
    x, y = data.load_split("synthetic", True, size=512)
    opt = models.make_optimizer(model, 0.05)
    for epoch in range(2):
        advtrain.train_epoch(model, opt, x, y, batch_size=64, eps=0.0, steps=0, step0=epoch * 8,
                             lr_schedule=lambda step: lr_at(step, 16, 0.05))
    x_test, y_test = data.load_split("synthetic", False, size=64)
    return model.eval(), x_test, y_test


@torch.no_grad()
def per_example_loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


@torch.no_grad()
def predict(model, x):
    return model(x).argmax(1)


# ----------------------------------------------------------------------------- attacks

def assert_in_ball(adv, x, norm, eps):
    delta = adv - x
    size = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(1)
    assert (size <= eps * (1 + 1e-5)).all() and adv.min() >= 0 and adv.max() <= 1


def assert_same_attack(model, y, adv, adv_cpu):
    """Two runs of a many-step attack found the same: the fooled examples differ in at most
    one, and on the examples neither fooled the losses agree within rtol 1e-2."""
    fooled, fooled_cpu = predict(model, adv) != y, predict(model, adv_cpu) != y
    assert (fooled != fooled_cpu).sum() <= 1, (fooled, fooled_cpu)
    held = ~fooled & ~fooled_cpu
    torch.testing.assert_close(per_example_loss(model, adv, y)[held],
                               per_example_loss(model, adv_cpu, y)[held], rtol=1e-2, atol=0)
    return fooled


@accelerator("test_advtrain.py's test_pgd_stays_in_ball_and_raises_loss")
@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 4 / 255)])
def test_pgd_on_the_device_matches_the_cpu(norm, eps, device, resnet, cpu_random):
    model, x, _ = resnet
    x = x[:16]
    y = predict(model, x)  # labels the model gets right: the attack has something to do

    def attack(dev, steps):
        torch.manual_seed(1)
        net = on(dev, model)
        return advtrain.pgd_attack(net, x.to(dev), y.to(dev), norm, eps, steps=steps).cpu()

    one_cpu, one = attack(CPU, 1), attack(device, 1)
    if norm == "l2":
        torch.testing.assert_close(one, one_cpu, rtol=0, atol=1e-3)
    else:  # a sign step flips where a gradient entry is ~0
        assert ((one - one_cpu).abs() <= 1e-5).double().mean() >= 0.999
    adv_cpu, adv = attack(CPU, 5), attack(device, 5)
    assert_in_ball(adv, x, norm, eps)
    losses = [per_example_loss(model, images, y).mean() for images in (x, one, adv)]
    assert losses[0] < losses[1] < losses[2]
    assert_same_attack(model, y, adv, adv_cpu)


@accelerator("test_references.py's test_apgd_stays_in_its_ball_beats_pgd_and_equals_torchattacks")
@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 4 / 255)])
def test_apgd_on_the_device_matches_the_cpu(norm, eps, device, resnet, cpu_random):
    model, x, _ = resnet
    x = x[:16]
    y = predict(model, x)

    def attack(dev):
        torch.manual_seed(1)
        return advtrain.apgd_attack(on(dev, model), x.to(dev), y.to(dev), norm, eps, steps=10).cpu()

    adv_cpu, adv = attack(CPU), attack(device)
    assert_in_ball(adv, x, norm, eps)
    fooled = assert_same_attack(model, y, adv, adv_cpu)
    assert fooled.any() and not fooled.all(), fooled  # eps neither too small nor too large


@pytest.mark.parametrize("attack,norm", [("pgd", "l2"), ("pgd", "linf"), ("apgd", "l2"),
                                         ("apgd", "linf")])
def test_the_attacks_draw_only_through_the_like_functions(attack, norm, monkeypatch):
    """What cpu_random relies on: rand_like and randn_like draw from a generator of their own,
    seeded alike for two runs while the global generators are seeded differently; the attack
    is the same. A draw of torch.rand(..., device=...) would come from the device's global
    generator, so the device tests' starts would differ from the CPU's. (A cnn of 10 classes
    on random images: the attacks' draws do not depend on the model.)"""
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, 1, 28, (0.5,), (0.25,)).eval()
    x = torch.rand(8, 1, 28, 28)
    y = predict(model, x)
    generator = torch.Generator()
    draw_likes_on_the_cpu(monkeypatch, generator)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        generator.manual_seed(0)
        if attack == "pgd":
            runs.append(advtrain.pgd_attack(model, x, y, norm, 0.5 if norm == "l2" else 0.03, 2))
        else:
            runs.append(advtrain.apgd_attack(model, x, y, norm, 0.5 if norm == "l2" else 0.03, 2))
    assert not torch.equal(runs[0], x)
    assert torch.equal(runs[0], runs[1])


# ----------------------------------------------------------------------------- training

def assert_same_update(net, reference, initial, rtol=TRAIN_RTOL):
    """net and reference, both trained from initial, took the same step: the change of their
    floating-point state (weights, BatchNorm statistics; one vector) agrees within rtol in
    Euclidean norm, and the integer state (BatchNorm's step counts) is equal. Adversarial
    training is sensitive: PGD's path inside every step bends with the weights."""
    floats = [k for k, v in initial.state_dict().items() if v.is_floating_point()]

    def update(model):
        state, start = model.state_dict(), initial.state_dict()
        return torch.cat([(state[k].detach().cpu() - start[k]).flatten() for k in floats])

    ours, theirs = update(net), update(reference)
    assert theirs.norm() > 0 and (ours - theirs).norm() <= rtol * theirs.norm(), \
        ((ours - theirs).norm() / theirs.norm()).item()
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        if not a.is_floating_point():
            assert torch.equal(a.cpu(), b.cpu()), name


def train_copy(model, dev, x, y, memory_format=torch.contiguous_format, epochs=1, lr=0.05,
               **kwargs):
    """A copy of model trained on dev for `epochs` (one-cycle lr, seed 1 for the order and the
    attacks' starts). Returns (network, [(loss, acc) per epoch])."""
    net = on(dev, model, memory_format).train()
    opt = models.make_optimizer(net, lr)
    steps = -(-len(x) // kwargs.get("batch_size", 128))
    torch.manual_seed(1)
    history = []
    for epoch in range(epochs):
        loss, acc, _ = advtrain.train_epoch(
            net, opt, x.to(dev), y.to(dev), step0=epoch * steps,
            lr_schedule=lambda step: lr_at(step, epochs * steps, lr), **kwargs)
        history.append((loss, acc))
    return net, history


@accelerator("test_advtrain.py's training tests")
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_float32_training_epoch_on_the_device_matches_the_cpu(channels_last, device, resnet,
                                                                cpu_random):
    """PGD-2 training (L2 0.5), 64 images in batches of 32, BatchNorm in train mode."""
    model, x, y = resnet
    layout = torch.channels_last if channels_last else torch.contiguous_format
    (net_cpu, history_cpu), (net, history) = (
        train_copy(model, dev, x, y, layout, batch_size=32, norm="l2", eps=0.5, steps=2,
                   channels_last=channels_last) for dev in (CPU, device))
    assert history[0][0] == pytest.approx(history_cpu[0][0], rel=1e-3)
    assert_same_update(net, net_cpu, model)
    moved = [not torch.equal(a, b)
             for a, b in zip(net_cpu.state_dict().values(), model.state_dict().values())]
    assert sum(moved) > 0.9 * len(moved)  # every weight and statistic took the steps


# The Python-level ways a tensor's value reaches the host (each waits for the device's queue).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def host_reads(fn):
    """(fn(), the number of calls of HOST_READS that fn made). On CUDA the device's own count
    is asserted elsewhere: torch.cuda's sync debug mode sees the reads made inside torch too."""
    calls, real = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        result = fn()
    finally:
        for name, method in real.items():
            setattr(torch.Tensor, name, method)
    return result, len(calls)


def device_syncs(fn, device):
    """The synchronisations CUDA reports while fn runs (sync debug mode "warn": one warning
    per synchronising call, inside torch too); 0 on other devices."""
    if device.type != "cuda":
        fn()
        return 0
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_a_training_epoch_reads_the_device_once_whatever_its_batches(device):
    """The batch loop never waits for the host (DESIGN.md, Scale): an epoch of 1 batch and one
    of 4 make the same few reads (the data's check, the totals), so no step makes any. On the
    way, the lines the GPU runs run here: bf16 autocast, channels_last, augmentation,
    non_blocking copies, the random order gathered on the device; and the model's mode
    (eval, its head in train mode) is given back."""
    torch.manual_seed(0)
    model = models.build_model("cnn", 5, 1, 28, (0.5,), (0.25,))
    model = model.to(device, memory_format=torch.channels_last).eval()
    model.head.train()
    opt = models.make_optimizer(model, 0.01)
    x, y = torch.rand(32, 1, 28, 28, device=device), torch.randint(0, 5, (32,), device=device)

    def epoch(n):
        return advtrain.train_epoch(model, opt, x[:n], y[:n], batch_size=8, norm="linf",
                                    eps=0.03, steps=1, step0=0, augment=True, amp=True,
                                    channels_last=True, lr_schedule=lambda step: 0.01)

    (loss, acc, step), reads_one = host_reads(lambda: epoch(8))
    assert step == 1 and loss > 0 and 0 <= acc <= 1
    (_, _, step), reads_four = host_reads(lambda: epoch(32))
    assert step == 4 and reads_four == reads_one <= 2, (reads_one, reads_four)
    assert device_syncs(lambda: epoch(8), device) == device_syncs(lambda: epoch(32), device)
    assert not model.training and model.head.training and not model.body.training


@pytest.mark.slow
def test_compiled_training_on_the_device_within_the_band_of_eager(device, tmp_path):
    """advtrain.py --compile: the attacks and the training steps through torch.compile (its
    default backend, inductor, as on a GPU), a cnn for one epoch of 256 images: its losses and
    accuracies within 0.02 of eager training's (compiled kernels round otherwise). Where inductor
    cannot compile (no C++ compiler on the CPU, no Triton on CUDA) it skips, saying why."""
    problem = advtrain.compile_problem(device)
    if problem:
        pytest.skip(problem)
    results = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        proc = run_script("advtrain.py", "--classes", "0-4", "--train-size", "256",
                          "--test-size", "64", "--epochs", "1", "--steps", "1", "--eps", "0.5",
                          "--eval-steps", "2", "--device", str(device), "--out", tmp_path / name,
                          *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        log = json.loads((tmp_path / name / "log.jsonl").read_text())
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        results[name] = (log["loss"], log["train_acc"], metrics["clean_acc"],
                         metrics["robust_acc"][0]["acc"])
    assert results["compiled"] == pytest.approx(results["eager"], abs=0.02), results


@pytest.fixture(scope="module")
def fashion_mnist():
    load = dict(classes=[0, 1, 2, 3, 4], download=False)
    return (*data.load_split("fashion-mnist", True, size=2000, **load),
            *data.load_split("fashion-mnist", False, size=500, **load))


@accelerator("test_a_float32_training_epoch_on_the_device_matches_the_cpu")
@pytest.mark.slow
def test_bf16_training_on_the_device_within_the_band_of_float32(device, fashion_mnist):
    """The cnn, 2 epochs of PGD-1 training (L2 0.5) on 2000 Fashion-MNIST images: bf16
    autocast on the device, with and without channels_last, against float32 on the CPU.
    The scripts use bf16 on CUDA only; on the CPU they train in float32 (tested elsewhere)."""
    x, y, x_test, y_test = fashion_mnist
    torch.manual_seed(0)
    model = models.build_model("cnn", 5, 1, 28, (0.286,), (0.353,))
    runs = {"float32 cpu": (CPU, torch.contiguous_format, False),
            f"bf16 {device}": (device, torch.contiguous_format, False),
            f"bf16 channels_last {device}": (device, torch.channels_last, True)}
    accuracies = {}
    for name, (dev, layout, channels_last) in runs.items():
        net, history = train_copy(model, dev, x, y, layout, epochs=2, batch_size=128, eps=0.5,
                                  steps=1, amp=name.startswith("bf16"), channels_last=channels_last)
        assert all(torch.isfinite(torch.tensor(loss)) for loss, _ in history)
        xt, yt = x_test.to(dev), y_test.to(dev)
        accuracies[name] = (advtrain.accuracy(net, xt, yt),
                            advtrain.accuracy(net, xt, yt, norm="l2", eps=0.5, steps=5))
    clean, robust = accuracies["float32 cpu"]
    assert clean > 0.75 and robust > 0.5, accuracies  # it learned, and some robustness
    for name, (clean_acc, robust_acc) in accuracies.items():
        assert abs(clean_acc - clean) <= 0.04 and abs(robust_acc - robust) <= 0.04, accuracies


@accelerator("tests/test_ddp.py")
def test_data_parallel_in_one_process_matches_plain_training(device, resnet, tmp_path,
                                                             cpu_random):
    """DistributedDataParallel over one process (NCCL and SyncBatchNorm on CUDA, gloo on the
    CPU) with train_epoch's data-parallel shard: the same step as training without it. One
    GPU runs one NCCL process; SyncBatchNorm computes its statistics locally at world size 1."""
    model, x, y = resnet
    plain, _ = train_copy(model, device, x, y, batch_size=32, norm="l2", eps=0.5, steps=1)
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        net = on(device, model).train()
        if cuda:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
        opt = models.make_optimizer(net, 0.05)
        torch.manual_seed(1)
        advtrain.train_epoch(ddp, opt, x.to(device), y.to(device), batch_size=32, norm="l2",
                             eps=0.5, steps=1, lr_schedule=lambda step: lr_at(step, 2, 0.05),
                             shard=advtrain.ddp_shard(0, 1))
        del ddp
        gc.collect()  # DDP's reducer goes before the group it talks to
    finally:
        dist.destroy_process_group()
    assert_same_update(net, plain, model)


@accelerator("tests/test_ddp.py")
@pytest.mark.slow
def test_torchrun_one_process_on_the_device(device, tmp_path):
    """advtrain.py under torchrun with one process on the device: it trains and writes.
    (advtrain.py joins no process group when WORLD_SIZE is 1: the in-process test above
    exercises NCCL.)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "advtrain.py", "--dataset", "synthetic", "--arch", "resnet18", "--width", "8",
           "--train-size", "64", "--test-size", "32", "--epochs", "1", "--steps", "1",
           "--batch-size", "32", "--eps", "0.5", "--eval-steps", "2", "--device", str(device),
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"on {device.type}" in proc.stdout, proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["clean_acc"] <= 1 and metrics["robust_acc"][0]["eps"] == 0.5


# ----------------------------------------------------------------------------- Fisher

@pytest.fixture(scope="module")
def tiny_cnn():
    """(cnn for 8x8 grayscale images, 3 classes, eval mode, non-trivial BatchNorm;
    x [6, 1, 8, 8])."""
    torch.manual_seed(0)
    model = models.build_model("cnn", 3, 1, 8, (0.5,), (0.25,))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval(), torch.rand(6, 1, 8, 8)


def fisher_estimates(model, x, y):
    """Every estimator of fisher.py on (x, y), seeded: {name: per-example values on the CPU}."""
    def g():
        return torch.Generator().manual_seed(0)

    weights = fisher.fisher_trace_weights
    out = {"weights": weights(model, x)[0],
           "weights empirical": weights(model, x, y)[0],
           "weights sampled": weights(model, x, label_samples=4, generator=g())[0],
           "input": fisher.input_fisher_trace(model, x),
           "input sampled": fisher.input_fisher_trace(model, x, 4, g()),
           "input lambda_max": fisher.input_fisher_lambda_max(model, x, generator=g())[0],
           "repr": fisher.repr_jacobian_frobenius(model, x, 1000, g()),  # exact: d <= probes
           "repr hutchinson": fisher.repr_jacobian_frobenius(model, x, 8, g()),
           "repr lambda_max": fisher.repr_lambda_max(model, x, generator=g())[0]}
    return {name: value.detach().cpu() for name, value in out.items()}


@accelerator("tests/test_fisher.py")
def test_fisher_estimators_on_the_device_match_the_cpu(device, tiny_cnn):
    model, x = tiny_cnn
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cpu = fisher_estimates(model, x, y)
    dev = fisher_estimates(on(device, model), x.to(device), y.to(device))
    for name, reference in cpu.items():
        assert (reference > 0).all(), name
        torch.testing.assert_close(dev[name], reference, rtol=FISHER_RTOL, atol=0, msg=name)


@accelerator("tests/test_fisher.py")
def test_input_fisher_of_the_resnet_on_the_device_matches_the_cpu(device, resnet):
    """The measures of C4 on the CIFAR ResNet-18 (width 8), 4 test images."""
    model, x, _ = resnet
    x = x[:4]

    def lambda_max(net, images):
        generator = torch.Generator().manual_seed(0)
        return fisher.input_fisher_lambda_max(net, images, generator=generator)[0]

    for estimator in (fisher.input_fisher_trace, lambda_max):
        reference = estimator(model, x)
        measured = estimator(on(device, model), x.to(device)).cpu()
        torch.testing.assert_close(measured, reference, rtol=FISHER_RTOL, atol=0)


# ----------------------------------------------------------------------------- transfer

@accelerator("tests/test_transfer.py's feature tests")
def test_frozen_features_on_the_device_match_the_cpu(device, resnet):
    """Grayscale 28x28 images, contrast-inverted and adapted (1 -> 3 channels, 28 -> 32 px) on
    the device, from tensors and from a Dataset read by a DataLoader (batches of 16, the last
    one partial)."""
    model, _, _ = resnet
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 5, (40,), generator=g)

    def extract(net, split):
        return transfer.extract_features(net, split, 3, 32, batch_size=16, workers=0,
                                         transform=transfer.SHIFTS["invert"])

    reference = extract(model, (x, y))
    net = on(device, model)
    assert reference.shape == (40, 64) and reference.abs().sum() > 0
    for split in ((x, y), torch.utils.data.TensorDataset(x, y)):
        torch.testing.assert_close(extract(net, split), reference, rtol=1e-3, atol=1e-4)


def clusters(n, d=32, k=5, seed=0):
    """Features [n, d] of k Gaussian clusters that overlap (a probe gets most, not all, right)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % k
    return centres[y] * 0.3 + torch.randn(n, d, generator=g), y


def assert_same_predictions(a, b, name):
    """Accuracy within 0.01 and per-example correctness agreeing on 98% of the test examples."""
    assert a["acc"] == pytest.approx(b["acc"], abs=0.01), name
    agree = torch.as_tensor(a["correct"]).cpu() == torch.as_tensor(b["correct"]).cpu()
    assert agree.double().mean() >= 0.98, (name, agree.double().mean())


@accelerator("tests/test_transfer.py and tests/test_references.py")
def test_probes_and_fine_tuning_on_the_device_match_the_cpu(device, resnet):
    train, test = clusters(500), clusters(200, seed=1)
    results = []
    for dev in (CPU, device):
        tensors = [t.to(dev) for t in (*train, *test)]
        results.append((transfer.linear_probe(*tensors),
                        transfer.few_shot_probe(*tensors, shots=5, draws=2)))
    (probe_cpu, few_cpu), (probe, few) = results
    assert 0.5 < probe_cpu["acc"] < 0.99 and probe["l2"] == probe_cpu["l2"]
    assert_same_predictions(probe, probe_cpu, "linear probe")
    assert few["acc"] == pytest.approx(few_cpu["acc"], abs=0.01) and few["l2"] == few_cpu["l2"]

    model, x, y = resnet
    x_test, y_test = data.load_split("synthetic", False, size=128)
    test_split = (x_test[64:], y_test[64:] % 5)
    tuned_cpu, tuned = (transfer.finetune(on(dev, model), x[:64], y[:64] % 5, test_split, 3, 32,
                                          epochs=1, batch_size=32) for dev in (CPU, device))
    assert_same_predictions(tuned, tuned_cpu, "fine-tuned")


# ----------------------------------------------------------------------------- inversion


@accelerator("tests/test_invert.py")
@pytest.mark.parametrize("method", ["baseline", "tv", "noise", "noise-tv"])
def test_inversion_on_the_device_reaches_the_quality_of_the_cpu(method, device, resnet):
    """20 steps of each of invert.py's methods on 4 test images, as invert.py runs them (the
    noise from a generator on the model's device, seed 1). The path of an inversion is
    chaotic (a relative change of 1e-7 in the weights moves pixels by 0.2), so the images of
    two devices are not compared: their mean feature error and SSIM to the originals are,
    within 0.02 and 0.03 (a CUDA generator draws other noise than the CPU's: these bands hold
    the spread over noise seeds). On one device the same seed gives the same images."""
    model, x, _ = resnet
    terms = invert.METHODS[method]
    x0 = x[:4]
    with torch.no_grad():
        z0 = model.features(x0)  # [4, d]
    start = invert.grey_start(x0.shape, 0)
    step_size = invert.default_step_size(x0.shape[1:])
    kwargs = dict(noise_std=invert.DEFAULTS["sigma"] if terms["noise"] else 0.0,
                  tv_weight=invert.DEFAULTS["tv"] if terms["tv"] else 0.0)

    def run(net):
        dev = next(net.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(1)
        images = invert.invert_features(net, z0.to(dev), start.to(dev), 20, step_size,
                                        generator=gen, **kwargs)
        return images.cpu()

    net = on(device, model)
    reference, inverted = run(on(CPU, model)), run(net)
    torch.testing.assert_close(run(net), inverted, rtol=0, atol=1e-5)

    def objective(images):
        return invert.inversion_loss(model, images, z0, tv_weight=kwargs["tv_weight"])

    assert (objective(inverted) < objective(start)).all()
    for measure, within in ((lambda images: invert.feature_rel_err(model, images, z0), 0.02),
                            (lambda images: invert.ssim(images, x0), 0.03)):
        assert measure(inverted).mean().item() == pytest.approx(measure(reference).mean().item(),
                                                                abs=within)


# ----------------------------------------------------------------------------- the scripts


@accelerator("tests/test_study.py's paper smoke")
@pytest.mark.slow
def test_paper_mini_smoke_on_the_device(device, tmp_path):
    """The paper preset's scripts with --device DEVICE on tiny synthetic CIFAR-shaped data
    (run_all.sh paper --smoke pins --device cpu): training (on CUDA bf16 autocast and
    channels_last, augmentation, APGD evaluation), Fisher, transfer (probes, few-shot,
    fine-tuning), the four inversions; then Fisher on the CPU from the same checkpoint."""
    cell = tmp_path / "l2_eps0.5_seed0"
    dev = ["--device", str(device)]

    def run(*args):
        proc = run_script(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    log = run("advtrain.py", "--dataset", "synthetic", "--arch", "resnet18", "--width", "8",
              "--train-size", "64", "--test-size", "32", "--epochs", "1", "--steps", "1",
              "--batch-size", "32", "--augment", "--eps", "0.5", "--eval-eps", "l2:0.5",
              "linf:8/255", "--eval-attack", "apgd", "--eval-steps", "2", "--out", cell, *dev)
    assert f"on {device.type}" in log, log
    ckpt = cell / "model.pt"
    fisher_args = ["fisher.py", "--ckpt", ckpt, "--n", "4", "--chunk", "4", "--power-iters", "5"]
    run(*fisher_args, "--out", cell / "fisher_device", *dev)
    run(*fisher_args, "--out", cell / "fisher_cpu", "--device", "cpu")
    run("transfer.py", "--ckpt", ckpt, "--target", "synthetic:0-4", "--target", "fashion-mnist:5-9",
        "--train-size", "64", "--test-size", "32", "--shots", "1", "2", "--finetune",
        "--finetune-size", "32", "--out", cell, *dev)
    run("invert.py", "--ckpt", ckpt, "--n-images", "4", "--steps", "5",
        "--method", "baseline,tv,noise,noise-tv", "--out", cell, *dev)
    metrics = json.loads((cell / "metrics.json").read_text())
    attacked = [(r["norm"], r["attack"]) for r in metrics["robust_acc"]]
    assert attacked == [("l2", "apgd"), ("linf", "apgd")]
    on_device, on_cpu = (json.loads((cell / f / "fisher.json").read_text())
                         for f in ("fisher_device", "fisher_cpu"))
    for key in ("weights_trace", "input_trace", "input_lambda_max", "repr_trace",
                "repr_lambda_max"):
        assert on_device[key] == pytest.approx(on_cpu[key], rel=5e-2), key
    transferred = json.loads((cell / "transfer.json").read_text())
    for target in ("synthetic:0-4", "fashion-mnist:5-9"):
        assert 0 <= transferred[target]["finetune"]["acc"] <= 1, target
    inverted = json.loads((cell / "invert.json").read_text())
    assert all(0 < inverted[m]["ssim"] <= 1 for m in ("baseline", "tv", "noise", "noise-tv"))


def test_the_scripts_device_setup_turns_tf32_off(monkeypatch):
    """DESIGN.md, Precision: float32 on CUDA is full float32, which PyTorch's defaults are not
    (TF32). models.get_device, every script's device setup, turns TF32 off whenever it gives a
    CUDA device (CUDA faked here: torch.device("cuda") needs no GPU), and advtrain.ran_on then
    says float32 alone. The fixture full_float32 gives the flags back."""
    backends = torch.backends
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = True
    assert models.get_device("cpu") == torch.device("cpu")
    assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32  # the CPU: untouched
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    for name in ("auto", "cuda", "cuda:1"):
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = True
        assert models.get_device(name).type == "cuda"
        assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32, name
    assert advtrain.ran_on(torch.device("cuda"), trained=False)["precision"] == "float32"
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = True
    models.full_float32()
    assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32
