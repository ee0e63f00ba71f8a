"""Models and checkpoints: the small `cnn` and the CIFAR `resnet18`, each with the interface
every script relies on (`features(x)` -> [N, d] penultimate representation, `head` the last
linear layer, inputs in [0, 1] normalised inside), and the one checkpoint loader.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

ARCHS = ("cnn", "resnet18")


def get_device(name="auto"):
    """'auto' -> cuda if available, else cpu; a CUDA device asked for without CUDA is a UserError."""
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


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

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
    checkpoint stores as `model_args`."""
    if arch == "cnn":
        body, dim = cnn_body(in_channels, image_size)
    elif arch == "resnet18":
        body, dim = resnet18_body(in_channels, width)
    else:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return Net(body, dim, num_classes, mean, std)




# ----------------------------------------------------------------------------- checkpoints

# What every checkpoint of advtrain.py holds; model_args rebuilds the network:
# build_model(**ckpt["model_args"]).
CHECKPOINT_KEYS = ("model", "model_args", "arch", "num_classes", "in_channels", "image_size",
                   "dataset", "classes", "norm", "eps")


def read_checkpoint(path):
    """The checkpoint dict of advtrain.py at path, loaded with weights_only=True (no pickled
    code is ever executed)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} (truncated or not a torch file): "
                        f"{str(e).splitlines()[0][:200]}")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint written by advtrain.py")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict). The one loader every script uses."""
    ckpt = read_checkpoint(path)
    model = build_model(**ckpt["model_args"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit arch {ckpt['arch']}: {str(e).splitlines()[0]}")
    return model.to(device).eval(), ckpt
