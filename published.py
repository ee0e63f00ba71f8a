"""Published ResNet architectures, built as their sources build them so that their state dicts
load unchanged: torchvision's ImageNet ResNets and the robustness library's CIFAR ResNets (e.g.
the robust models of Salman et al. 2020), and detect_arch, which names the architecture of a
state dict from the keys and shapes of its weights. checkpoints.py reads published files into
our interface (models.Net) with these.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import shortcut


class Layout(NamedTuple):
    """What the keys and shapes of a ResNet state dict say about the network."""
    stem: int  # kernel size of conv1: 7 (torchvision, ImageNet) or 3 (robustness, CIFAR)
    bottleneck: bool  # blocks with conv3 (Bottleneck) or without (BasicBlock)
    blocks: Tuple[int, ...]  # number of blocks in layer1..layer4
    wide: float  # output channels of layer1.0.conv1 / of conv1 (2 for wide_resnet50_2)


# The published ResNets checkpoints.load_checkpoint reads, by name: torchvision's ImageNet
# ResNets (also the layout of the robustness library's ImageNet models) and the robustness
# library's CIFAR ResNets (cifar_*).
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
        first = (1, 1, 0) if bottleneck else (3, stride, 1)  # kernel, stride, padding
        second = (3, stride, 1) if bottleneck else (3, 1, 1)
        self.conv1 = nn.Conv2d(cin, planes, *first, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, *second, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if bottleneck:
            self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * planes)
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
    return resnet.ResNet(block, list(layout.blocks), num_classes=num_classes,
                         width_per_group=64 * layout.wide)


def head_name(arch):
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
    FOREIGN_ARCHS is a ValueError that says what was found."""
    layout = _layout(state)
    if layout is None:
        keys = ", ".join(list(state)[:4]) or "none"
        raise ValueError(f"not a ResNet state dict: no 4-d conv1.weight among its "
                         f"{len(state)} tensors (first keys: {keys})")
    head = "fc" if "fc.weight" in state else "linear" if "linear.weight" in state else None
    for name, known in FOREIGN_ARCHS.items():
        if known == layout and head == head_name(name):
            return name
    kind = "Bottleneck" if layout.bottleneck else "BasicBlock"
    raise ValueError(f"unknown ResNet layout: {layout.stem}x{layout.stem} stem, {kind} blocks "
                     f"{list(layout.blocks)} per stage, layer1 width x{layout.wide}, head "
                     f"{head or 'none'}; known: {', '.join(FOREIGN_ARCHS)} (name one with "
                     f"--arch)")
