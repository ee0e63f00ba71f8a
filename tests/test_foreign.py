"""Published ResNet checkpoints: torchvision state dicts and robustness-library files load into
our interface with the logits of the original network, architectures are detected from keys
and shapes, and files that need unpickling load only with --unsafe-load. Every checkpoint is
built here with random weights; nothing is downloaded."""
import functools
import json
import sys
import types

import pytest
import torch
import torchvision

import data
import models
import published
from checkpoints import load_checkpoint, read_checkpoint
from conftest import one_line_error
from make_fake_imagenet import randomize_bn, robustness_file  # the fixture script's builders

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNPICKLED = []  # what Tripwire objects did when unpickled


def meta_state(build):
    """The state dict (shapes only, no memory, no init time) of the network build() returns."""
    with torch.device("meta"):
        return build().state_dict()


def check_same_logits(model, original, x, mean, std):
    """model(x) on [0, 1] images equals the original on normalised x; features + head compose."""
    with torch.no_grad():
        mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        expected = original((x - mean) / std)
        logits, composed = model(x), model.head(model.features(x))
    assert not model.training
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(composed, logits, rtol=0, atol=1e-6)
    assert model.features(x).shape == (len(x), model.head.in_features)


# ----------------------------------------------------------------------------- loading


def test_torchvision_state_dict_uses_dataset_normalisation(tmp_path):
    torch.manual_seed(0)
    original = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    torch.save(original.state_dict(), tmp_path / "resnet18.pth")
    model, ckpt = load_checkpoint(tmp_path / "resnet18.pth", dataset="imagenet")
    check_same_logits(model, original, torch.rand(2, 3, 64, 64), IMAGENET_MEAN, IMAGENET_STD)
    assert model.features(torch.rand(1, 3, 64, 64)).shape == (1, 512)
    assert {k: ckpt[k] for k in ("arch", "num_classes", "in_channels", "image_size", "dataset",
                                 "norm", "eps", "format", "model_args")} == {
        "arch": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 224,
        "dataset": "imagenet", "norm": None, "eps": None, "format": "torchvision",
        "model_args": None}
    assert ckpt["classes"] == list(range(10))


def test_robustness_resnet50_uses_its_normalizer(tmp_path):
    torch.manual_seed(1)
    original = randomize_bn(torchvision.models.resnet50(weights=None, num_classes=5))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    torch.save(robustness_file(original.state_dict(), mean, std), tmp_path / "rn50.pt")
    model, ckpt = load_checkpoint(tmp_path / "rn50.pt")
    check_same_logits(model, original, torch.rand(2, 3, 64, 64), mean, std)
    assert (ckpt["arch"], ckpt["format"], ckpt["num_classes"], ckpt["image_size"],
            ckpt["dataset"]) == ("resnet50", "robustness", 5, 224, "imagenet")
    assert model.head.in_features == 2048


@pytest.mark.parametrize("arch,width", [("cifar_resnet18", 8), ("cifar_resnet50", 4)])
def test_robustness_cifar_resnet(tmp_path, arch, width):
    torch.manual_seed(2)
    bottleneck = arch == "cifar_resnet50"
    blocks = published.FOREIGN_ARCHS[arch].blocks
    original = randomize_bn(published.CifarResNet(blocks, 10, width, bottleneck))
    state = original.state_dict()
    # the robustness library's parameter names and shapes
    assert state["conv1.weight"].shape == (width, 3, 3, 3)
    assert "linear.weight" in state and "bn1.running_var" in state
    assert state["layer2.0.shortcut.0.weight"].shape[2:] == (1, 1)
    assert "layer2.0.shortcut.1.weight" in state
    assert ("layer1.0.conv3.weight" in state) == bottleneck
    assert ("layer1.0.shortcut.0.weight" in state) == bottleneck
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    torch.save(robustness_file(state, mean, std, optimizer={"lr": 0.1}), tmp_path / "cifar.pt")
    model, ckpt = load_checkpoint(tmp_path / "cifar.pt")
    check_same_logits(model, original, torch.rand(2, 3, 32, 32), mean, std)
    assert (ckpt["arch"], ckpt["image_size"], ckpt["dataset"], ckpt["format"]) == (
        arch, 32, "cifar10", "robustness")
    assert model.head.in_features == 8 * width * (4 if bottleneck else 1)


