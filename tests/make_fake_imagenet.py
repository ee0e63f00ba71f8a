"""A tiny offline stand-in for the imagenet preset (`bash run_all.sh imagenet --smoke`): an
ImageFolder val/ of 10 classes x 4 small PNGs, and two published-style checkpoints of a
10-class torchvision ResNet-18 with random weights, listed in manifest.csv.

    python tests/make_fake_imagenet.py --out results/imagenet-smoke/fake
    # -> fake/data/val/n0000000{0..9}/*.png, fake/ckpt/*.pt(h), fake/ckpt/manifest.csv

One checkpoint is in the robustness library's layout (the network twice, with its
normalizer), one is a plain torchvision state dict (normalised with ImageNet's mean and std),
so both readers of checkpoints.load_checkpoint run. Only tensors: they load with
torch.load(weights_only=True), no --unsafe-load. ResNet-18 is the smallest torchvision layout
(its BasicBlock has a fixed width), and data.py crops every image to 224 px, so each file is
~47 MB (the robustness file's two copies share storage). manifest.csv is written last: its
presence means the fixture is complete.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import atomic_save  # noqa: E402

NUM_CLASSES, PER_CLASS, SIZE = 10, 4, (48, 40)  # width x height of the PNGs; data.py resizes to 224
# file, norm, eps, seed ("" = the manifest's default 0); the eps 0 model is a plain state dict
CHECKPOINTS = [("resnet18_l2_eps0.pth", "l2", "0", "0"),
               ("resnet18_linf_eps4.ckpt", "linf", "4/255", "")]
ROBUSTNESS_MEAN, ROBUSTNESS_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def randomize_bn(net, seed=0):
    """Random BatchNorm statistics and affine parameters: at init they are the identity, which
    would hide a BN loaded into the wrong place (tests/test_foreign.py uses it too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return net.eval()


def robustness_file(state, mean, std, **extra):
    """A checkpoint in the robustness library's layout: the network twice (model and the
    attacker's copy, the same tensors) under a DataParallel prefix, plus the normalizer
    [3, 1, 1]."""
    model = {f"module.{part}.{k}": v
             for part in ("model", "attacker.model") for k, v in state.items()}
    model["module.normalizer.new_mean"] = torch.tensor(mean).view(3, 1, 1)
    model["module.normalizer.new_std"] = torch.tensor(std).view(3, 1, 1)
    return {"model": model, "epoch": 3, **extra}


def write_folder(root, num_classes=NUM_CLASSES, per_class=PER_CLASS, seed=0):
    """root/val/<class>/<i>.png: noise around a block in the class's colour (RGB, SIZE px)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = SIZE
    for c in range(num_classes):
        folder = Path(root) / "val" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = colour
            Image.fromarray(pixels).save(folder / f"{i}.png")


def resnet18_state(seed, num_classes=NUM_CLASSES):
    """The state dict of a torchvision ResNet-18 with random weights and BatchNorm."""
    import torchvision
    torch.manual_seed(seed)
    net = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=num_classes), seed)
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}


def main(out):
    out = Path(out)
    write_folder(out / "data")
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    for i, (name, norm, eps, seed) in enumerate(CHECKPOINTS):
        state = resnet18_state(seed=i)
        if not name.endswith(".pth"):
            state = robustness_file(state, ROBUSTNESS_MEAN, ROBUSTNESS_STD)
        torch.save(state, out / "ckpt" / name)
    rows = ["file,norm,eps,seed"] + [",".join(row).rstrip(",") for row in CHECKPOINTS]
    atomic_save(out / "ckpt" / "manifest.csv", "\n".join(rows) + "\n")
    print(f"wrote {out / 'data' / 'val'} ({NUM_CLASSES} classes x {PER_CLASS} images) and "
          f"{len(CHECKPOINTS)} checkpoints with {out / 'ckpt' / 'manifest.csv'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Tiny ImageNet-style folder and published-style checkpoints.")
    parser.add_argument("--out", required=True,
                        help="folder for data/val and ckpt/ (with manifest.csv)")
    main(parser.parse_args().out)
