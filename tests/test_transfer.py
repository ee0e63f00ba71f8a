"""transfer.py: the linear probe, frozen features, caching, input adaptation, user errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import models
import transfer
from conftest import assert_user_error, run_script
from transfer import describe_adaptation, extract_features, linear_probe, parse_target


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and far faster on a busy machine (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROBE_ARGS = ["--target", "fashion-mnist:5-9", "--train-size", "300", "--test-size", "100",
              "--no-download", "--device", "cpu"]


def separable_features(n, d=6, k=3, seed=0):
    """Gaussian blobs far apart (linearly separable): features [n, d], labels [n]."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return centres[y] + 0.3 * torch.randn(n, d, generator=g), y


def test_probe_separable_is_perfect_and_stationary():
    x, y = separable_features(390)
    x_train, y_train, x_test, y_test = x[:300], y[:300], x[300:], y[300:]
    probe = linear_probe(x_train, y_train, x_test, y_test, l2_grid=(1e-3, 1e-2), seed=0,
                         tol=1e-8, dtype=torch.float64)
    assert probe["acc"] == 1.0
    assert probe["l2"] in (1e-3, 1e-2) and set(probe["val_acc"]) == {1e-3, 1e-2}
    # gradient of the penalised objective at the returned weights, by autograd: ~0
    weight = probe["weight"].clone().requires_grad_()
    bias = probe["bias"].clone().requires_grad_()
    z = (x_train.double() - probe["mean"]) / probe["std"]
    loss = F.cross_entropy(z @ weight.T + bias, y_train) + 0.5 * probe["l2"] * weight.square().sum()
    grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
    assert max(grad_w.abs().max(), grad_b.abs().max()) < 1e-6
    assert probe["weight"].abs().max() > 0.1  # it moved away from the zero start


def test_probe_deterministic_and_standardised_on_train_only():
    x, y = separable_features(260, seed=2)
    x_train, y_train, x_test, y_test = x[:200], y[:200], x[200:] + 100, y[200:]  # shifted test set
    a = linear_probe(x_train, y_train, x_test, y_test, seed=4)
    b = linear_probe(x_train, y_train, x_test, y_test, seed=4)
    assert a["acc"] == b["acc"] and torch.equal(a["weight"], b["weight"]) and a["l2"] == b["l2"]
    assert a["grad_max"] <= 1e-4  # the default float32 fit reaches its tolerance too
    assert torch.allclose(a["mean"], x_train.mean(0)) and torch.allclose(a["std"], x_train.std(0))


def test_parse_target_and_adaptation_text():
    assert parse_target("fashion-mnist:5-9") == ("fashion-mnist", [5, 6, 7, 8, 9], None)
    assert parse_target("mnist") == ("mnist", list(range(10)), None)
    assert parse_target("fashion-mnist:5-9+invert") == ("fashion-mnist", [5, 6, 7, 8, 9], "invert")
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(transfer.SHIFTS["invert"](x), 1 - x) and torch.equal(transfer.SHIFTS["rot90"](x)[0, 0, 0], x[0, 0, :, -1])
    assert describe_adaptation(1, 28, 3, 32) == "1->3 channels, 28->32 px"
    assert describe_adaptation(3, 32, 3, 32) == "none"
    for bad in ("mnist:", ":1-2", "mnist:1:2", "nope:0-1", "mnist:8-12", "mnist+blur"):
        with pytest.raises(common.UserError):
            parse_target(bad)


def test_adapt_images_known_values():
    """Grayscale -> RGB copies the channel, RGB -> grayscale averages, resizing keeps constants
    and the layout of an image (left dark, right bright)."""
    grey = torch.full((2, 1, 28, 28), 0.3)
    rgb = data.adapt_images(grey, 3, 32)
    assert rgb.shape == (2, 3, 32, 32) and torch.allclose(rgb, torch.tensor(0.3))
    colour = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    assert torch.allclose(data.adapt_images(colour, 1, 28), torch.tensor(0.5))
    halves = torch.zeros(1, 1, 28, 28)
    halves[..., 14:] = 1
    big = data.adapt_images(halves, 1, 32)
    assert big[..., :14].max() < 0.05 and big[..., 18:].min() > 0.95
    assert 0 <= big.min() and big.max() <= 1
    assert data.adapt_images(halves, 1, 28) is not halves and torch.equal(data.adapt_images(halves, 1, 28), halves)


@pytest.mark.parametrize("arch,channels,size", [("resnet18", 3, 32), ("cnn", 1, 28)])
def test_features_batched_equal_one_batch(arch, channels, size):
    """Batches of 3 (a ragged last batch) give the features of the whole adapted set at once."""
    torch.manual_seed(0)
    model = models.build_model(arch, 10, channels, size, (0.5,) * channels, (0.25,) * channels, width=8)
    x = torch.rand(7, 4 - channels, 60 - size, 60 - size)  # the other kind of image
    feats = extract_features(model, x, channels, size, batch_size=3)
    assert feats.shape == (7, 64 if arch == "resnet18" else 784) and feats.dtype == torch.float32
    with torch.no_grad():
        expected = model.eval().features(data.adapt_images(x, channels, size))
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)


