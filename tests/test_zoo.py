"""Any image classifier through the adapter (models.adapt_classifier): every classifier that
torchvision.models lists, randomly initialised (weights=None: nothing is downloaded), keeps its
logits as head(features(x)); the scripts run end to end on classifiers of four families given
as --arch torchvision:NAME with a state dict or as --model package.module:function; the
copyable functions run on adapted models; every mistake of the command line is one line."""
import json

import pytest
import torch
import torch.nn as nn
import torchvision

import models
from checkpoints import load_checkpoint, strip_prefixes
from conftest import assert_user_error, one_line_error, run_main
from make_fake_imagenet import randomize_bn

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
ZOO = torchvision.models.list_models(module=torchvision.models)

# The zoo's cost on a two-core CPU is building each network at random (about 0.01 s per
# million parameters, more on a busy machine); a forward pass on 2 images of 32x32 is cheaper.
# Networks of up to about 8M parameters (and ResNet-18) run in the fast loop, up to 30M in the
# slow set; beyond that they are left out (listed as skipped, with the reason), as is MaxViT,
# which takes 224x224 images only. The ViTs, 86M parameters and more, are tested built small
# (tests/zoo_models.tiny_vit).
SLOW = {"convnext_tiny", "densenet121", "densenet161", "densenet169", "densenet201",
        "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
        "efficientnet_b5", "efficientnet_v2_s", "googlenet", "inception_v3", "regnet_x_1_6gf",
        "regnet_x_3_2gf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "resnet34",
        "resnet50", "resnext50_32x4d", "swin_t", "swin_v2_t"}
TOO_BIG = "over 30M parameters: a second or more to build at random on a CPU"
EXCLUDED = {name: TOO_BIG for name in (
    "alexnet", "convnext_small", "convnext_base", "convnext_large", "efficientnet_b6",
    "efficientnet_b7", "efficientnet_v2_m", "efficientnet_v2_l", "regnet_x_8gf",
    "regnet_x_16gf", "regnet_x_32gf", "regnet_y_8gf", "regnet_y_16gf", "regnet_y_32gf",
    "regnet_y_128gf", "resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d",
    "swin_s", "swin_b", "swin_v2_s", "swin_v2_b", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn",
    "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet50_2", "wide_resnet101_2")}
EXCLUDED["maxvit_t"] = "224x224 input only: seconds per forward pass on a CPU"
EXCLUDED.update({name: "ViT: over 85M parameters; tested built small (zoo_models.tiny_vit)"
                 for name in ZOO if name.startswith("vit_")})
NO_LINEAR_HEAD = {"squeezenet1_0", "squeezenet1_1"}  # a 1x1 convolution classifies
INPUT_SIZE = {"inception_v3": 80}  # its smallest input (75); else 32x32


def zoo_params():
    for name in ZOO:
        if name in EXCLUDED:
            yield pytest.param(name, marks=pytest.mark.skip(reason=EXCLUDED[name]),
                               id=f"{name}-excluded")
        elif name in SLOW:
            yield pytest.param(name, marks=pytest.mark.slow, id=name)
        elif name not in NO_LINEAR_HEAD:
            yield pytest.param(name, id=name)


