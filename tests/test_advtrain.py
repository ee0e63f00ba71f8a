"""advtrain.py: attack, data, models, training, checkpoints, resume and user errors."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import advtrain
import checkpoints
import common
import data
import models
import published
from conftest import ROOT, assert_user_error, run_main


@pytest.fixture(scope="module")
def fmnist_test():
    return data.load_split("fashion-mnist", False, classes=[0, 1, 2, 3, 4], size=64, download=False)


def test_parse_eps_and_classes():
    assert common.parse_eps("8/255") == pytest.approx(8 / 255)
    assert common.parse_eps("0.5") == 0.5
    assert common.parse_classes("0-4", 10) == [0, 1, 2, 3, 4]
    assert common.parse_classes("7,2", 10) == [7, 2]
    assert common.parse_classes(None, 3) == [0, 1, 2]
    for bad in ("0-10", "4-2", "a", "1,1"):
        with pytest.raises(ValueError):
            common.parse_classes(bad, 10)


def test_one_cycle_learning_rate_known_values():
    """lr_at: linear from 0 to max_lr over the first quarter of the steps, then linear to 0."""
    expected = [0.0, 0.2, 0.4, 0.4 * 5 / 6, 0.4 * 4 / 6, 0.2, 0.4 * 2 / 6, 0.4 / 6, 0.0]
    assert [common.lr_at(step, 8, 0.4) for step in range(9)] == pytest.approx(expected)


def test_load_split_relabels_in_given_order():
    x_all, y_all = data.load_split("fashion-mnist", False, download=False)
    x, y = data.load_split("fashion-mnist", False, classes=[7, 2], download=False)
    assert x_all.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert (y == 0).sum() == (y_all == 7).sum() and (y == 1).sum() == (y_all == 2).sum()
    assert torch.equal(x[y == 0], x_all[y_all == 7])


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_ball_and_raises_loss(norm, eps, fmnist_test, tiny_ckpt):
    x, y = fmnist_test
    model, _ = checkpoints.load_checkpoint(tiny_ckpt)
    for p in model.parameters():
        p.grad = None
    x_adv = advtrain.pgd_attack(model, x, y, norm, eps, steps=10)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # input gradients only
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
        no_attack = advtrain.pgd_attack(model, x, y, norm, 0.0, steps=10)
        start_only = F.cross_entropy(model(advtrain.pgd_attack(model, x, y, norm, eps, 1, 0.0)), y)
    assert adv > clean * 1.3 and adv > start_only * 1.3
    assert torch.equal(no_attack, x)
    with pytest.raises(ValueError, match="steps 0 attacks nothing"):  # not the clean images
        advtrain.pgd_attack(model, x, y, norm, eps, steps=0)


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
def test_project_onto_the_ball_and_the_image_range(norm, eps):
    """project: a perturbation inside the ball and the image range is kept; one outside is
    clipped (linf) or scaled (l2) onto the ball, then the image clipped to [0, 1]."""
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(4, 1, 6, 6, generator=g)  # 0.2 from either end of [0, 1]
    small = 0.01 * torch.randn(4, 1, 6, 6, generator=g)
    assert torch.equal(advtrain.project(x, small, norm, eps), x + small)
    big = 5 * torch.randn(4, 1, 6, 6, generator=g)
    sizes = big.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    inside = big.clamp(-eps, eps) if norm == "linf" else big * eps / sizes
    torch.testing.assert_close(advtrain.project(x, big, norm, eps), (x + inside).clamp(0, 1))


def test_l2_step_moves_each_example_its_size_along_its_gradient():
    """l2_step (the attacks' and the inversion's step): size * grad / ||grad|| per example, so
    an example with a tiny gradient moves as far as one with a large one; a zero gradient, 0."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(3, 2, 4, 4, generator=g) * torch.tensor([1e-4, 1.0, 50.0]).view(3, 1, 1, 1)
    grad[2] = 0
    step = models.l2_step(grad, torch.tensor([0.3, 0.7, 0.5]).view(3, 1, 1, 1))
    torch.testing.assert_close(step.flatten(1).norm(dim=1), torch.tensor([0.3, 0.7, 0.0]))
    cosine = F.cosine_similarity(step[:2].flatten(1), grad[:2].flatten(1))
    torch.testing.assert_close(cosine, torch.ones(2))


