"""Datasets: the registry, loading (data-dir, the Debian system copy of Fashion-MNIST,
torchvision download, ImageNet-style folders), class selection, in-memory or streamed splits
(STREAM_RULE), batches adapted to a model's input, and augmentation.
Images are float32 in [0, 1]; normalisation lives inside the models (models.py). A bad name
or size is a ValueError, data that cannot be found or fetched a FileNotFoundError, each one
line; the scripts' main turns them into one line and exit 2.
"""
import gzip
import numbers
import os
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


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
    # ImageFolder trees (DATA_DIR/train, DATA_DIR/val), read by imagenet_folder; the record also
    # gives published ImageNet models their normalisation and input size.
    Dataset("imagenet", None, 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
)}
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


def get_dataset(name):
    """The Dataset record of a name; an unknown name is a ValueError listing the choices."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def _read_idx(path):
    """IDX file (optionally gzipped) -> uint8 numpy array, as in the MNIST distribution."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_like_folders(name, data_dir):
    """The folders searched, in order, for the IDX files of mnist or fashion-mnist: torchvision's
    download folder, data_dir/<name>, then (fashion-mnist) the Debian system copy."""
    folders = [Path(data_dir) / DATASETS[name].torchvision / "raw", Path(data_dir) / name]
    return folders + ([Path(SYSTEM_FASHION_MNIST)] if name == "fashion-mnist" else [])


def _find_idx(folder, train):
    stem = "train" if train else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = (Path(folder) / f"{stem}-{kind}{ext}" for ext in ("", ".gz"))
        found = [p for p in candidates if p.is_file()]
        if not found:
            return None
        files.append(found[0])
    return files


