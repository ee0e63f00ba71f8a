"""Models and checkpoints: the small `cnn` and the CIFAR `resnet18`, each with the interface
every script relies on (`features(x)` -> [N, d] penultimate representation, `head` the last
linear layer, inputs in [0, 1] normalised inside), and the one checkpoint loader, which also
reads published ResNets (torchvision state dicts, robustness-library checkpoints) into the
same interface.
"""
import re
import sys
from pathlib import Path
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from data import get_dataset

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
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
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
    checkpoint stores as `model_args`."""
    if arch == "cnn":
        body, dim = cnn_body(in_channels, image_size)
    elif arch == "resnet18":
        body, dim = resnet18_body(in_channels, width)
    else:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return Net(body, dim, num_classes, mean, std)


# ----------------------------------------------------------------------------- published ResNets

class Layout(NamedTuple):
    """What the keys and shapes of a ResNet state dict say about the network."""
    stem: int  # kernel size of conv1: 7 (torchvision, ImageNet) or 3 (robustness, CIFAR)
    bottleneck: bool  # blocks with conv3 (Bottleneck) or without (BasicBlock)
    blocks: Tuple[int, ...]  # number of blocks in layer1..layer4
    wide: float  # output channels of layer1.0.conv1 / of conv1 (2 for wide_resnet50_2)


# The published ResNets load_checkpoint reads, by name: torchvision's ImageNet ResNets (also
# the layout of the robustness library's ImageNet models) and the robustness library's CIFAR
# ResNets (cifar_*).
FOREIGN_ARCHS = {
    "resnet18": Layout(7, False, (2, 2, 2, 2), 1),
    "resnet34": Layout(7, False, (3, 4, 6, 3), 1),
    "resnet50": Layout(7, True, (3, 4, 6, 3), 1),
    "resnet101": Layout(7, True, (3, 4, 23, 3), 1),
    "resnet152": Layout(7, True, (3, 8, 36, 3), 1),
    "wide_resnet50_2": Layout(7, True, (3, 4, 6, 3), 2),
    "wide_resnet50_4": Layout(7, True, (3, 4, 6, 3), 4),
    "wide_resnet101_2": Layout(7, True, (3, 4, 23, 3), 2),
    "cifar_resnet18": Layout(3, False, (2, 2, 2, 2), 1),
    "cifar_resnet34": Layout(3, False, (3, 4, 6, 3), 1),
    "cifar_resnet50": Layout(3, True, (3, 4, 6, 3), 1),
    "cifar_resnet101": Layout(3, True, (3, 4, 23, 3), 1),
}


class CifarBlock(nn.Module):
    """A residual block of the robustness library's CIFAR ResNets under its parameter names
    (conv1, bn1, conv2, bn2[, conv3, bn3], shortcut.0/1), which our BasicBlock does not use:
    BasicBlock (3x3, 3x3) or, with `bottleneck`, Bottleneck (1x1, strided 3x3, 1x1 to
    4 x planes). [N, cin, H, W] -> [N, out_channels, H / stride, W / stride]."""

    def __init__(self, cin, planes, stride, bottleneck):
        super().__init__()
        self.bottleneck = bottleneck
        self.out_channels = 4 * planes if bottleneck else planes
        if bottleneck:
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        else:
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.shortcut = shortcut(cin, self.out_channels, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.bottleneck:
            out = self.bn3(self.conv3(F.relu(out)))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The robustness library's CIFAR ResNet under its parameter names (conv1, bn1, layer1-4,
    linear), so its state dicts load as they are: 3x3 stem of `width` channels, no max-pool,
    stages of 1, 2, 4, 8 x width planes (strides 1, 2, 2, 2), global average pool (the
    original's avg_pool2d(4) on 32x32 inputs), linear. [N, 3, H, W] -> logits [N, k]."""

    def __init__(self, blocks, num_classes, width=64, bottleneck=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            layer = []
            for j in range(count):
                layer.append(CifarBlock(cin, width * 2 ** i, stride if j == 0 else 1, bottleneck))
                cin = layer[-1].out_channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def build_foreign(arch, num_classes, width=64):
    """A FOREIGN_ARCHS network with random weights, built as its source builds it, so its
    state dicts load unchanged: torchvision's ResNet for ImageNet layouts (what
    torchvision.models.resnet50 etc. return with weights=None: nothing is downloaded; width is
    fixed at 64 there), CifarResNet for cifar_*. Normalised [N, 3, H, W] -> logits [N, k]."""
    layout = FOREIGN_ARCHS[arch]
    if layout.stem == 3:
        return CifarResNet(layout.blocks, num_classes, width, layout.bottleneck)
    from torchvision.models import resnet
    block = resnet.Bottleneck if layout.bottleneck else resnet.BasicBlock
    return resnet.ResNet(block, list(layout.blocks), num_classes=num_classes, width_per_group=64 * layout.wide)


def _head_name(arch):
    """The last linear layer's name: `linear` in the robustness CIFAR layout, else `fc`."""
    return "linear" if FOREIGN_ARCHS[arch].stem == 3 else "fc"


def _count_blocks(state, stage):
    """Blocks in layer{stage} of a ResNet state dict: consecutive layer{stage}.{j}.conv1."""
    count = 0
    while f"layer{stage}.{count}.conv1.weight" in state:
        count += 1
    return count


def _layout(state):
    """The Layout of a ResNet state dict (prefixes removed); None without a 4-d conv1.weight."""
    conv1, inner = state.get("conv1.weight"), state.get("layer1.0.conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        return None
    wide = 0 if inner is None else inner.shape[0] / conv1.shape[0]
    wide = int(wide) if wide == int(wide) else round(wide, 3)
    blocks = tuple(_count_blocks(state, stage) for stage in range(1, 5))
    return Layout(conv1.shape[-1], "layer1.0.conv3.weight" in state, blocks, wide)


def detect_arch(state):
    """The FOREIGN_ARCHS name of a ResNet state dict (prefixes removed), from keys and shapes:
    conv1's kernel (7: ImageNet, 3: CIFAR), blocks per stage, BasicBlock or Bottleneck, the
    width of layer1 against conv1's, and the head (`fc` or `linear`). A layout not in
    FOREIGN_ARCHS is a UserError that says what was found."""
    layout = _layout(state)
    if layout is None:
        keys = ", ".join(list(state)[:4]) or "none"
        raise UserError(f"not a ResNet state dict: no 4-d conv1.weight among its {len(state)} tensors "
                        f"(first keys: {keys})")
    head = "fc" if "fc.weight" in state else "linear" if "linear.weight" in state else None
    for name, known in FOREIGN_ARCHS.items():
        if known == layout and head == _head_name(name):
            return name
    kind = "Bottleneck" if layout.bottleneck else "BasicBlock"
    raise UserError(f"unknown ResNet layout: {layout.stem}x{layout.stem} stem, {kind} blocks "
                    f"{list(layout.blocks)} per stage, layer1 width x{layout.wide}, head {head or 'none'}; "
                    f"known: {', '.join(FOREIGN_ARCHS)} (name one with --arch)")


def _network_state(obj):
    """(state dict of the network with prefixes removed, the file's normalizer as (mean, std)
    lists or None, format) of a foreign checkpoint dict. robustness: {"model" or
    "state_dict": {"module.model.*", "module.attacker.model.*" (the same network again),
    "module.normalizer.new_mean" / "new_std" [3, 1, 1]}, "epoch", ...}; torchvision: a plain
    state dict, possibly under "model" or "state_dict". Non-tensor entries are dropped."""
    inner = [obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)]
    tensors = {k: v for k, v in (inner[0] if inner else obj).items() if torch.is_tensor(v)}
    prefix = "module.model."
    if not any(k.startswith(prefix) for k in tensors):
        return tensors, None, "torchvision"
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    mean, std = tensors.get("module.normalizer.new_mean"), tensors.get("module.normalizer.new_std")
    normalizer = None if mean is None or std is None else (mean.flatten().tolist(), std.flatten().tolist())
    return state, normalizer, "robustness"


def _load_state(module, state, what):
    """module.load_state_dict(state), exact; a mismatch is one UserError line that starts with
    `what` and names the first offending key."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise UserError(f"{what}: {(details or [_first_line(e)])[0][:300]}")
    problems = [f"{len(keys)} {kind} keys (first: {keys[0]})"
                for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise UserError(f"{what}: {', '.join(problems)}")


def _wrap(net, head_name, mean, std):
    """A Net around a foreign network: its last linear layer becomes `head`, what that layer
    saw ([N, d], after the global pool) becomes `features`, and normalisation moves inside,
    so model(x) on [0, 1] images equals net((x - mean) / std)."""
    head = getattr(net, head_name)
    setattr(net, head_name, nn.Identity())
    model = Net(net, head.in_features, head.out_features, mean, std)
    model.head = head
    return model


def _load_foreign(path, obj, arch=None, dataset=None):
    """(Net around the network of a published checkpoint, its checkpoint dict); see
    load_checkpoint."""
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state dict")
    state, normalizer, fmt = _network_state(obj)
    if arch is None:
        try:
            arch = detect_arch(state)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    elif arch not in FOREIGN_ARCHS:
        raise UserError(f"unknown arch {arch!r} for a published checkpoint; choose from {', '.join(FOREIGN_ARCHS)}")
    head, cifar = _head_name(arch), FOREIGN_ARCHS[arch].stem == 3
    if "conv1.weight" not in state or f"{head}.weight" not in state:
        raise UserError(f"{path}: weights do not fit arch {arch}: no conv1.weight or {head}.weight")
    num_classes = state[f"{head}.weight"].shape[0]
    net = build_foreign(arch, num_classes, width=state["conv1.weight"].shape[0])
    _load_state(net, state, f"{path}: weights do not fit arch {arch}")
    dataset = dataset or ("cifar10" if cifar else "imagenet")
    ds = get_dataset(dataset)
    if ds.channels != 3:
        raise UserError(f"dataset {dataset} has {ds.channels} channel(s), but a ResNet checkpoint takes 3")
    mean, std = normalizer or (ds.mean, ds.std)
    ckpt = {"arch": arch, "num_classes": num_classes, "in_channels": 3, "image_size": 32 if cifar else 224,
            "dataset": dataset, "classes": list(range(num_classes)), "norm": None, "eps": None,
            "format": fmt, "model_args": None}
    return _wrap(net, head, mean, std), ckpt


# ----------------------------------------------------------------------------- checkpoints

# What every checkpoint of advtrain.py holds; model_args rebuilds the network:
# build_model(**ckpt["model_args"]).
CHECKPOINT_KEYS = ("model", "model_args", "arch", "num_classes", "in_channels", "image_size",
                   "dataset", "classes", "norm", "eps")


class PickledObjects(UserError):
    """A torch file that holds Python objects besides tensors: loading it means unpickling."""


def _first_line(e):
    """The first line of an exception's message (its type when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _read_torch_file(path, unsafe=False):
    """The object in a torch file. Loaded with weights_only=True (tensors and plain types only:
    no pickled code runs); a file that needs other objects unpickled (robustness saves with
    dill, optimizer or schedule objects) is a PickledObjects error, unless `unsafe`: then it
    is unpickled (weights_only=False) with a warning line on stderr. A truncated or corrupt
    file is one line either way."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not refused:
            raise UserError(f"cannot read checkpoint {path} (truncated or not a torch file): {_first_line(e)}")
    if not unsafe:
        raise PickledObjects(f"{path} holds pickled Python objects ({refused.group(1)}), and unpickling can execute "
                             f"arbitrary code: pass --unsafe-load only for files from a source you trust")
    print(f"warning: --unsafe-load: unpickling {path}, which can execute arbitrary code", file=sys.stderr, flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise UserError(f"unpickling {path} needs the Python module {e.name} (pip install {e.name})")
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} (truncated or not a torch file): {_first_line(e)}")


def read_checkpoint(path):
    """The checkpoint dict of advtrain.py at path, loaded with weights_only=True (no pickled
    code is ever executed)."""
    try:
        ckpt = _read_torch_file(path)
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
    _load_state(model, ckpt["model"], f"{path}: weights do not fit arch {ckpt['arch']}")
    return model


def load_checkpoint(path, device="cpu", arch=None, dataset=None, unsafe=False):
    """(model in eval mode on device, checkpoint dict). The one loader every script uses.

    Reads checkpoints of advtrain.py (`arch` None or theirs; `dataset` is ignored: they
    record their own) and published ResNets: torchvision state dicts and robustness-library
    checkpoints (see _network_state). For those, `arch` (a FOREIGN_ARCHS name) overrides
    detect_arch; `dataset` is the training set (default imagenet, or cifar10 for cifar_*),
    whose mean/std normalise when the file carries no normalizer; the model takes [0, 1]
    images like ours, and the returned dict has the keys the scripts read (arch, num_classes,
    in_channels, image_size, dataset, classes; norm and eps None, model_args None) plus
    format ("robustness" or "torchvision"). unsafe: unpickle files that need it
    (--unsafe-load); without it they are a UserError.
    """
    obj = _read_torch_file(path, unsafe)
    if isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS):
        model, ckpt = _load_own(path, obj, arch), obj
    else:
        model, ckpt = _load_foreign(path, obj, arch, dataset)
    return model.to(device).eval(), ckpt