def test_state_dict_under_state_dict_key_and_dataset_argument(tmp_path):
    """A robustness file whose network sits under "state_dict"; `dataset` names the training
    set in the returned dict (the file's normalizer still normalises)."""
    original = published.CifarResNet((2, 2, 2, 2), 100, width=4).eval()
    file = robustness_file(original.state_dict(), (0.5,) * 3, (0.25,) * 3)
    torch.save({"state_dict": file.pop("model"), **file}, tmp_path / "c100.pt")
    model, ckpt = load_checkpoint(tmp_path / "c100.pt", dataset="cifar100")
    check_same_logits(model, original, torch.rand(2, 3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    assert (ckpt["dataset"], ckpt["num_classes"], ckpt["classes"][-1]) == ("cifar100", 100, 99)
    one_line_error("unknown dataset", load_checkpoint, tmp_path / "c100.pt",
                   dataset="places365")
    one_line_error("takes 3", load_checkpoint, tmp_path / "c100.pt", dataset="mnist")


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                  "wide_resnet50_2", "wide_resnet101_2"])
def test_detects_torchvision_resnets_from_shapes(arch):
    """Against torchvision's own constructors, so the table is checked, not just round-tripped."""
    state = meta_state(lambda: getattr(torchvision.models, arch)(weights=None, num_classes=7))
    assert published.detect_arch(state) == arch


def test_wide_resnet50_2_differs_from_resnet50_only_in_layer1_width():
    wide = meta_state(lambda: torchvision.models.wide_resnet50_2(weights=None))
    plain = meta_state(lambda: torchvision.models.resnet50(weights=None))
    assert wide.keys() == plain.keys() and wide["conv1.weight"].shape == plain["conv1.weight"].shape
    assert wide["layer1.0.conv1.weight"].shape[0] == 128
    assert plain["layer1.0.conv1.weight"].shape[0] == 64
    assert published.detect_arch(wide) == "wide_resnet50_2"
    assert published.detect_arch(plain) == "resnet50"


@pytest.mark.parametrize("arch", sorted(published.FOREIGN_ARCHS))
def test_every_known_arch_is_built_and_detected(arch):
    """build_foreign makes each FOREIGN_ARCHS network (wide_resnet50_4 is not a torchvision
    constructor), and detect_arch names it back."""
    state = meta_state(lambda: published.build_foreign(arch, 7, width=16))
    assert published.detect_arch(state) == arch