def _load_mnist_like(name, train, data_dir, download):
    """(images uint8 [N, 1, 28, 28], labels uint8 [N]) of mnist or fashion-mnist from the first
    of mnist_like_folders that holds the split, else downloaded by torchvision into the
    first."""
    folders = mnist_like_folders(name, data_dir)
    for folder in folders:
        files = _find_idx(folder, train)
        if files:
            return _read_idx(files[0])[:, None], _read_idx(files[1])
    if not download:
        hint = (" or install the Debian/Ubuntu package dataset-fashion-mnist"
                if name == "fashion-mnist" else "")
        raise FileNotFoundError(f"{name} not found in {data_dir} and --no-download given: "
                                f"run once without --no-download{hint}")
    import torchvision
    try:
        getattr(torchvision.datasets, DATASETS[name].torchvision)(root=data_dir, train=train,
                                                                  download=True)
    except Exception as e:  # no network, disk full, ...
        hint = ("install the Debian/Ubuntu package dataset-fashion-mnist, or "
                if name == "fashion-mnist" else "")
        raise FileNotFoundError(f"{name} not found and its download failed "
                                f"({str(e).splitlines()[0][:120]}): {hint}run once with internet "
                                f"access to fetch it into {data_dir}") from None
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
            raise FileNotFoundError(f"{name} not found in {data_dir} and --no-download given: "
                                    f"run once without --no-download on a machine with "
                                    f"internet") from None
        raise FileNotFoundError(f"could not load or download {name} to {data_dir}: "
                                f"{str(e).splitlines()[0]}") from None


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
    than the split holds is a ValueError that says how many there are. An unknown name or
    class is a ValueError, data not found (download False, or a failed download) a
    FileNotFoundError.
    imagenet: the folder data_dir/train or data_dir/val in imagenet_folder's seeded order, all
    decoded into memory (never downloaded); open_split streams it when large.
    """
    dataset = get_dataset(name)
    _check_selection(classes, size, None if name == "imagenet" else dataset.num_classes)
    if name == "imagenet":  # decoded file by file into memory, however large: open_split streams
        return _read_all(imagenet_folder(train, data_dir, classes, size))
    if name == "synthetic":
        x, y = _synthetic(train)
    elif name in ("mnist", "fashion-mnist"):
        x, y = _load_mnist_like(name, train, data_dir, download)
    else:
        x, y = _load_torchvision(name, train, data_dir, download)
    x = torch.from_numpy(np.ascontiguousarray(x))
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if classes is not None:
        relabel = torch.full((dataset.num_classes,), -1, dtype=torch.long)
        relabel[torch.tensor(classes)] = torch.arange(len(classes))
        keep = relabel[y] >= 0
        x, y = x[keep], relabel[y[keep]]
    if size is not None:
        _check_size(size, len(x), name, train, classes)
        x, y = x[:size], y[:size]
    return x.float().div_(255), y


def _check_selection(classes, size, num_classes=None):
    """ValueError unless classes is None or distinct class ids (in range(num_classes) when
    given) and size is None or an integer >= 1."""
    if classes is not None:
        if (not classes or len(set(classes)) != len(classes)
                or not all(isinstance(c, numbers.Integral) for c in classes)):
            raise ValueError(f"classes must be distinct integer class ids, got {classes!r}")
        bad = [c for c in classes if num_classes is not None and not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"classes {bad} out of range: the dataset has classes "
                             f"0-{num_classes - 1}")
    if size is not None and not (isinstance(size, numbers.Integral)
                                 and not isinstance(size, bool) and size >= 1):
        raise ValueError(f"size must be an integer >= 1 (or None: all), got {size!r}")


def _check_size(size, available, name, train, classes):
    if size > available:
        split = "training" if train else "test"
        which = ("all" if classes is None else classes if len(classes) <= 20
                 else f"({len(classes)} of them)")
        raise ValueError(f"asked for {size} {split} examples, but {name} classes {which} has "
                         f"{available}")


# ----------------------------------------------------------------------------- large data

MEMORY_LIMIT_BYTES = 2 * 1024 ** 3
STREAM_RULE = (f"a split is held in memory when N x C x H x W x 4 bytes (float32 at its stored "
               f"size) is at most {MEMORY_LIMIT_BYTES / 2 ** 30:g} GiB, else streamed from disk "
               f"batch by batch")
# ImageFolder lists files class by class: a seeded shuffle makes prefixes mix classes
FOLDER_ORDER_SEED = 0


def imagenet_folder(train, data_dir="./data", classes=None, size=None):
    """The ImageNet-style folder data_dir/train or data_dir/val (torchvision ImageFolder: one
    sub-folder per class, classes numbered in sorted order) as a lazy Dataset of (image float32
    [3, 224, 224] in [0, 1], label int); Resize(256) + CenterCrop(224), as published ImageNet
    models are evaluated.

    Order: a fixed permutation of all files of the split (torch.randperm, seed FOLDER_ORDER_SEED
    = 0), then `classes` (relabelled 0..k-1 in the given order), then the first `size`: a prefix
    is a stable random sample over classes, and only its files are ever opened.
    """
    import torchvision
    from torchvision import transforms as T
    _check_selection(classes, size)
    sub = "train" if train else "val"
    root = Path(data_dir) / sub
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet needs DATA_DIR/{sub} with one sub-folder per class "
                                f"(ImageFolder layout): not found: {root}")
    preprocess = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    try:  # lists the files; opens none
        folder = torchvision.datasets.ImageFolder(root, preprocess)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise FileNotFoundError(f"imagenet folder {root} is not in ImageFolder layout: "
                                f"{str(e).splitlines()[0][:200]}") from None
    order = torch.randperm(len(folder.samples),
                           generator=torch.Generator().manual_seed(FOLDER_ORDER_SEED))
    samples = [folder.samples[i] for i in order.tolist()]  # [(path, class index)]
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < len(folder.classes)]
        if bad:
            raise ValueError(f"classes {bad} out of range: {root} has classes "
                             f"0-{len(folder.classes) - 1}")
        relabel = {c: k for k, c in enumerate(classes)}
        samples = [(path, relabel[c]) for path, c in samples if c in relabel]
    if size is not None:
        _check_size(size, len(samples), "imagenet", train, classes)
        samples = samples[:size]
    folder.samples = folder.imgs = samples  # what __getitem__ reads; folder.classes keeps all names
    folder.targets = [label for _, label in samples]
    return folder


def _read_all(dataset, shape=(3, 224, 224)):
    """A Dataset of (image [C, H, W], label) read item by item into x float32 [N, *shape],
    y int64 [N]."""
    x, y = torch.empty(len(dataset), *shape), torch.empty(len(dataset), dtype=torch.long)
    for i in range(len(dataset)):
        x[i], y[i] = dataset[i]
    return x, y


def open_split(name, train, data_dir="./data", classes=None, size=None, download=True,
               memory_limit=MEMORY_LIMIT_BYTES):
    """One split, in memory or streamed by STREAM_RULE (memory_limit in bytes): either
    (x float32 [N, C, H, W] in [0, 1], y int64 [N]) as load_split returns, or a Dataset of
    (image float32 [C, H, W] in [0, 1], label int) read lazily; iterate_batches takes both.

    Built-in datasets come in whole files and are always under the limit (the largest, SVHN
    train, is 0.9 GB); ImageNet val (50000 x 3 x 224 x 224 x 4 = 30 GB) is streamed, a folder or
    `size` of a few thousand images is loaded.
    """
    if name != "imagenet":
        return load_split(name, train, data_dir, classes, size, download)
    folder, d = imagenet_folder(train, data_dir, classes, size), DATASETS[name]
    if len(folder) * d.channels * d.size * d.size * 4 <= memory_limit:
        return _read_all(folder, (d.channels, d.size, d.size))
    return folder


def split_labels(split):
    """Labels int64 [N] of a split, without reading images: tensors (x, y), or a Dataset with
    `targets` (ImageFolder)."""
    if isinstance(split, tuple):
        return split[1]
    return torch.as_tensor(split.targets, dtype=torch.long)


def iterate_batches(split, batch_size, channels, size, device="cpu", workers=None, transform=None):
    """Batches (x [B, channels, size, size] on device, adapted by adapt_images; y int64 [B] on
    device) in dataset order, without materialising the whole set.

    split: (x [N, C, H, W], y [N]) tensors, sliced; or any map-style Dataset of (image [C, H, W],
    label) pairs, read by a DataLoader with `workers` processes (None: min(4, CPUs); 0: in this
    process) and adapted as each batch arrives. transform: applied to each batch [B, C, H, W]
    before adaptation (e.g. transfer.SHIFTS), on the device.
    """
    device = torch.device(device)
    transform = transform or (lambda x: x)
    if isinstance(split, tuple) and len(split) == 2 and torch.is_tensor(split[0]):
        x, y = split
        for i in range(0, len(x), batch_size):
            yield (adapt_images(transform(x[i:i + batch_size].to(device)), channels, size),
                   y[i:i + batch_size].to(device))
        return
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(split, batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    for xb, yb in loader:
        yield (adapt_images(transform(xb.to(device, non_blocking=True)), channels, size),
               yb.to(device, torch.long, non_blocking=True))


def adapt_images(x, channels, size):
    """Adapt images [N, C, H, W] to a model's input: grayscale <-> RGB, resize to `size`."""
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
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