class Images(torch.utils.data.Dataset):
    """A map-style Dataset of (image, label) over tensors: what data.open_split streams."""
    def __init__(self, x, y):
        self.x, self.y, self.targets = x, y, y.tolist()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_split_gives_the_in_memory_features_and_fine_tuning(tiny_ckpt, workers):
    """A split read batch by batch from a Dataset (with a SHIFTS transform, resized per batch)
    gives the features, and the fine-tuned accuracy, of the same images held in memory."""
    model, _ = models.load_checkpoint(tiny_ckpt)
    x, y = data.load_split("fashion-mnist", False, classes=[5, 6, 7, 8, 9], size=70, download=False)
    shift = transfer.SHIFTS["invert"]
    in_memory = extract_features(model, shift(x), 1, 28, batch_size=32)
    streamed = extract_features(model, Images(x, y), 1, 28, batch_size=32, transform=shift, workers=workers)
    torch.testing.assert_close(streamed, in_memory, rtol=0, atol=0)
    upsampled = extract_features(model, Images(x[:, :, ::2, ::2], y), 1, 28, batch_size=32, workers=workers)
    torch.testing.assert_close(upsampled, extract_features(model, data.adapt_images(x[:, :, ::2, ::2], 1, 28), 1, 28))
    if workers == 0:
        args = dict(epochs=1, lr=0.05, transform=shift)
        assert (transfer.finetune(model, x, y, Images(x, y), 1, 28, **args)
                == transfer.finetune(model, x, y, (x, y), 1, 28, **args))


