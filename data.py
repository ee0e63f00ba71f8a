"""Datasets as in-memory tensors: the registry, loading (data-dir, the Debian system copy of
Fashion-MNIST, torchvision download), class selection, input adaptation and augmentation.
Images are float32 in [0, 1]; normalisation lives inside the models (models.py).
"""
import gzip
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError


class Dataset(NamedTuple):
    name: str
    torchvision: Optional[str]  # class in torchvision.datasets (None: made here, or folders)
    num_classes: int
    channels: int
    size: int  # height = width, pixels
    mean: Tuple[float, ...]  # per channel, for the model's Normalize layer
    std: Tuple[float, ...]


DATASETS = {d.name: d for d in (
    Dataset("fashion-mnist", "FashionMNIST", 10, 1, 28, (0.2860,), (0.3530,)),
    Dataset("mnist", "MNIST", 10, 1, 28, (0.1307,), (0.3081,)),
    Dataset("cifar10", "CIFAR10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    Dataset("cifar100", "CIFAR100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    Dataset("svhn", "SVHN", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # CIFAR-shaped random images with class-dependent colour: exercises the CIFAR code
    # paths (resnet18, 3 channels, 32x32) offline, in tests and `run_all.sh paper --smoke`.
    Dataset("synthetic", None, 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    # ImageFolder trees, too large for memory: the record gives published ImageNet models
    # their normalisation and input size; load_split does not read it (see there).
    Dataset("imagenet", None, 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
)}
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


def get_dataset(name):
    """The Dataset record of a name, or a one-line error listing the choices."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def _read_idx(path):
    """IDX file (optionally gzipped) -> uint8 numpy array, as in the MNIST distribution."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder, train):
    stem = "train" if train else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        found = [p for p in (Path(folder) / f"{stem}-{kind}{ext}" for ext in ("", ".gz")) if p.is_file()]
        if not found:
            return None
        files.append(found[0])
    return files


def _load_mnist_like(name, train, data_dir, download):
    tv_name = DATASETS[name].torchvision
    folders = [Path(data_dir) / tv_name / "raw", Path(data_dir) / name]
    if name == "fashion-mnist":
        folders.append(Path(SYSTEM_FASHION_MNIST))
    for folder in folders:
        files = _find_idx(folder, train)
        if files:
            return _read_idx(files[0])[:, None], _read_idx(files[1])
    if not download:
        hint = (" or install the Debian/Ubuntu package dataset-fashion-mnist"
                if name == "fashion-mnist" else "")
        raise UserError(f"{name} not found in {data_dir} and --no-download given: "
                        f"run once without --no-download{hint}")
    import torchvision
    try:
        getattr(torchvision.datasets, tv_name)(root=data_dir, train=train, download=True)
    except Exception as e:  # no network, disk full, ...
        hint = ("install the Debian/Ubuntu package dataset-fashion-mnist, or " if name == "fashion-mnist" else "")
        raise UserError(f"{name} not found and its download failed ({str(e).splitlines()[0][:120]}): "
                        f"{hint}run once with internet access to fetch it into {data_dir}")
    files = _find_idx(folders[0], train)
    return _read_idx(files[0])[:, None], _read_idx(files[1])


def _load_torchvision(name, train, data_dir, download):
    import torchvision
    cls = getattr(torchvision.datasets, DATASETS[name].torchvision)
    try:
        if name == "svhn":
            ds = cls(root=data_dir, split="train" if train else "test", download=download)
            return ds.data, ds.labels  # [N, 3, 32, 32] uint8
        ds = cls(root=data_dir, train=train, download=download)
        return ds.data.transpose(0, 3, 1, 2), ds.targets  # HWC -> CHW
    except Exception as e:
        if not download:
            raise UserError(f"{name} not found in {data_dir} and --no-download given: "
                            f"run once without --no-download on a machine with internet")
        raise UserError(f"could not load or download {name} to {data_dir}: {str(e).splitlines()[0]}")


def _synthetic(train, n=None):
    """Deterministic CIFAR-shaped data: class k tints the image with a colour of its own."""
    n = n or (2000 if train else 500)
    g = torch.Generator().manual_seed(0 if train else 1)
    y = torch.randint(0, 10, (n,), generator=g)
    palette = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(2))
    x = 0.5 * palette[y] + 0.5 * torch.rand(n, 3, 32, 32, generator=g)
    return (x * 255).to(torch.uint8).numpy(), y.numpy()


def load_split(name, train, data_dir="./data", classes=None, size=None, download=True):
    """One split of a dataset as tensors: x float32 [N, C, H, W] in [0, 1], y int64 [N].

    classes: original class ids to keep, relabelled 0..k-1 in the given order (None = all).
    size: keep the first `size` examples after class filtering (None = all); asking for more
    than the split holds is a UserError that says how many there are.
    """
    dataset = get_dataset(name)
    if name == "imagenet":
        raise UserError("imagenet cannot be loaded into memory: ImageNet folders are read by a "
                        "streaming loader that is not available yet")
    if name == "synthetic":
        x, y = _synthetic(train)
    elif name in ("mnist", "fashion-mnist"):
        x, y = _load_mnist_like(name, train, data_dir, download)
    else:
        x, y = _load_torchvision(name, train, data_dir, download)
    x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.as_tensor(np.asarray(y), dtype=torch.long)
    if classes is not None:
        relabel = torch.full((dataset.num_classes,), -1, dtype=torch.long)
        relabel[torch.tensor(classes)] = torch.arange(len(classes))
        keep = relabel[y] >= 0
        x, y = x[keep], relabel[y[keep]]
    if size is not None:
        if size > len(x):
            split = "training" if train else "test"
            raise UserError(f"asked for {size} {split} examples, but {name} classes "
                            f"{classes if classes is not None else 'all'} has {len(x)}")
        x, y = x[:size], y[:size]
    return x.float().div_(255), y


def adapt_images(x, channels, size):
    """Adapt images [N, C, H, W] to a model's input: grayscale <-> RGB, resize to `size`."""
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).contiguous()


def random_crop_flip(x):
    """Random crop (pad 4, reflect) and horizontal flip for a batch [N, C, H, W], no loop."""
    n, c, h, w = x.shape
    xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) + dy)[:, None, :, None].expand(n, c, h, w + 8)
    xp = xp.gather(2, rows)
    cols = (torch.arange(w, device=x.device) + dx)[:, None, None, :].expand(n, c, h, w)
    x = xp.gather(3, cols)
    flip = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