def test_augment_is_a_crop_or_flipped_crop():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    out = data.random_crop_flip(x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


@pytest.mark.parametrize("arch,channels,size,dim", [("cnn", 1, 28, 784), ("resnet18", 3, 32, 64)])
def test_features_are_what_the_head_sees(arch, channels, size, dim):
    """features(x) is the input of the last linear layer during a forward pass, in train and
    eval mode (a hook on head records what forward really feeds it)."""
    torch.manual_seed(0)
    model = models.build_model(arch, 5, channels, size, (0.5,) * channels, (0.25,) * channels,
                               width=8)
    seen = []
    model.head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    x = torch.rand(3, channels, size, size)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            logits = model(x)
            torch.testing.assert_close(seen[-1], model.features(x))
        assert seen[-1].shape == (3, dim) and logits.shape == (3, 5)
    # the cnn's representation keeps where things are: moving a blob changes it
    if arch == "cnn":
        a, b = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
        a[..., 2:8, 2:8], b[..., 20:26, 20:26] = 1, 1
        with torch.no_grad():
            assert not torch.allclose(model.features(a), model.features(b))


def test_resnet18_and_cuda_branches_run_on_cpu():
    """bf16 autocast and channels_last (the CUDA settings) on CPU, on tiny synthetic data."""
    x, y = data.load_split("synthetic", True, size=8)
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    assert model.features(x[:2]).shape == (2, 512)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss, acc, step = advtrain.train_epoch(model, opt, x, y, batch_size=4, norm="linf",
                                           eps=8 / 255, steps=1,
                                           lr_schedule=lambda step: 0.01 * (2 - step),
                                           augment=True, amp=True, channels_last=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # the schedule set the rate of step 1
    assert step == 2 and torch.isfinite(torch.tensor(loss)) and 0 <= acc <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def train(tmp_path, name, *extra):
    out = tmp_path / name
    advtrain.main(advtrain.get_args([
        "--classes", "0-4", "--train-size", "3000", "--test-size", "500", "--epochs", "2",
        "--steps", "3", "--eval-eps", "1.0", "linf:0.1", "--eval-steps", "10", "--out", str(out),
        *extra]))
    return out


@pytest.mark.slow
def test_adversarial_training_buys_robustness(tmp_path):
    std = json.loads((train(tmp_path, "std", "--eps", "0") / "metrics.json").read_text())
    rob = json.loads((train(tmp_path, "rob", "--eps", "0.5") / "metrics.json").read_text())
    for key in ("clean_acc", "robust_acc", "eps", "norm", "arch", "dataset", "classes", "epochs",
                "train_seconds", "provenance"):
        assert key in std and key in rob
    # every robust number names its norm, radius and attack; eps 0 is attacked in both norms
    assert [(r["norm"], r["eps"], r["attack"]) for r in std["robust_acc"]] == [
        ("l2", 1.0, "pgd"), ("linf", 0.1, "pgd")]
    assert [(r["norm"], r["eps"]) for r in rob["robust_acc"]] == [
        ("l2", 0.5), ("l2", 1.0), ("linf", 0.1)]
    std_l2, rob_l2 = std["robust_acc"][0]["acc"], rob["robust_acc"][1]["acc"]
    # measured (2 epochs, 3000 images, CPU): eps 0 clean 0.872, PGD-10 at L2 eps 1 0.314;
    # eps 0.5 clean 0.868, PGD-10 at eps 1 0.618
    assert std["clean_acc"] > 0.75 and rob["clean_acc"] > 0.7
    assert std_l2 < std["clean_acc"] - 0.35
    assert rob_l2 > std_l2 + 0.15
    log = [json.loads(line) for line in (tmp_path / "rob" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_training_steps_on_the_attacked_batch(fmnist_test, tiny_ckpt):
    """train_epoch trains on PGD's examples of each batch: at learning rate 0 (the weights stay)
    its loss is the train-mode loss of the model on pgd_attack's examples of the batch, from
    the same random state (the batch order, then the attack's start), far above the loss at
    eps 0, which trains on the batch itself."""
    x, y = fmnist_test
    model, _ = checkpoints.load_checkpoint(tiny_ckpt)
    losses = {}
    for eps in (0.0, 0.5):
        net = copy.deepcopy(model)
        torch.manual_seed(1)
        losses[eps], _, _ = advtrain.train_epoch(net, models.make_optimizer(net, 0.0), x, y,
                                                 batch_size=len(x), eps=eps, steps=3)
    net = copy.deepcopy(model)
    torch.manual_seed(1)
    order = torch.randperm(len(x))
    x_adv = advtrain.pgd_attack(net, x[order], y[order], "l2", 0.5, 3)
    with models.train_mode(net), torch.no_grad():
        expected = F.cross_entropy(net(x_adv), y[order]).item()
    assert losses[0.5] == pytest.approx(expected, rel=1e-5)
    assert losses[0.5] > 1.3 * losses[0.0], losses


def test_checkpoint_loads_weights_only(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    for key in ("model", "model_args", "arch", "num_classes", "in_channels", "dataset", "classes",
                "norm", "eps", "args", "epoch", "optimizer", "provenance"):
        assert key in ckpt
    model, ckpt2 = checkpoints.load_checkpoint(tiny_ckpt)
    assert not model.training and ckpt2["classes"] == [0, 1, 2, 3, 4]
    x = torch.rand(4, 1, 28, 28)
    reference = models.build_model(**ckpt["model_args"])
    reference.load_state_dict(ckpt["model"])
    assert torch.equal(model(x), reference.eval()(x))


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    # bit-exact on the CPU (on CUDA cudnn.benchmark may pick other algorithms in another run)
    common = ["--classes", "0-4", "--train-size", "600", "--test-size", "100", "--epochs", "2",
              "--eps", "0.5", "--steps", "2", "--eval-steps", "2", "--device", "cpu"]
    advtrain.main(advtrain.get_args(common + ["--out", str(tmp_path / "full")]))

    real_epoch, calls = advtrain.train_epoch, []

    def killed_in_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(advtrain, "train_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        advtrain.main(advtrain.get_args(common + ["--out", str(tmp_path / "cut")]))
    monkeypatch.setattr(advtrain, "train_epoch", real_epoch)
    assert torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["epoch"] == 1
    advtrain.main(advtrain.get_args(common + ["--out", str(tmp_path / "cut"), "--resume"]))

    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert cut["epoch"] == 2
    for k in full["model"]:
        assert torch.equal(full["model"][k], cut["model"][k]), k
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "cut")]
    assert metrics[0]["clean_acc"] == metrics[1]["clean_acc"]
    assert metrics[0]["robust_acc"] == metrics[1]["robust_acc"]
    assert len((tmp_path / "cut" / "log.jsonl").read_text().splitlines()) == 2


def test_corrupt_and_foreign_checkpoints_are_library_errors(tiny_ckpt, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(FileNotFoundError):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")
    for path in (truncated, foreign):
        with pytest.raises(ValueError):
            checkpoints.load_checkpoint(path)


@pytest.mark.parametrize("argv,expect", [
    (["--dataset", "imagenet"], "invalid choice"),
    (["--arch", "vgg"], "invalid choice"),
    (["--epochs", "0"], "must be >= 1"),
    (["--train-size", "100000"], "has 60000"),
    (["--eval-eps", "l3:0.5"], "radius must look like"),
    (["--classes", "3-12"], "out of range"),
    (["--classes", "4-2"], "select nothing"),
    (["--eps", "-0.5"], ">= 0"),
    (["--eps", "big"], "eps must be"),
    (["--dataset", "mnist", "--no-download", "--data-dir", "{tmp}/empty"], "--no-download"),
    (["--out", "{tmp}/file/sub"], "cannot write"),
    (["--resume", "--out", "{tmp}/corrupt"], "cannot read checkpoint"),
    (["--trained-eps", "1"], "--trained-eps applies to --eval-only only"),
    (["--eval-only", "--ckpt", "x.pt", "--eps", "1"], "--trained-eps"),
    (["--eval-only", "--eps", "1"], "needs --ckpt"),
    # the channels_last fault of docs/PERFORMANCE.md: a strided 1x1 convolution of 4 channels
    (["--arch", "resnet18", "--width", "4", "--device", "cpu"], "--width 4 on the CPU"),
    (["--arch", "resnet18", "--width", "2", "--device", "cpu"], "--width 2 on the CPU"),
])
def test_user_errors_exit_with_one_line(argv, expect, tmp_path):
    """`python advtrain.py ...` (its __main__ block, in this process): one line and exit 2,
    before any training."""
    (tmp_path / "file").write_text("")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.pt").write_bytes(b"not a checkpoint")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = run_main("advtrain.py", "--epochs", "1", "--train-size", "64", *argv)
    assert proc.returncode == 2, proc
    assert_user_error(proc, expect)


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    common_args = ["--classes", "0-4", "--train-size", "64", "--test-size", "32", "--epochs", "2",
                   "--steps", "1", "--eval-steps", "1", "--out", str(tmp_path)]
    advtrain.main(advtrain.get_args(common_args + ["--eps", "0.5"]))
    for changed, name in ((["--eps", "0.25"], "eps="), (["--eps", "0.5", "--lr", "0.1"], "lr="),
                          (["--eps", "0.5", "--eval-eps", "1.0"], "eval_eps=")):
        with pytest.raises(common.UserError, match=name):
            advtrain.main(advtrain.get_args(common_args + changed + ["--resume"]))
    # the same settings (another device or data folder does not count) resume: nothing to redo
    advtrain.main(advtrain.get_args(common_args + ["--eps", "0.5", "--resume", "--device", "cpu"]))


def test_a_model_of_other_settings_is_never_overwritten_unasked(tmp_path):
    """Without --resume, a finished model.pt of other settings in --out is one line and exit
    2, left as it was; the same settings may train again in place."""
    common_args = ["--classes", "0-4", "--train-size", "64", "--test-size", "32", "--epochs", "1",
                   "--steps", "1", "--eval-steps", "1", "--out", tmp_path]
    assert run_main("advtrain.py", *common_args, "--eps", "0.5").returncode == 0
    before = (tmp_path / "model.pt").read_bytes()
    proc = run_main("advtrain.py", *common_args, "--eps", "0.25")
    assert proc.returncode == 2 and "epoch" not in proc.stdout
    assert_user_error(proc, str(tmp_path / "model.pt"), "eps=0.5", "--out")
    assert (tmp_path / "model.pt").read_bytes() == before
    assert run_main("advtrain.py", *common_args, "--eps", "0.5").returncode == 0


@pytest.mark.parametrize("labels,names", [(lambda y: y + 5, "labels from 5 to"),
                                          (lambda y: y - 1, "labels from -1"),
                                          (lambda y: y.float(), "y must")])
def test_accuracy_refuses_labels_the_model_cannot_predict(labels, names, fmnist_test, tiny_ckpt):
    """A label past the model's classes would count as a wrong prediction: a ValueError naming
    the labels, at eps 0 as under attack."""
    model, _ = checkpoints.load_checkpoint(tiny_ckpt)
    x, y = fmnist_test
    for eps, steps in ((0.0, None), (0.5, 1)):
        with pytest.raises(ValueError, match=names):
            advtrain.accuracy(model, x, labels(y), eps=eps, steps=steps)


def test_compile_without_a_cpp_compiler_is_one_line_before_any_training(tmp_path):
    """On a machine whose PATH has no C++ compiler, --compile on the CPU cannot compile
    (inductor): one line naming the remedy and exit 2, before any data or output folder."""
    empty = tmp_path / "bin"  # python runs by its full path; nothing else is on PATH
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env["PATH"] = str(empty)
    proc = subprocess.run([sys.executable, "advtrain.py", "--compile", "--device", "cpu",
                           "--train-size", "64", "--epochs", "1", "--out", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_user_error(proc, "--compile", "C++ compiler")
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_compiled_graphs_are_few_and_none_after_the_first_epoch(monkeypatch):
    """--compile (setup_model's torch.compile) under train_epoch: the first epoch builds at
    most 4 graphs of the network, the second none, and more than none (the compiled model ran).

    4 = 2 ways of calling x 2 batch shapes. The attack calls the network in eval mode on an
    input that requires grad, the training step in train mode on one that does not: dynamo
    guards on the mode and on requires_grad, so each way has its own graphs. The batches are
    32 and, last, 6 (70 examples): each way recompiles for the second shape (with
    automatic_dynamic_shapes, a graph whose batch size is dynamic; without, a static one: 4
    either way). A second epoch repeats the ways and shapes, so steady-state training never
    recompiles; a batch whose size changed every step would exceed 4. The backend is
    CompileCounter (frames compiled; no inductor, no C++ compiler); 4 is below
    recompile_limit (8), past which dynamo stops counting and runs eagerly. That the compiled
    attack computes no weight gradient is test_ddp.py's test."""
    import argparse
    import torch._dynamo.testing
    counter = torch._dynamo.testing.CompileCounter()
    compile_ = torch.compile
    monkeypatch.setattr(advtrain.torch, "compile", lambda model: compile_(model, backend=counter))
    run = argparse.Namespace(seed=0, sync_bn=False, compile=True, lr=0.1, momentum=0.9,
                             weight_decay=5e-4)
    model_args = dict(arch="cnn", num_classes=5, in_channels=1, image_size=28, mean=[0.5],
                      std=[0.25])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(70, 1, 28, 28, generator=g), torch.randint(0, 5, (70,), generator=g)
    counts = []
    torch._dynamo.reset()
    try:
        _, model, opt = advtrain.setup_model(run, {"model_args": model_args},
                                             torch.device("cpu"), 1)
        for epoch in range(2):  # run_epochs's call on the CPU (the quick preset: no augment)
            torch.manual_seed(epoch)
            advtrain.train_epoch(model, opt, x, y, batch_size=32, norm="l2", eps=0.5, steps=2,
                                 step0=3 * epoch, lr_schedule=lambda s: common.lr_at(s, 6, 0.1),
                                 channels_last=True)
            counts.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    assert 0 < counts[0] <= 4 and counts[1] == counts[0], counts  # frames after epochs 1, 2


def test_absent_fashion_mnist_names_both_remedies(tmp_path, monkeypatch):
    """No data-dir copy, no system copy, no network: one line with both ways to get the data."""
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: network unreachable")

    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", str(tmp_path / "absent"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError) as info:
        data.load_split("fashion-mnist", True, data_dir=str(tmp_path / "data"))
    message = str(info.value)
    assert "\n" not in message and "dataset-fashion-mnist" in message and "internet" in message


# ----------------------------------------------------------------------------- APGD, FGSM, guards

def test_dlr_targeted_loss_known_values():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(4 - 3) / (4 - 1.5)
    loss = advtrain.dlr_targeted_loss(logits, torch.tensor([0]), torch.tensor([1]))
    assert loss.item() == pytest.approx(-0.4)
    scaled = advtrain.dlr_targeted_loss(3 * logits + 7, torch.tensor([0]), torch.tensor([1]))
    assert scaled.item() == pytest.approx(-0.4)  # invariant to shifts and scales
    assert sorted(advtrain._apgd_checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99, 105]


def test_fgsm_guard_stops_at_a_forced_collapse_and_keeps_the_best_weights(tmp_path, monkeypatch):
    """Guard accuracies 0.5, 0.7, then 0.1 (forced): training stops after epoch 3 of 4 with
    epoch 2's weights, and says so in the log and metrics.json."""
    forced, real = iter([0.5, 0.7, 0.1]), advtrain.accuracy

    def guard_then_real(model, x, y, batch_size=500, norm="l2", eps=0.0, steps=0, *args, **kwargs):
        if steps == 10:  # the guard's PGD-10
            return next(forced)
        return real(model, x, y, batch_size, norm, eps, steps, *args, **kwargs)

    monkeypatch.setattr(advtrain, "accuracy", guard_then_real)
    advtrain.main(advtrain.get_args([
        "--classes", "0-4", "--train-size", "700", "--test-size", "64", "--epochs", "4",
        "--norm", "linf", "--eps", "0.1", "--attack", "fgsm", "--guard-size", "200",
        "--eval-steps", "2", "--out", str(tmp_path)]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["guard"] == {"history": [0.5, 0.7, 0.1], "best_epoch": 2, "stopped_epoch": 3}
    assert metrics["train_size"] == 500 and metrics["attack"] == "fgsm"
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and log[-1]["guard_acc"] == 0.1
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["epoch"] == 4  # finished: --resume does not train on
    assert all(torch.equal(ckpt["model"][k], ckpt["guard"]["best_model"][k]) for k in ckpt["model"])


def test_non_finite_loss_stops_with_one_line_and_no_checkpoint(tmp_path):
    assert_user_error(run_main("advtrain.py", "--classes", "0-4", "--train-size", "512",
                               "--epochs", "1", "--lr", "1e38", "--out", tmp_path),
                      "epoch 1: loss is", "step")
    assert not (tmp_path / "model.pt").exists()


def test_eval_only_any_checkpoint_with_apgd(tiny_ckpt, tmp_path):
    advtrain.main(advtrain.get_args([
        "--eval-only", "--ckpt", str(tiny_ckpt), "--eval-eps", "linf:0.05", "--eval-attack", "apgd",
        "--eval-steps", "3", "--test-size", "50", "--out", str(tmp_path)]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [(r["norm"], r["eps"], r["attack"]) for r in metrics["robust_acc"]] == [
        ("l2", 0.5, "apgd"), ("linf", 0.05, "apgd")]
    assert metrics["test_size"] == 50 and metrics["eps"] == 0.5 and 0 <= metrics["clean_acc"] <= 1


def test_eval_only_a_published_checkpoint(tmp_path, monkeypatch):
    """A robustness-layout CIFAR ResNet records no training radius: --eval-only attacks it at
    --eval-eps only (on synthetic CIFAR-shaped data standing in for CIFAR-10, offline)."""
    torch.manual_seed(0)
    net = published.CifarResNet(published.FOREIGN_ARCHS["cifar_resnet18"].blocks, 10, 8)
    torch.save(net.state_dict(), tmp_path / "published.pt")
    monkeypatch.setattr(advtrain, "load_split",
                        lambda name, train, data_dir, classes, size, download:
                        data.load_split("synthetic", train, classes=classes, size=size))
    advtrain.main(advtrain.get_args([
        "--eval-only", "--ckpt", str(tmp_path / "published.pt"), "--eval-eps", "linf:8/255",
        "--eval-steps", "2", "--test-size", "20", "--out", str(tmp_path)]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eps"] is None and metrics["seed"] is None and metrics["dataset"] == "cifar10"
    assert [(r["norm"], r["attack"]) for r in metrics["robust_acc"]] == [("linf", "pgd")]


# ----------------------------------------------------------------------------- APGD's working batch
# The reference: advtrain.py's APGD before fooled examples left the working batch, copied
# verbatim (names qualified), kept here only to compare the two (Croce and Hein 2020,
# Algorithm 1; an example falls to the first run that misclassifies it).

def _apgd_single_reference(model, x, y, norm, eps, steps=100, loss_fn=None, rho=0.75,
                           momentum=0.75):
    advtrain.check_attack(x, y, norm, eps, steps)
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, reduction="none"))
    view = (-1,) + (1,) * (x.dim() - 1)

    def loss_and_grad(x_adv):
        with torch.enable_grad():
            x_adv = x_adv.detach().requires_grad_(True)
            logits = model(x_adv)
            loss = loss_fn(logits, y)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), grad.detach(), logits.detach().argmax(1) != y

    def ascent(grad):
        return grad.sign() if norm == "linf" else advtrain.l2_step(grad, 1.0)

    def onto_ball(point):  # a point [N, C, H, W] moved into the threat model around x
        return advtrain.project(x, point - x, norm, eps)

    with advtrain.eval_mode(model):
        x = x.detach()
        start = (torch.rand_like(x) * 2 - 1) if norm == "linf" else torch.randn_like(x)
        size = start.abs().flatten(1).amax(1) if norm == "linf" else start.flatten(1).norm(dim=1)
        x_cur = onto_ball(x + start * eps / size.view(view))
        loss_cur, grad, fooled = loss_and_grad(x_cur)
        x_adv = torch.where(fooled.view(view), x_cur, x)  # first misclassified point per example
        x_best, loss_best, grad_best = x_cur, loss_cur, grad
        x_prev, eta = x_cur, torch.full((len(x),), 2.0 * eps, device=x.device)
        checkpoints, last = advtrain._apgd_checkpoints(steps), 0
        increases = torch.zeros(len(x), device=x.device)
        eta_last, loss_best_last = eta.clone(), loss_best.clone()
        for k in range(steps):
            z = onto_ball(x_cur + eta.view(view) * ascent(grad))
            a = momentum if k > 0 else 1.0
            x_new = onto_ball(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
            loss_new, grad_new, fooled_new = loss_and_grad(x_new)
            x_adv = torch.where((fooled_new & ~fooled).view(view), x_new, x_adv)
            fooled |= fooled_new
            increases += (loss_new > loss_cur).float()
            better = loss_new > loss_best
            x_best = torch.where(better.view(view), x_new, x_best)
            grad_best = torch.where(better.view(view), grad_new, grad_best)
            loss_best = torch.where(better, loss_new, loss_best)
            x_prev, x_cur, loss_cur, grad = x_cur, x_new, loss_new, grad_new
            if k + 1 in checkpoints:
                stalled = (eta == eta_last) & (loss_best <= loss_best_last)
                halve = (increases < rho * (k + 1 - last)) | stalled
                eta_last, loss_best_last = eta.clone(), loss_best.clone()
                eta = torch.where(halve, eta / 2, eta)
                x_cur = torch.where(halve.view(view), x_best, x_cur)
                grad = torch.where(halve.view(view), grad_best, grad)
                increases.zero_()
                last = k + 1
    return torch.where(fooled.view(view), x_adv, x_best).detach()


def apgd_reference(model, x, y, norm, eps, steps=100, restarts=1, targets=3):
    advtrain.check_attack(x, y, norm, eps, steps)
    advtrain.check_number("restarts", restarts, at_least=1, integer=True)
    advtrain.check_number("targets", targets, at_least=0, integer=True)
    x, x_adv = x.detach(), x.detach().clone()
    with advtrain.eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        k = logits.shape[1]
        if targets and (k < 4 or targets > k - 1):
            raise ValueError(f"targets {targets}: targeted APGD-DLR needs >= 4 classes and at "
                             f"most k - 1 targets, the model has k = {k} classes (targets=0: "
                             f"APGD-CE alone)")
        robust = logits.argmax(1) == y  # a clean mistake needs no attack
        others = logits.clone()
        others[torch.arange(len(y)), y] = -float("inf")
        ranked = others.argsort(1, descending=True)  # the other classes, most likely first
        runs = [None] + list(range(targets))
        for _ in range(restarts):
            for t in runs:
                idx = robust.nonzero()[:, 0]
                if len(idx) == 0:
                    break
                loss_fn = None if t is None else (
                    lambda lg, yy, tt=ranked[idx, t]: advtrain.dlr_targeted_loss(lg, yy, tt))
                xa = _apgd_single_reference(model, x[idx], y[idx], norm, eps, steps, loss_fn)
                with torch.no_grad():
                    fooled = model(xa).argmax(1) != y[idx]
                x_adv[idx] = xa
                robust[idx[fooled]] = False
    return x_adv


def _forwarded(model, attack):
    """attack() and the number of images the model's forward passes saw during it."""
    seen = []
    hook = model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    try:
        result = attack()
    finally:
        hook.remove()
    return result, sum(seen)


@pytest.mark.parametrize("norm,eps,restarts,targets", [("linf", 0.05, 1, 3), ("l2", 0.5, 2, 3),
                                                       ("l2", 1.0, 1, 0)])
def test_apgd_drops_fooled_examples_with_the_reference_outcome(norm, eps, restarts, targets,
                                                               fmnist_test, tiny_ckpt):
    """Same seed, same inputs: every example is fooled or not exactly as under the reference
    (so the robust accuracy is the same), its adversarial point is the same, and the forward
    passes see fewer images. Exact: the random starts are drawn for a run's whole batch in both,
    in the same order, and every other quantity of APGD is per example (eval mode)."""
    x, y = fmnist_test
    model, _ = checkpoints.load_checkpoint(tiny_ckpt)
    model.train()
    outcome = {}
    for name, attack in (("new", advtrain.apgd_attack), ("reference", apgd_reference)):
        torch.manual_seed(0)
        x_adv, images = _forwarded(
            model, lambda: attack(model, x, y, norm, eps, 10, restarts, targets))
        with torch.no_grad():
            fooled = model.eval()(x_adv).argmax(1) != y
        model.train()
        outcome[name] = x_adv, fooled, images
    (x_new, fooled_new, images_new), (x_ref, fooled_ref, images_ref) = outcome.values()
    assert 0 < fooled_ref.sum() < len(y)  # a mix of broken and robust examples: a real test
    assert torch.equal(fooled_new, fooled_ref)
    assert torch.equal(x_new, x_ref)
    assert images_new < images_ref
    assert model.training and all(p.grad is None for p in model.parameters())


def test_cudnn_autotuning_is_on_for_training_and_off_for_evaluation(monkeypatch, tmp_path):
    """cuDNN autotuning (torch.backends.cudnn.benchmark) where shapes are fixed, the training
    steps, and not in the evaluation, whose APGD attacks subsets of every size; the flag is
    given back as found. (The flag is read here as each stage runs; the CPU ignores it.)"""
    seen = []

    def recording(name, function):
        def wrapper(*args, **kwargs):
            seen.append((name, torch.backends.cudnn.benchmark))
            return function(*args, **kwargs)
        monkeypatch.setattr(advtrain if name == "accuracy" else models, name, wrapper)
    recording("sgd_epoch", models.sgd_epoch)  # advtrain.py, run as a script, imports it anew
    recording("check_images", models.check_images)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    run = run_main("advtrain.py", "--dataset", "synthetic", "--train-size", "64", "--test-size",
                   "16", "--epochs", "1", "--eps", "0.5", "--steps", "1", "--eval-steps", "1",
                   "--device", "cpu", "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert [flag for name, flag in seen if name == "sgd_epoch"] == [True]
    assert seen[-1] == ("check_images", False)  # the final evaluation's last attack
    assert torch.backends.cudnn.benchmark is False
    seen.clear()
    torch.backends.cudnn.benchmark = True
    recording("accuracy", advtrain.accuracy)
    net = models.build_model("cnn", 3, 1, 8, [0.5], [0.5])
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        advtrain.evaluate(net, x, y, [("l2", 0.1)], steps=1, attack="apgd-ce")
    assert seen == [("accuracy", False), ("accuracy", False)]  # robust, then clean
    assert torch.backends.cudnn.benchmark is True  # given back