def run_transfer(capsys, *argv):
    """transfer.py in process (a subprocess costs seconds of imports): (exit code, stdout, stderr)."""
    code = 0
    try:
        with common.user_errors():
            transfer.main(transfer.get_args([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cached_features_reused_correct_and_checkpoint_untouched(tiny_ckpt, tmp_path, capsys):
    before = torch.load(tiny_ckpt, weights_only=True)["model"]
    code, out, err = run_transfer(capsys, "--ckpt", tiny_ckpt, "--out", tmp_path, *PROBE_ARGS)
    assert code == 0, err
    assert "extracted" in out and "cached" not in out
    train_path = tmp_path / "features" / "fashion-mnist_5-9_train.npy"
    stamp, cached = train_path.stat().st_mtime_ns, np.load(train_path)
    result = json.loads((tmp_path / "transfer.json").read_text())["fashion-mnist:5-9"]
    assert result["n_train"] == 300 and result["n_test"] == 100 and result["feature_dim"] == 784
    assert result["adapt"] == "none" and 0.2 < result["acc"] <= 1.0

    code, out, err = run_transfer(capsys, "--ckpt", tiny_ckpt, "--out", tmp_path, *PROBE_ARGS)
    assert code == 0, err
    assert "extracted" not in out and out.count("cached") == 2
    assert train_path.stat().st_mtime_ns == stamp  # not rewritten
    assert json.loads((tmp_path / "transfer.json").read_text())["fashion-mnist:5-9"]["acc"] == result["acc"]

    # the checkpoint file is bit-identical: parameters and BatchNorm buffers
    after = torch.load(tiny_ckpt, weights_only=True)["model"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the cached arrays are the frozen features of the first 300 target images
    model, _ = models.load_checkpoint(tiny_ckpt)
    x, _ = data.load_split("fashion-mnist", True, classes=[5, 6, 7, 8, 9], size=300, download=False)
    np.testing.assert_allclose(cached, extract_features(model, x, 1, 28).numpy(), rtol=1e-5, atol=1e-6)


def test_extraction_leaves_batchnorm_alone(tiny_ckpt):
    model, _ = models.load_checkpoint(tiny_ckpt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # even a model left in train mode keeps its BatchNorm statistics
    x, _ = data.load_split("fashion-mnist", True, classes=[5, 6], size=64, download=False)
    extract_features(model, x, 1, 28, batch_size=32)
    assert model.training  # mode restored
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("args", [
    ["--target", "fashion-mnist:5-9", "--ckpt", "missing/model.pt"],
    ["--target", "mnist:5-12"],
    ["--target", "mnist:"],
    ["--target", "fashion-mnist", "--train-size", "0"],
    ["--target", "fashion-mnist:5-9", "--train-size", "3"],  # classes absent from the training split
    [],  # no --target
])
def test_user_errors_one_line(args, tiny_ckpt, tmp_path, capsys):
    if "--ckpt" not in args:
        args = ["--ckpt", tiny_ckpt, *args]
    code, out, err = run_transfer(capsys, *args, "--out", tmp_path, "--no-download")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err


def test_script_errors_one_line(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "checkpoint" in assert_user_error(run_script("transfer.py", "--ckpt", bad, "--target", "mnist"))
    assert "nope" in assert_user_error(run_script("transfer.py", "--ckpt", bad, "--target", "nope:0-4"))


# ----------------------------------------------------------------------------- few-shot probes

def blobs(n_per_class, k=4, d=12, seed=0, spread=0.5):
    """Overlapping Gaussian classes (not separable): features [k * n, d], labels [k * n]."""
    centres = spread * torch.randn(k, d, generator=torch.Generator().manual_seed(0))  # the same classes
    y = torch.arange(k).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), d, generator=torch.Generator().manual_seed(seed + 1)), y


def test_k_shot_draws_are_seeded_stratified_and_checked():
    _, y = blobs(30)
    a = transfer.k_shot_indices(y, 5, torch.Generator().manual_seed(3))
    b = transfer.k_shot_indices(y, 5, torch.Generator().manual_seed(3))
    c = transfer.k_shot_indices(y, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 20 and torch.equal(torch.bincount(y[a]), torch.full((4,), 5))
    with pytest.raises(common.UserError, match="class 0 has 30"):
        transfer.k_shot_indices(y, 31, torch.Generator())
    with pytest.raises(common.UserError, match="class 2 has 0"):
        transfer.k_shot_indices(y[y != 2], 1, torch.Generator())


def test_few_shot_probe_reproduces_and_reports_its_choices():
    x, y = blobs(60)
    xt, yt = blobs(50, seed=1)
    a = transfer.few_shot_probe(x, y, xt, yt, shots=10, draws=3, seed=7)
    b = transfer.few_shot_probe(x, y, xt, yt, shots=10, draws=3, seed=7)
    assert a == b and a["draws"] == 3 and len(a["l2"]) == 3
    assert all(l2 in transfer.FEW_SHOT_L2_GRID for l2 in a["l2"]) and 0 <= a["at_edge"] <= 3
    one = transfer.few_shot_probe(x, y, xt, yt, shots=1, draws=2, seed=7)
    assert one["l2"] == [max(transfer.FEW_SHOT_L2_GRID)] * 2 and one["at_edge"] is None
    assert 0.25 < one["acc"] < a["acc"] <= 1  # more shots, better than chance and than one shot


def test_few_shot_fit_agrees_with_scikit_learn_at_the_chosen_penalty():
    """The probe's optimum on a K-shot set equals scikit-learn's multinomial logistic
    regression with C = 1 / (l2 * n) on the same standardised features."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(60)
    xt, yt = blobs(50, seed=1)
    idx = transfer.k_shot_indices(y, 10, torch.Generator().manual_seed(0))
    xs, ys, l2 = x[idx].double(), y[idx], 0.1
    probe = transfer.fit_logistic(xs, ys, l2, 4, tol=1e-9)
    z, zt = (xs - probe["mean"]) / probe["std"], (xt.double() - probe["mean"]) / probe["std"]
    reference = linear_model.LogisticRegression(C=1 / (l2 * len(ys)), tol=1e-10, max_iter=10000).fit(z.numpy(), ys.numpy())
    np.testing.assert_allclose(probe["weight"].numpy(), reference.coef_, rtol=1e-4, atol=1e-5)
    ours = (zt @ probe["weight"].T + probe["bias"]).argmax(1).numpy()
    assert (ours == reference.predict(zt.numpy())).mean() == 1.0


def test_cli_few_shot_entries_and_too_many_shots(tiny_ckpt, tmp_path, capsys):
    code, out, err = run_transfer(capsys, "--ckpt", tiny_ckpt, "--out", tmp_path, *PROBE_ARGS,
                                  "--shots", "1", "5", "--draws", "2")
    assert code == 0, err
    few = json.loads((tmp_path / "transfer.json").read_text())["fashion-mnist:5-9"]["few_shot"]
    assert set(few) == {"1", "5"} and few["5"]["draws"] == 2 and len(few["5"]["l2"]) == 2
    assert 0.2 <= few["1"]["acc"] <= 1 and few["5"]["acc_se"] >= 0 and "5-shot: acc" in out
    code, out, err = run_transfer(capsys, "--ckpt", tiny_ckpt, "--out", tmp_path, *PROBE_ARGS, "--shots", "100")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "100 shots per class asked for" in err, err
    assert "features" not in out  # checked before any work


def test_finetune_moves_every_weight_of_a_copy_and_beats_chance(tiny_ckpt, tmp_path, capsys):
    model, _ = models.load_checkpoint(tiny_ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data.load_split("fashion-mnist", True, classes=[5, 6, 7, 8, 9], size=600, download=False)
    xt, yt = data.load_split("fashion-mnist", False, classes=[5, 6, 7, 8, 9], size=300, download=False)
    acc = transfer.finetune(model, x, y, (xt, yt), 1, 28, epochs=2, lr=0.05)
    assert acc > 0.5  # 5 classes: chance is 0.2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the source model is untouched
    code, out, err = run_transfer(capsys, "--ckpt", tiny_ckpt, "--out", tmp_path, *PROBE_ARGS, "--finetune",
                                  "--finetune-epochs", "1", "--finetune-size", "200")
    assert code == 0, err
    entry = json.loads((tmp_path / "transfer.json").read_text())["fashion-mnist:5-9"]["finetune"]
    assert entry["n_train"] == 200 and entry["epochs"] == 1 and 0 <= entry["acc"] <= 1