def test_arch_override_and_unknown_layouts(tmp_path):
    original = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.save(original.state_dict(), tmp_path / "r18.pth")
    model, ckpt = load_checkpoint(tmp_path / "r18.pth", arch="resnet18")
    assert ckpt["arch"] == "resnet18"
    r18 = tmp_path / "r18.pth"
    one_line_error("weights do not fit arch resnet34", load_checkpoint, r18,
                   arch="resnet34")
    one_line_error("weights do not fit arch cifar_resnet18", load_checkpoint, r18,
                   arch="cifar_resnet18")
    one_line_error("choose from resnet18", load_checkpoint, r18, arch="vgg16")

    # a ResNet this code does not know: the message says what was found
    odd = published.CifarResNet((1, 1, 1, 1), 10, width=4).state_dict()
    torch.save(robustness_file(odd, (0.5,) * 3, (0.25,) * 3), tmp_path / "odd.pt")
    message = one_line_error("unknown ResNet layout", load_checkpoint, tmp_path / "odd.pt")
    assert "3x3 stem" in message and "[1, 1, 1, 1]" in message and "BasicBlock" in message
    # the override still loads it when it fits
    torch.save(published.CifarResNet((2, 2, 2, 2), 10, width=4).state_dict(), tmp_path / "c18.pth")
    _, loaded = load_checkpoint(tmp_path / "c18.pth", arch="cifar_resnet18")
    assert loaded["arch"] == "cifar_resnet18"

    # not a ResNet at all
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3),
                "classifier.weight": torch.zeros(10, 8)}, tmp_path / "vgg.pth")
    one_line_error("no 4-d conv1.weight", load_checkpoint, tmp_path / "vgg.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    one_line_error("holds a list", load_checkpoint, tmp_path / "list.pt")


# ----------------------------------------------------------------------------- safe loading


class Schedule:
    """A Python object in a checkpoint, as the robustness library's files carry."""

    def __init__(self, note="cosine"):
        self.note = note


def trip(tag):
    UNPICKLED.append(tag)


class Tripwire:
    """Calls trip when unpickled: proves whether pickled code ran."""

    def __reduce__(self):
        return (trip, ("ran",))


def _small_state():
    return published.CifarResNet((2, 2, 2, 2), 10, width=4).state_dict()


@pytest.mark.parametrize("extra", [Schedule(), functools.partial(max, 1), Tripwire()],
                         ids=["local-class", "partial", "code"])
def test_pickled_objects_need_unsafe_load(tmp_path, capsys, extra):
    path = tmp_path / "pickled.pt"
    torch.save(robustness_file(_small_state(), (0.5,) * 3, (0.25,) * 3, schedule=extra), path)
    UNPICKLED.clear()
    message = one_line_error("--unsafe-load", load_checkpoint, path)
    assert "arbitrary code" in message and "trust" in message
    assert UNPICKLED == [] and capsys.readouterr().err == ""
    model, ckpt = load_checkpoint(path, unsafe=True)
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "--unsafe-load" in err
    assert len(err.strip().splitlines()) == 1
    assert ckpt["arch"] == "cifar_resnet18" and not model.training
    assert UNPICKLED == (["ran"] if isinstance(extra, Tripwire) else [])


def test_unsafe_is_quiet_for_safe_files_and_corrupt_files_stay_one_line(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save(robustness_file(_small_state(), (0.5,) * 3, (0.25,) * 3), path)
    load_checkpoint(path, unsafe=True)
    assert capsys.readouterr().err == ""  # nothing needed unpickling: no warning
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    legacy = tmp_path / "legacy.pt"
    torch.save({"schedule": Schedule()}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:40])  # old format, cut short: an empty EOFError
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for bad in (truncated, legacy, garbage):
        for unsafe in (False, True):
            one_line_error("cannot read checkpoint", load_checkpoint, bad, unsafe=unsafe)
    assert capsys.readouterr().err == ""
    one_line_error("checkpoint not found", load_checkpoint, tmp_path / "missing.pt")


def test_missing_unpickling_module_is_one_line(tmp_path, monkeypatch):
    """robustness files are pickled with dill: without it, unsafe loading names the module."""
    module = types.ModuleType("absent_pickler_module")
    module.Schedule = type("Schedule", (), {"__module__": module.__name__})
    path = tmp_path / "pickled.pt"
    with monkeypatch.context() as patch:  # the module exists while saving only
        patch.setitem(sys.modules, module.__name__, module)
        torch.save({"model": _small_state(), "schedule": module.Schedule()}, path)
    one_line_error("--unsafe-load", load_checkpoint, path)
    one_line_error("needs the Python module absent_pickler_module", load_checkpoint, path,
                   unsafe=True)


# ----------------------------------------------------------------------------- our own files


def test_own_checkpoints_load_as_before(tiny_ckpt, tmp_path):
    reference_ckpt = torch.load(tiny_ckpt, weights_only=True)
    reference = models.build_model(**reference_ckpt["model_args"])
    reference.load_state_dict(reference_ckpt["model"])
    x = torch.rand(4, 1, 28, 28)
    for kwargs in ({}, {"unsafe": True}, {"arch": "cnn", "dataset": "cifar10"}):
        model, ckpt = load_checkpoint(tiny_ckpt, **kwargs)
        assert not model.training and ckpt["classes"] == [0, 1, 2, 3, 4]
        assert ckpt["model_args"] is not None
        assert torch.equal(model(x), reference.eval()(x))
    one_line_error("applies to published checkpoints only", load_checkpoint, tiny_ckpt,
                   arch="resnet18")
    assert read_checkpoint(tiny_ckpt)["arch"] == "cnn"
    pickled = tmp_path / "pickled.pt"
    torch.save({**reference_ckpt, "schedule": Schedule()}, pickled)
    one_line_error("not a checkpoint written by advtrain.py", read_checkpoint, pickled)


def test_imagenet_record_and_load_split():
    ds = data.DATASETS["imagenet"]
    assert (ds.torchvision, ds.num_classes, ds.channels, ds.size) == (None, 1000, 3, 224)
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)
    one_line_error("DATA_DIR/train", data.load_split, "imagenet", True, "no-such-folder")


def test_scripts_run_end_to_end_on_a_robustness_cifar_checkpoint(tmp_path):
    """fisher.py and transfer.py (their __main__ blocks, in this process) on a
    robustness-layout CIFAR ResNet-18 (width 8), synthetic 32-px data (classes 0-9, the
    checkpoint's 10); a wrong --arch is one line."""
    from conftest import assert_user_error, run_main
    torch.manual_seed(0)
    blocks = published.FOREIGN_ARCHS["cifar_resnet18"].blocks
    original = randomize_bn(published.CifarResNet(blocks, 10, 8))
    ckpt = tmp_path / "cifar.pt"
    torch.save(robustness_file(original.state_dict(), (0.5,) * 3, (0.25,) * 3), ckpt)
    common = ["--ckpt", ckpt, "--out", tmp_path, "--device", "cpu", "--no-download"]
    proc = run_main("fisher.py", *common, "--dataset", "synthetic", "--n", 4, "--chunk", 4,
                    "--power-iters", 5)
    assert proc.returncode == 0, proc.stderr
    fisher_json = json.loads((tmp_path / "fisher.json").read_text())
    assert fisher_json["arch"] == "cifar_resnet18" and fisher_json["eps"] is None
    assert fisher_json["weights_trace"] > 0
    proc = run_main("transfer.py", *common, "--target", "synthetic:0-4", "--train-size", 40,
                    "--test-size", 20)
    assert proc.returncode == 0, proc.stderr
    transfer_json = json.loads((tmp_path / "transfer.json").read_text())
    assert transfer_json["synthetic:0-4"]["feature_dim"] == 64
    assert_user_error(run_main("fisher.py", *common, "--dataset", "synthetic",
                               "--arch", "resnet50"), "resnet50")
