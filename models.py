"""Models and checkpoints: the small `cnn` and the CIFAR `resnet18`, each with the interface
every script relies on (`features(x)` -> [N, d] penultimate representation, `head` the last
linear layer, inputs in [0, 1] normalised inside), the optimizer of training and
fine-tuning, `eval_mode`, and the one checkpoint loader, which also reads published ResNets
(torchvision state dicts, robustness-library checkpoints; published.py) into the same
interface.
"""
import contextlib
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

ARCHS = ("cnn", "resnet18")


def get_device(name="auto"):
    """'auto' -> cuda if available, else cpu; a CUDA device asked for without CUDA is a
    UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")


class Normalize(nn.Module):
    """(x - mean) / std as the model's first layer, so everything outside works in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Net(nn.Module):
    """normalise -> body -> features [N, d] -> head (linear) -> logits [N, k]."""

    def __init__(self, body, feature_dim, num_classes, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        return self.body(self.normalize(x))

    def forward(self, x):
        return self.head(self.features(x))


def conv_bn(cin, cout, stride=1, kernel=3):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def cnn_body(in_channels, image_size):
    """Small CNN, ~2 MFLOPs per 28x28 image. Downsampling by strided convs and no global
    pooling: the representation is the flattened 16 x 7 x 7 map (784-d for 28x28), which
    keeps where things are, so it can be inverted (a global average pool throws that away)."""
    body = nn.Sequential(conv_bn(in_channels, 16), conv_bn(16, 32, stride=2),
                         conv_bn(32, 64, stride=2), conv_bn(64, 16, kernel=1), nn.Flatten())
    return body, 16 * ((image_size + 3) // 4) ** 2


def shortcut(cin, cout, stride):
    """The residual path: identity, or a strided 1x1 conv + BN when the shape changes
    ([N, cin, H, W] -> [N, cout, H / stride, W / stride]); keys `0.*`, `1.*`."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(cout))
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def resnet18_body(in_channels, width=64):
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, global average pool -> 8 * width
    (512-d for the standard width 64; a small width makes CPU smoke tests fast)."""
    layers, cin = [conv_bn(in_channels, width)], width
    for cout, stride in [(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8 * width


def build_model(arch, num_classes, in_channels, image_size, mean, std, width=64):
    """A Net of arch `cnn` or `resnet18` for images [N, in_channels, image_size, image_size]
    in [0, 1]; mean and std (per channel) normalise inside. The keyword arguments are what a
    checkpoint stores as `model_args`. An unknown arch is a ValueError."""
    if arch == "cnn":
        body, dim = cnn_body(in_channels, image_size)
    elif arch == "resnet18":
        body, dim = resnet18_body(in_channels, width)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return Net(body, dim, num_classes, mean, std)


# ----------------------------------------------------------------------------- training

@contextlib.contextmanager
def eval_mode(model):
    """Run the block with model in eval mode (BatchNorm uses its running statistics and never
    updates them), then give every submodule back the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with Nesterov momentum; weight decay on weights (tensors of 2 or more dimensions),
    not on BatchNorm parameters and biases."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=True)


# ----------------------------------------------------------------------------- checkpoints

# What every checkpoint of advtrain.py holds; model_args rebuilds the network:
# build_model(**ckpt["model_args"]).
CHECKPOINT_KEYS = ("model", "model_args", "arch", "num_classes", "in_channels", "image_size",
                   "dataset", "classes", "norm", "eps")


class PickledObjects(UserError):
    """A torch file that holds Python objects besides tensors: loading it means unpickling."""


def first_line(e):
    """The first line of an exception's message (its type when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_torch_file(path, unsafe=False):
    """The object in a torch file. Loaded with weights_only=True (tensors and plain types only:
    no pickled code runs); a file that needs other objects unpickled (robustness saves with
    dill, optimizer or schedule objects) is a PickledObjects error, unless `unsafe`: then it
    is unpickled (weights_only=False) with a warning line on stderr. A truncated or corrupt
    file is one line either way."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    unreadable = f"cannot read checkpoint {path} (truncated or not a torch file)"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not refused:
            raise UserError(f"{unreadable}: {first_line(e)}")
    if not unsafe:
        raise PickledObjects(f"{path} holds pickled Python objects ({refused.group(1)}), and "
                             f"unpickling can execute arbitrary code: pass --unsafe-load only "
                             f"for files from a source you trust")
    print(f"warning: --unsafe-load: unpickling {path}, which can execute arbitrary code",
          file=sys.stderr, flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise UserError(f"unpickling {path} needs the Python module {e.name} "
                        f"(pip install {e.name})")
    except Exception as e:
        raise UserError(f"{unreadable}: {first_line(e)}")


def load_state(module, state, what):
    """module.load_state_dict(state), exact; a mismatch is one UserError line that starts with
    `what` and names the first offending key."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise UserError(f"{what}: {(details or [first_line(e)])[0][:300]}")
    problems = [f"{len(keys)} {kind} keys (first: {keys[0]})"
                for kind, keys in (("missing", result.missing_keys),
                                   ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise UserError(f"{what}: {', '.join(problems)}")


def read_checkpoint(path):
    """The checkpoint dict of advtrain.py at path, loaded with weights_only=True (no pickled
    code is ever executed)."""
    try:
        ckpt = read_torch_file(path)
    except PickledObjects:
        raise UserError(f"{path} is not a checkpoint written by advtrain.py") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint written by advtrain.py")
    return ckpt


def _load_own(path, ckpt, arch=None):
    """The Net of a checkpoint of advtrain.py (rebuilt by build_model(**ckpt["model_args"]))."""
    if arch not in (None, ckpt["arch"]):
        raise UserError(f"{path} is a {ckpt['arch']} checkpoint of advtrain.py; "
                        f"arch {arch!r} applies to published checkpoints only")
    model = build_model(**ckpt["model_args"])
    load_state(model, ckpt["model"], f"{path}: weights do not fit arch {ckpt['arch']}")
    return model


def load_checkpoint(path, device="cpu", arch=None, dataset=None, unsafe=False):
    """(model in eval mode on device, checkpoint dict). The one loader every script uses.

    Reads checkpoints of advtrain.py (`arch` None or theirs; `dataset` is ignored: they
    record their own) and published ResNets (published.load_published): torchvision state
    dicts and robustness-library checkpoints. For those, `arch` (a published.FOREIGN_ARCHS
    name) overrides the architecture detected from the weights; `dataset` is the training set
    (default imagenet, or cifar10 for cifar_*), whose mean/std normalise when the file carries
    no normalizer; the model takes [0, 1] images like ours, and the returned dict has the keys
    the scripts read (arch, num_classes, in_channels, image_size, dataset, classes; norm and
    eps None, model_args None) plus format ("robustness" or "torchvision"). unsafe: unpickle
    files that need it (--unsafe-load); without it they are a UserError.
    """
    obj = read_torch_file(path, unsafe)
    if isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS):
        model, ckpt = _load_own(path, obj, arch), obj
    else:
        from published import load_published  # published.py builds on this module
        model, ckpt = load_published(path, obj, arch, dataset)
    return model.to(device).eval(), ckpt
