"""data.py at scale: ImageNet-style folders, the in-memory / streamed rule, batches over both."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import ROOT, one_line_error

SIZES = [(300, 260), (260, 300)]  # width x height: landscape and portrait, both cropped


def class_colour(c):
    return (60 * c + 30, 200 - 50 * c, 90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """val/ with 3 classes x 4 PNGs: random noise (so the crop matters) around a 100-px square
    in the class's colour (so each image's class can be read off its centre pixel)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "val" / f"n0{c}").mkdir(parents=True)
        for i in range(4):
            w, h = SIZES[i % 2]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[h // 2 - 50: h // 2 + 50, w // 2 - 50: w // 2 + 50] = class_colour(c)
            Image.fromarray(pixels).save(root / "val" / f"n0{c}" / f"img{i}.png")
    return root


def centre_class(x):
    """Class of each image [N, 3, 224, 224] from the colour of its centre pixel."""
    centre = (x[:, :, 112, 112] * 255).round()
    colours = torch.tensor([class_colour(c) for c in range(3)], dtype=torch.float32)
    return torch.cdist(centre, colours).argmin(1)


def test_folder_loads_centre_crops_with_labels_in_a_seeded_order(folder):
    from torchvision import transforms as T
    x, y = data.load_split("imagenet", False, folder, download=False)
    assert x.shape == (12, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(centre_class(x), y)
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(y[:4].tolist())) > 1  # not class by class
    x2, y2 = data.load_split("imagenet", False, folder, download=False)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # row i is file i of the folder's order; its pixels are torchvision's transforms of that file
    paths = [path for path, _ in data.imagenet_folder(False, folder).samples]
    assert sorted(paths) == sorted(str(p) for p in folder.glob("val/*/*.png"))
    by_hand = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    for i in (0, 5):
        assert torch.equal(x[i], by_hand(Image.open(paths[i]).convert("RGB")))
        assert y[i] == int(paths[i].split("/")[-2][-1])  # n0<class>


def test_folder_classes_relabel_and_size_opens_only_a_prefix(folder, monkeypatch):
    x_all, y_all = data.load_split("imagenet", False, folder)
    x, y = data.load_split("imagenet", False, folder, classes=[2, 0])
    assert len(x) == 8 and torch.equal(x[y == 0], x_all[y_all == 2])
    assert torch.equal(x[y == 1], x_all[y_all == 0])
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open",
                        lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    x5, y5 = data.load_split("imagenet", False, folder, size=5)
    assert len(opened) == 5 and torch.equal(x5, x_all[:5]) and torch.equal(y5, y_all[:5])


def test_folder_user_errors_are_one_line(folder, tmp_path):
    assert "has 12" in one_line_error("asked for 13", data.load_split, "imagenet", False, folder,
                                      size=13)
    assert "has 4" in one_line_error("asked for 5", data.load_split, "imagenet", False, folder,
                                     classes=[1], size=5)
    one_line_error(f"not found: {tmp_path / 'val'}", data.load_split, "imagenet", False, tmp_path)
    one_line_error("DATA_DIR/train with one sub-folder per class", data.open_split, "imagenet",
                   True, folder)
    one_line_error("out of range", data.load_split, "imagenet", False, folder, classes=[0, 3])
    (tmp_path / "val").mkdir()
    one_line_error("not in ImageFolder layout", data.load_split, "imagenet", False, tmp_path)


def test_open_split_streams_above_the_memory_limit(folder):
    x, y = data.open_split("imagenet", False, folder)
    assert x.shape == (12, 3, 224, 224)
    one_image = 3 * 224 * 224 * 4
    in_memory = data.open_split("imagenet", False, folder, size=4, memory_limit=4 * one_image)
    assert isinstance(in_memory, tuple)
    streamed = data.open_split("imagenet", False, folder, memory_limit=4 * one_image)
    assert isinstance(streamed, torch.utils.data.Dataset) and len(streamed) == 12
    for i in range(12):
        image, label = streamed[i]
        assert torch.equal(image, x[i]) and label == y[i]
    x_f, y_f = data.open_split("fashion-mnist", False, classes=[1], size=10, download=False)
    assert x_f.shape == (10, 1, 28, 28) and (y_f == 0).all()
    assert "2 GiB" in data.STREAM_RULE and data.MEMORY_LIMIT_BYTES == 2 ** 31


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_batches_over_tensors_and_datasets_agree(folder, channels, size):
    x, y = data.load_split("imagenet", False, folder)
    streamed = data.open_split("imagenet", False, folder, memory_limit=0)
    expect = data.adapt_images(x, channels, size)
    for split, workers in ((x, y), 0), (streamed, 0), (streamed, 2):
        batches = list(data.iterate_batches(split, 5, channels, size, workers=workers))
        assert [len(b) for b, _ in batches] == [5, 5, 2]
        xs, ys = torch.cat([b for b, _ in batches]), torch.cat([b for _, b in batches])
        assert ys.dtype == torch.long and torch.equal(ys, y)
        assert xs.shape == (12, channels, size, size) and torch.equal(xs, expect)


class LazyImages(torch.utils.data.Dataset):
    """n RGB images [3, size, size] made on demand from the index: a constant colour and a
    random 16-px patch; label = index % 10."""

    def __init__(self, n, size=224):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 1, 1, generator=g).expand(3, self.size, self.size).clone()
        top, left = torch.randint(0, self.size - 16, (2,), generator=g).tolist()
        image[:, top:top + 16, left:left + 16] = torch.rand(3, 16, 16, generator=g)
        return image, i % 10


def test_lazy_dataset_items_and_batches():
    ds = LazyImages(7, size=40)
    image, label = ds[3]
    assert image.shape == (3, 40, 40) and label == 3 and torch.equal(image, ds[3][0])
    x = torch.stack([ds[i][0] for i in range(7)])
    xs = torch.cat([b for b, _ in data.iterate_batches(ds, 3, 3, 32, workers=0)])
    assert torch.equal(xs, data.adapt_images(x, 3, 32))


MEMORY_SCRIPT = """
import json, resource, sys, time
sys.path[:0] = ["tests", "."]
import torch
import data
from test_stream import LazyImages
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(1),
                          torch.nn.Flatten())
before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()  # KiB on Linux
with torch.no_grad():
    batches = data.iterate_batches(LazyImages({n}), 100, 3, 224, workers=0)
    feats = torch.cat([net(x) for x, _ in batches])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(shape=list(feats.shape), growth_mb=(peak - before) / 1024,
                      seconds=time.time() - t0)))
"""


@pytest.mark.slow
def test_streaming_memory_stays_bounded():
    """8000 images of 224 px (4.8 GB as float32 tensors) through a tiny network: the process's
    peak resident memory grows by a few batches, not by the set."""
    n = 8000
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(n=n)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["shape"] == [n, 4]
    assert result["growth_mb"] < 500, result