@pytest.mark.parametrize("name", list(zoo_params()))
def test_adapter_keeps_the_logits_of_every_torchvision_classifier(name):
    """head(features(x)) and model(x) on [0, 1] images equal the network's logits on
    normalised images (1e-5), features are [N, d], no weight is copied, the mode is kept."""
    size = INPUT_SIZE.get(name, 32)
    torch.manual_seed(0)
    net = randomize_bn(torchvision.models.get_model(name, weights=None, num_classes=10))
    x = torch.rand(2, 3, size, size)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((x - mean) / std)  # [2, 10]
    weights = {p.data_ptr() for p in net.parameters()}
    model = models.adapt_classifier(net, MEAN, STD, example=x)
    with torch.no_grad():
        feats, logits = model.features(x), model(x)
    assert feats.shape == (2, model.head.in_features) and model.head.out_features == 10
    torch.testing.assert_close(model.head(feats), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert {p.data_ptr() for p in model.parameters()} == weights
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("name", sorted(NO_LINEAR_HEAD))
def test_a_classifier_without_a_linear_head_is_one_line(name):
    net = torchvision.models.get_model(name, weights=None, num_classes=10)
    one_line_error("SqueezeNet has no linear head", models.adapt_classifier, net,
                   example=torch.rand(2, 3, 32, 32))


def test_zoo_lists_are_torchvision_names():
    """A misspelt name in the lists would silently move an architecture to the fast loop."""
    assert (SLOW | set(EXCLUDED) | NO_LINEAR_HEAD | set(INPUT_SIZE)) <= set(ZOO)


# ----------------------------------------------------------------------------- the adapter


class Branchy(nn.Module):
    """Two linear layers after the head's input: `aux` runs last but is not the output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU())
        self.fc = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        z = self.body(x)
        logits = self.fc(self.drop(z))
        self.aux_out = self.aux(z)
        return logits


def test_head_is_the_linear_whose_output_is_the_output_and_modes_are_kept():
    torch.manual_seed(0)
    net = Branchy()
    net.body.train()
    net.drop.eval()  # mixed modes: each is given back
    modes = {name: m.training for name, m in net.named_modules()}
    x = torch.rand(4, 3, 2, 2)
    assert models.find_head(net, x) == "fc"
    assert {name: m.training for name, m in net.named_modules()} == modes
    with models.eval_mode(net), torch.no_grad():
        expected = net(x)
    model = models.adapt_classifier(net, example=x)
    assert model.training == net.training and net.fc.__class__ is nn.Identity
    assert {name: m.training for name, m in net.named_modules() if name != "fc"} == \
        {name: mode for name, mode in modes.items() if name != "fc"}
    with models.eval_mode(model), torch.no_grad():
        assert torch.equal(model(x), expected)  # no normalisation given: x as it is
        assert model.features(x).shape == (4, 6)


def test_adapter_errors_name_the_module():
    x = torch.rand(2, 3, 2, 2)
    one_line_error("Branchy has no module 'nope'", models.adapt_classifier, Branchy(),
                   head="nope")
    one_line_error("'body.0' is a Flatten, not nn.Linear", models.adapt_classifier, Branchy(),
                   head="body.0")
    one_line_error("needs an example batch", models.adapt_classifier, Branchy())
    one_line_error("both mean and std", models.adapt_classifier, Branchy(), mean=(0.5,),
                   example=x)
    shared = nn.Sequential(nn.Flatten(), nn.Linear(12, 12))
    twice = nn.Sequential(shared, shared[1])  # the last linear layer is called twice
    one_line_error("called more than once", models.find_head, twice, x)
    one_line_error("not logits [N, k]", models.find_head, nn.Conv2d(3, 4, 1), x)
    import zoo_models
    one_line_error("normalise twice", models.adapt_classifier, zoo_models.self_normalising(),
                   MEAN, STD, example=x)
    # a named head is used as it is, without an example
    model = models.adapt_classifier(Branchy(), head="aux")
    assert model.head.out_features == 2


def test_strip_prefixes_only_when_the_keys_do_not_fit():
    state = {"module.model.a": 1, "module.model.b": 2}
    assert strip_prefixes(state, {"a", "b"}) == ({"a": 1, "b": 2}, ["module.", "model."])
    # a network whose own first module is called `model` keeps its keys
    own = {"model.a": 1}
    assert strip_prefixes(own, {"model.a"}) == (own, [])
    assert strip_prefixes({"module.a": 1, "b": 2}, {"a", "b"})[1] == []


# ----------------------------------------------------------------------------- loading


# The state dicts of the loading and end-to-end tests: (network, key prefix). ResNet-18 with
# DataParallel's module. prefix, the tiny ViT of tests/zoo_models with model.; MobileNet-V3-S
# with 7 classes (a torchvision head is resized to the file's); 3 classes for the heavier
# ones, as the weights' Fisher costs k - 1 vjps per example.
ZOO_FILES = {"resnet18": (lambda: torchvision.models.resnet18(num_classes=3), "module."),
             "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=3), ""),
             "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=7),
                                    ""),
             "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=3), ""),
             "tiny_vit": ("tiny_vit", "model.")}


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    """name -> the path of ZOO_FILES[name]'s state dict, written when first asked for: random
    weights, BatchNorm statistics randomised, zero-initialised linear layers made random."""
    import zoo_models
    root = tmp_path_factory.mktemp("zoo")

    def file(name):
        path = root / f"{name}.pth"
        if not path.exists():
            build, prefix = ZOO_FILES[name]
            torch.manual_seed(0)
            net = randomize_bn(getattr(zoo_models, build)() if isinstance(build, str)
                               else build())
            for module in net.modules():
                if isinstance(module, nn.Linear) and not module.weight.any():
                    nn.init.normal_(module.weight, std=0.5)
            torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
        return path
    return file


def expand(argv, zoo_file):
    """argv with each "{zoo}/NAME.pth" replaced by the path of zoo_file(NAME)."""
    return [zoo_file(a[len("{zoo}/"):-len(".pth")]) if str(a).startswith("{zoo}/") else a
            for a in argv]


def test_a_torchvision_state_dict_loads_with_its_prefix_and_its_classes(zoo_file, capsys):
    model, ckpt = load_checkpoint(zoo_file("resnet18"), arch="torchvision:resnet18",
                                  dataset="synthetic")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the key prefix module. removed" in err
    assert (ckpt["arch"], ckpt["num_classes"], ckpt["image_size"], ckpt["dataset"],
            ckpt["head"], ckpt["mean"]) == ("torchvision:resnet18", 3, 32, "synthetic", "fc",
                                            [0.5, 0.5, 0.5])
    reference = torchvision.models.resnet18(num_classes=3).eval()
    state = torch.load(zoo_file("resnet18"), weights_only=True)
    reference.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference((x - 0.5) / 0.25), rtol=1e-5, atol=1e-5)
    assert not model.training
    # without a dataset: the normalisation and crop size the torchvision weights declare
    model, ckpt = load_checkpoint(zoo_file("mobilenet_v3_small"),
                                  arch="torchvision:mobilenet_v3_small")
    assert (ckpt["num_classes"], ckpt["dataset"], ckpt["head"], ckpt["image_size"]) == (
        7, "imagenet", "classifier.3", 224)
    assert ckpt["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert capsys.readouterr().err == ""  # no prefix: nothing to say
    _, ckpt = load_checkpoint(zoo_file("mobilenet_v3_small"),
                              arch="torchvision:mobilenet_v3_small", mean=[0.5], std=[0.2],
                              image_size=32)
    assert (ckpt["mean"], ckpt["std"], ckpt["image_size"]) == ([0.5], [0.2], 32)


def test_a_user_module_normalising_inside_is_used_as_it_is():
    import zoo_models
    model, ckpt = load_checkpoint(None, model="tests.zoo_models:self_normalising",
                                  dataset="synthetic")
    assert (ckpt["mean"], ckpt["head"], ckpt["format"]) == (None, "fc", "module")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), zoo_models.self_normalising().eval()(x))


# ----------------------------------------------------------------------------- the scripts

FAMILIES = {  # name: (options that load it, its feature dimension)
    "resnet18": (["--arch", "torchvision:resnet18", "--ckpt", "{zoo}/resnet18.pth"], 512),
    "efficientnet_b0": (["--arch", "torchvision:efficientnet_b0",
                         "--ckpt", "{zoo}/efficientnet_b0.pth"], 1280),
    "mobilenet_v3_small": (["--arch", "torchvision:mobilenet_v3_small",
                            "--ckpt", "{zoo}/mobilenet_v3_small.pth"], 1024),
    "convnext_tiny": (["--arch", "torchvision:convnext_tiny", "--ckpt",
                       "{zoo}/convnext_tiny.pth"], 768),
    "tiny_vit": (["--model", "tests.zoo_models:tiny_vit", "--ckpt", "{zoo}/tiny_vit.pth"], 32),
}
FAST_FAMILIES = {"mobilenet_v3_small", "tiny_vit"}


def family_params():
    for name in FAMILIES:
        yield pytest.param(name, marks=() if name in FAST_FAMILIES else pytest.mark.slow)


@pytest.mark.parametrize("family", list(family_params()))
def test_scripts_run_end_to_end(family, zoo_file, tmp_path):
    """fisher.py, transfer.py and invert.py (their __main__ blocks, in this process) on
    synthetic 32x32 images, the classifier trained on them (--trained-on synthetic)."""
    options, dim = FAMILIES[family]
    common = expand(options, zoo_file) + [
        "--trained-on", "synthetic", "--out", tmp_path, "--device", "cpu", "--no-download"]
    proc = run_main("fisher.py", *common, "--n", 2, "--chunk", 2, "--power-iters", 3,
                    "--probes", 2, "--label-samples", 2)
    assert proc.returncode == 0, proc.stderr
    fisher = json.loads((tmp_path / "fisher.json").read_text())
    assert fisher["arch"] == options[1] if options[0] == "--arch" else \
        fisher["arch"] == "model:tests.zoo_models:tiny_vit"
    for key in ("weights_trace", "input_trace", "input_lambda_max", "repr_trace",
                "repr_lambda_max"):
        assert fisher[key] > 0, (key, fisher[key])
    proc = run_main("transfer.py", *common, "--target", "synthetic:0-4", "--train-size", 40,
                    "--test-size", 20)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((tmp_path / "transfer.json").read_text())["synthetic:0-4"]
    assert entry["feature_dim"] == dim and 0 <= entry["acc"] <= 1
    proc = run_main("invert.py", *common, "--n-images", 2, "--steps", 2,
                    "--method", "baseline")
    assert proc.returncode == 0, proc.stderr
    inverted = json.loads((tmp_path / "invert.json").read_text())["baseline"]
    assert inverted["n_images"] == 2 and 0 < inverted["feature_rel_err"] < 10


def test_a_user_module_with_its_own_weights_needs_no_checkpoint(tmp_path):
    proc = run_main("fisher.py", "--model", "tests.zoo_models:self_normalising",
                    "--trained-on", "synthetic", "--out", tmp_path, "--n", 4, "--chunk", 4,
                    "--power-iters", 3, "--probes", 2, "--device", "cpu", "--no-download")
    assert proc.returncode == 0, proc.stderr
    fisher = json.loads((tmp_path / "fisher.json").read_text())
    assert fisher["arch"] == "model:tests.zoo_models:self_normalising"
    assert fisher["weights_trace"] > 0


@pytest.mark.parametrize("script,argv,expect", [
    ("fisher.py", ["--model", "tests.zoo_models:conv_head"], ["has no linear head"]),
    ("transfer.py", ["--model", "tests.zoo_models"], ["package.module:function"]),
    ("invert.py", ["--model", "tests.zoo_models:absent"], ["has no function absent"]),
    ("fisher.py", ["--model", "no_such_module_here:build"], ["cannot import no_such_module"]),
    ("fisher.py", ["--model", "tests.zoo_models:not_a_module"], ["returned a str"]),
    ("transfer.py", ["--arch", "torchvision:resnet18", "--ckpt", "{zoo}/tiny_vit.pth"],
     ["weights do not fit torchvision:resnet18"]),
    ("invert.py", ["--arch", "torchvision:resnet18", "--ckpt", "{zoo}/resnet18.pth",
                   "--mean", "0.5", "--std"], ["--std"]),
    ("fisher.py", ["--model", "tests.zoo_models:self_normalising", "--mean", "0.5",
                   "--std", "0.2"], ["normalise twice"]),
    ("fisher.py", ["--arch", "torchvision:resnet_nine"], ["unknown torchvision classifier"]),
    ("fisher.py", ["--arch", "resnet18", "--model", "tests.zoo_models:tiny_vit"], ["not both"]),
    ("fisher.py", [], ["--ckpt is needed"]),
    ("fisher.py", ["--ckpt", "{zoo}/resnet18.pth", "--head", "fc"], ["--head apply to"]),
    ("transfer.py", ["--model", "tests.zoo_models:tiny_vit", "--image-size", "16"],
     ["cannot run on images [3, 16, 16]"]),
], ids=["no-linear-head", "bad-model-string", "missing-function", "missing-module",
        "not-a-module", "state-dict-does-not-fit", "std-without-value", "normalised-twice",
        "unknown-torchvision-name", "arch-and-model", "no-ckpt", "head-for-a-resnet-file",
        "image-size-the-model-cannot-take"])
def test_a_bad_model_is_one_line_and_exit_2(script, argv, expect, zoo_file, tmp_path):
    argv = expand(argv, zoo_file)
    target = ["--target", "synthetic"] if script == "transfer.py" else []
    proc = run_main(script, *argv, *target, "--trained-on", "synthetic", "--out", tmp_path,
                    "--device", "cpu", "--no-download")
    assert proc.returncode == 2, proc
    assert_user_error(proc, *expect)


# ----------------------------------------------------------------------------- copyable functions


def test_copyable_functions_run_on_adapted_models():
    """The attacks, Fisher estimators, probes and inversion on an adapted tiny ViT, as a user
    would call them; the model's mode is left alone."""
    import advtrain
    import fisher
    import invert
    import transfer
    import zoo_models
    torch.manual_seed(0)
    net = zoo_models.tiny_vit()
    nn.init.normal_(net.heads.head.weight, std=0.5)
    x = torch.rand(6, 3, 32, 32)
    model = models.adapt_classifier(net.eval(), MEAN, STD, example=x)
    y = model(x).argmax(1).detach()
    x_adv = advtrain.pgd_attack(model, x, y, "l2", 0.5, 2)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert advtrain.accuracy(model, x, y) == 1.0
    trace, per_layer = fisher.fisher_trace_weights(model, x, chunk=3)
    assert trace.shape == (6,) and bool((trace > 0).all()) and "head" in per_layer
    assert bool((fisher.input_fisher_trace(model, x) > 0).all())
    assert bool((fisher.input_fisher_lambda_max(model, x, iters=3)[0] > 0).all())
    assert bool((fisher.repr_jacobian_frobenius(model, x, probes=2) > 0).all())
    feats = transfer.extract_features(model, (x, y), 3, 32)
    assert feats.shape == (6, 32)
    tuned = transfer.finetune(model, x, y % 2, (x, y % 2), 3, 32, epochs=1, batch_size=3)
    assert 0 <= tuned["acc"] <= 1 and model.head.out_features == 10
    with torch.no_grad():
        z0 = model.features(x[:2])
    recon = invert.invert_features(model, z0, torch.full_like(x[:2], 0.5), steps=2)
    assert recon.shape == (2, 3, 32, 32) and 0 <= recon.min() and recon.max() <= 1
    assert not model.training


@pytest.mark.parametrize("options", [
    ["--model", "tests.zoo_models:tiny_vit", "--ckpt", "{zoo}/tiny_vit.pth"],
    ["--arch", "torchvision:mobilenet_v3_small", "--ckpt", "{zoo}/mobilenet_v3_small.pth"],
], ids=["model", "torchvision"])
def test_advtrain_eval_only_takes_any_classifier(options, zoo_file, tmp_path):
    options = expand(options, zoo_file)
    proc = run_main("advtrain.py", "--eval-only", *options, "--dataset", "synthetic",
                    "--test-size", 8, "--eval-eps", "l2:0.5", "--eval-steps", 1,
                    "--out", tmp_path, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    arch = options[1] if options[0] == "--arch" else "model:" + options[1]
    assert (metrics["arch"], metrics["dataset"], metrics["test_size"]) == (arch, "synthetic", 8)
    assert 0 <= metrics["robust_acc"][0]["acc"] <= metrics["clean_acc"] <= 1
    # the classifier's options are settings only when given
    settings = metrics["provenance"]["settings"]
    assert settings.get("model", "absent") == (options[1] if options[0] == "--model" else
                                               "absent")


@pytest.mark.parametrize("argv,expect", [
    (["--model", "tests.zoo_models:tiny_vit"], "--model applies to --eval-only only"),
    (["--arch", "torchvision:resnet18"], "--arch torchvision:resnet18 applies to --eval-only"),
    (["--eval-only", "--model", "tests.zoo_models:conv_head", "--dataset", "synthetic"],
     "has no linear head"),
], ids=["model-for-training", "torchvision-for-training", "no-linear-head"])
def test_advtrain_bad_classifier_options_are_one_line(argv, expect, tmp_path):
    proc = run_main("advtrain.py", *argv, "--out", tmp_path, "--device", "cpu")
    assert proc.returncode == 2, proc
    assert_user_error(proc, expect)


def test_the_classifier_options_are_settings_only_when_given():
    """The provenance (and its hash) of runs on our own checkpoints stays as it was."""
    import common
    import fisher
    settings = common.provenance(vars(fisher.get_args(["--ckpt", "m.pt"])))["settings"]
    assert not set(common.CLASSIFIER_OPTIONS) & set(settings)
    args = fisher.get_args(["--model", "a:b", "--mean", "0.5", "--std", "0.2"])
    settings = common.provenance(vars(args))["settings"]
    assert (settings["model"], settings["mean"], "head" in settings) == ("a:b", [0.5], False)