# ----------------------------------------------------------------------------- presence
# python data.py present NAME... [--data-dir D]: prints, one a line, the names whose files are
# in D (run_all.sh picks the transfer targets it can use offline this way).

def dataset_present(name, data_dir="./data"):
    """Whether both splits of a dataset can be read from data_dir without a download: the IDX
    files of MNIST and Fashion-MNIST (mnist_like_folders, the system copy included), the files
    of torchvision's CIFAR-10/100 and SVHN folders, data_dir/val for imagenet (ImageFolder);
    synthetic is made here. ValueError for an unknown name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    root = Path(data_dir)
    if name in ("mnist", "fashion-mnist"):
        folders = mnist_like_folders(name, root)
        return any(_find_idx(f, True) and _find_idx(f, False) for f in folders)
    if name == "imagenet":
        return (root / "val").is_dir()
    if name == "synthetic":
        return True
    import torchvision
    cls = getattr(torchvision.datasets, DATASETS[name].torchvision)
    if name == "svhn":
        return all((root / cls.split_list[split][1]).is_file() for split in ("train", "test"))
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return all((root / cls.base_folder / f).is_file() for f in files)


def get_args(argv=None):
    from common import ArgumentParser
    p = ArgumentParser(description="Print the datasets whose files are in --data-dir, one a line.")
    p.add_argument("command", choices=["present"], help="what to answer")
    p.add_argument("names", nargs="+", choices=list(DATASETS), metavar="NAME",
                   help=f"dataset names: {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default="./data", help="where datasets are looked up")
    return p.parse_args(argv)


def main(args):
    for name in args.names:
        if dataset_present(name, args.data_dir):
            print(name)


if __name__ == "__main__":
    main(get_args())
