"""Checkpoints: writing ours and reading every kind the scripts take, into one interface
(models.Net: `features(x)` [N, d], `head`, [0, 1] inputs normalised inside).

    model, ckpt = load_checkpoint("runs/eps0.5/model.pt")        # ours (advtrain.py)
    model, ckpt = load_checkpoint("resnet50_l2_eps3.ckpt", unsafe=True)  # robustness/RMT
    model, ckpt = load_checkpoint("resnet18.pth", dataset="imagenet")    # torchvision
    model, ckpt = load_checkpoint("cnx.pth", arch="torchvision:convnext_tiny")  # any classifier
    model, ckpt = load_checkpoint(None, model="mypackage.nets:build")    # the user's own code

Ours (new_checkpoint) hold tensors and plain types only and load with
torch.load(path, weights_only=True); build_model(**ckpt["model_args"]) rebuilds the network.
Published ResNets: torchvision state dicts and the robustness library's checkpoints (ImageNet
and CIFAR layouts, e.g. Salman et al. 2020), their architecture detected from the keys and
shapes of the weights (published.detect_arch). Any other image classifier, a torchvision
architecture or a module the user's function builds, with its state dict (load_classifier),
through models.adapt_classifier. This module imports models.py and
published.py; neither imports it. Errors are standard exceptions (FileNotFoundError,
ValueError) with one-line messages; the scripts' main turns them into one line and exit 2.
"""
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from data import get_dataset
from models import (adapt_classifier, build_model, find_head, inner_normalizer,
                    torchvision_classifier, torchvision_preprocessing, user_classifier)
from published import FOREIGN_ARCHS, build_foreign, detect_arch, head_name

# What every checkpoint of advtrain.py holds; model_args rebuilds the network:
# build_model(**ckpt["model_args"]).
CHECKPOINT_KEYS = ("model", "model_args", "arch", "num_classes", "in_channels", "image_size",
                   "dataset", "classes", "norm", "eps")


# ----------------------------------------------------------------------------- writing

def new_checkpoint(model, model_args, dataset, classes, norm, eps, **extra):
    """A checkpoint dict of ours: the model's state (detached, contiguous CPU tensors),
    model_args (build_model's keyword arguments, which rebuild it) and what it was trained on
    (dataset, classes, norm, eps), plus `extra` entries (plain types and tensors only, so the
    file loads with torch.load(weights_only=True)). Save it with common.atomic_save."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"model": state, "model_args": model_args, "arch": model_args["arch"],
            "num_classes": model_args["num_classes"], "in_channels": model_args["in_channels"],
            "image_size": model_args["image_size"], "dataset": dataset, "classes": classes,
            "norm": norm, "eps": eps, **extra}


# ----------------------------------------------------------------------------- reading

class PickledObjects(ValueError):
    """A torch file that holds Python objects besides tensors: loading it means unpickling."""


def first_line(e):
    """The first line of an exception's message (its type when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_torch_file(path, unsafe=False):
    """The object in a torch file. Loaded with weights_only=True (tensors and plain types only:
    no pickled code runs); a file that needs other objects unpickled (robustness saves with
    dill, optimizer or schedule objects) is a PickledObjects error (a ValueError), unless
    `unsafe`: then it is unpickled (weights_only=False) with a warning line on stderr. A
    missing file is a FileNotFoundError, a truncated or corrupt one a ValueError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    unreadable = f"cannot read checkpoint {path} (truncated or not a torch file)"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not refused:
            raise ValueError(f"{unreadable}: {first_line(e)}") from None
    if not unsafe:
        raise PickledObjects(f"{path} holds pickled Python objects ({refused.group(1)}), and "
                             f"unpickling can execute arbitrary code: pass --unsafe-load only "
                             f"for files from a source you trust")
    print(f"warning: --unsafe-load: unpickling {path}, which can execute arbitrary code",
          file=sys.stderr, flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ValueError(f"unpickling {path} needs the Python module {e.name} "
                         f"(pip install {e.name})") from None
    except Exception as e:
        raise ValueError(f"{unreadable}: {first_line(e)}") from None


def load_state(module, state, what):
    """module.load_state_dict(state), exact; a mismatch is one ValueError line that starts
    with `what` and names the first offending key."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"{what}: {(details or [first_line(e)])[0][:300]}") from None
    problems = [f"{len(keys)} {kind} keys (first: {keys[0]})"
                for kind, keys in (("missing", result.missing_keys),
                                   ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise ValueError(f"{what}: {', '.join(problems)}")


def is_own(obj):
    """Whether an object read from a torch file is a checkpoint of advtrain.py."""
    return isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS)


def read_checkpoint(path):
    """The checkpoint dict of advtrain.py at path, loaded with weights_only=True (no pickled
    code is ever executed); any other file is a ValueError."""
    try:
        ckpt = read_torch_file(path)
    except PickledObjects:
        raise ValueError(f"{path} is not a checkpoint written by advtrain.py") from None
    if not is_own(ckpt):
        raise ValueError(f"{path} is not a checkpoint written by advtrain.py")
    return ckpt


def _load_own(path, ckpt, arch=None):
    """The Net of a checkpoint of advtrain.py (rebuilt by build_model(**ckpt["model_args"]))."""
    if arch not in (None, ckpt["arch"]):
        raise ValueError(f"{path} is a {ckpt['arch']} checkpoint of advtrain.py; "
                         f"arch {arch!r} applies to published checkpoints only")
    model = build_model(**ckpt["model_args"])
    load_state(model, ckpt["model"], f"{path}: weights do not fit arch {ckpt['arch']}")
    return model


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
    mean = tensors.get("module.normalizer.new_mean")
    std = tensors.get("module.normalizer.new_std")
    normalizer = (None if mean is None or std is None
                  else (mean.flatten().tolist(), std.flatten().tolist()))
    return state, normalizer, "robustness"


def load_published(path, obj, arch=None, dataset=None):
    """(Net around the network of a published checkpoint, its checkpoint dict), from obj, the
    object read from the file at path (a dict). arch: a published.FOREIGN_ARCHS name, or None
    to detect it (published.detect_arch); dataset: the training set (default imagenet, or
    cifar10 for cifar_*), whose mean/std normalise when the file carries no normalizer. The
    dict has the keys the scripts read (see load_checkpoint). Every mismatch is a ValueError."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state dict")
    state, normalizer, fmt = _network_state(obj)
    if arch is None:
        try:
            arch = detect_arch(state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    elif arch not in FOREIGN_ARCHS:
        raise ValueError(f"unknown arch {arch!r} for a published checkpoint; choose from "
                         f"{', '.join(FOREIGN_ARCHS)}")
    head, cifar = head_name(arch), FOREIGN_ARCHS[arch].stem == 3
    if "conv1.weight" not in state or f"{head}.weight" not in state:
        raise ValueError(f"{path}: weights do not fit arch {arch}: no conv1.weight or "
                         f"{head}.weight")
    num_classes = state[f"{head}.weight"].shape[0]
    net = build_foreign(arch, num_classes, width=state["conv1.weight"].shape[0])
    load_state(net, state, f"{path}: weights do not fit arch {arch}")
    dataset = dataset or ("cifar10" if cifar else "imagenet")
    ds = get_dataset(dataset)
    if ds.channels != 3:
        raise ValueError(f"dataset {dataset} has {ds.channels} channel(s), but a ResNet "
                         f"checkpoint takes 3")
    mean, std = normalizer or (ds.mean, ds.std)
    ckpt = {"arch": arch, "num_classes": num_classes, "in_channels": 3,
            "image_size": 32 if cifar else 224, "dataset": dataset,
            "classes": list(range(num_classes)), "norm": None, "eps": None, "format": fmt,
            "model_args": None}
    # its last linear layer (`head`) becomes head, what that layer saw ([N, d], after the
    # global pool) features; model(x) on [0, 1] images equals net((x - mean) / std)
    return adapt_classifier(net, mean, std, head=head), ckpt


# Prefixes that wrappers put before every key of a state dict: DataParallel and
# DistributedDataParallel (module.), a model held as attribute `model` (model.), torch.compile
# (_orig_mod.).
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")


def strip_prefixes(state, expected):
    """(state, the prefixes removed): while the keys of state are not the `expected` keys and
    all start with one of KEY_PREFIXES, that prefix is removed from every key."""
    removed, expected = [], set(expected)
    while set(state) != expected:
        prefix = next((p for p in KEY_PREFIXES if state and all(k.startswith(p) for k in state)),
                      None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        removed.append(prefix)
    return state, removed


def _normalisation(path, net, normalizer, mean, std, dataset, declared, channels):
    """(mean, std) lists that normalise inside, or (None, None) when net normalises its
    input itself: given ones, else the file's normalizer, else none (net's own), else the
    dataset's when named, else those the torchvision weights declare, else ImageNet's. Given
    ones with a normalizer in the file, or of the wrong length, are a ValueError."""
    if mean is not None and normalizer is not None:
        raise ValueError(f"{path} carries its own normalizer: a --mean and --std given too "
                         f"would normalise twice")
    if mean is None:
        if normalizer is not None:
            mean, std = normalizer
        elif inner_normalizer(net) is not None:
            return None, None
        elif dataset is None and declared is not None:
            mean, std = declared[:2]
        else:
            ds = get_dataset(dataset or "imagenet")
            mean, std = ds.mean, ds.std
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != len(std) or len(mean) not in (1, channels):
        raise ValueError(f"mean {mean} and std {std} must each hold 1 or {channels} values "
                         f"(one per channel)")
    return mean, std


def load_classifier(path, obj, arch=None, model=None, dataset=None, head=None, mean=None,
                    std=None, image_size=None):
    """(Net around any image classifier, its checkpoint dict): torchvision's architecture
    arch = "torchvision:NAME" (random weights, then obj's) or the nn.Module that the user's
    function model = "package.module:function" returns (models.user_classifier: its code
    runs here), with the weights of obj (the object read from the file at path; None: the
    module's own), adapted by models.adapt_classifier (head: its last linear layer's name,
    else found on a batch of image_size). A state dict under "model" or "state_dict", or with
    module./model. prefixes (stripped, said in one line on stderr), loads; a torchvision
    head with another number of classes than the file's is resized to the file's.
    dataset: what it was trained on (default imagenet): its channels, classes, its
    normalisation when none is given or found (_normalisation), its image size (else the
    weights' declared one, else 224). Every mismatch is a one-line ValueError."""
    if (arch is None) == (model is None):
        raise ValueError("give a classifier as either --arch torchvision:NAME or --model, "
                         "not both")
    if (mean is None) != (std is None):
        raise ValueError("give both --mean and --std, or neither")
    ds = get_dataset(dataset or "imagenet")
    name = arch.partition(":")[2] if arch else None
    declared = torchvision_preprocessing(name) if name else None
    size = image_size or (declared[2] if dataset is None and declared else ds.size)
    net = torchvision_classifier(name, image_size=size) if name else user_classifier(model)
    what = arch or f"--model {model}"
    example = torch.rand(2, ds.channels, size, size, generator=torch.Generator().manual_seed(0))
    try:
        head = head or find_head(net, example)
    except (RuntimeError, AssertionError) as e:  # the net cannot take [2, channels, size, size]
        raise ValueError(f"{what} cannot run on images [{ds.channels}, {size}, {size}] "
                         f"(--image-size, --trained-on): {first_line(e)}") from None
    normalizer = None
    if obj is not None:
        if not isinstance(obj, dict):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
        state, normalizer, _ = _network_state(obj)
        state, removed = strip_prefixes(state, net.state_dict())
        stripped = f"the key prefix {' '.join(removed)} removed" if removed else ""
        weight = state.get(f"{head}.weight")
        last = dict(net.named_modules()).get(head) if torch.is_tensor(weight) else None
        if name and isinstance(last, nn.Linear) and weight.dim() == 2 \
                and weight.shape[0] != last.out_features:  # the file's classes
            parent, _, attr = head.rpartition(".")
            setattr(net.get_submodule(parent), attr, nn.Linear(last.in_features, weight.shape[0]))
        load_state(net, state, f"{path}{f' ({stripped})' if stripped else ''}: weights do "
                               f"not fit {what}")
        if stripped:  # said once it loaded: an error stays one line
            print(f"note: {path}: {stripped}", file=sys.stderr, flush=True)
    mean, std = _normalisation(path, net, normalizer, mean, std, dataset, declared, ds.channels)
    adapted = adapt_classifier(net, mean, std, head=head)
    num_classes = adapted.head.out_features
    ckpt = {"arch": arch or f"model:{model}", "num_classes": num_classes,
            "in_channels": ds.channels, "image_size": size, "dataset": ds.name,
            "classes": list(range(num_classes)), "norm": None, "eps": None,
            "format": "state dict" if obj is not None else "module", "model_args": None,
            "head": head, "mean": mean, "std": std}
    return adapted, ckpt


def load_checkpoint(path, device="cpu", arch=None, dataset=None, unsafe=False, model=None,
                    head=None, mean=None, std=None, image_size=None):
    """(model in eval mode on device, checkpoint dict). The one loader every script uses.

    Reads checkpoints of advtrain.py (`arch` None or theirs; `dataset` is ignored: they
    record their own) and published ResNets (load_published): torchvision state dicts and
    robustness-library checkpoints. For those, `arch` (a published.FOREIGN_ARCHS name)
    overrides the architecture detected from the weights; `dataset` is the training set
    (default imagenet, or cifar10 for cifar_*), whose mean/std normalise when the file carries
    no normalizer; the model takes [0, 1] images like ours, and the returned dict has the keys
    the scripts read (arch, num_classes, in_channels, image_size, dataset, classes; norm and
    eps None, model_args None) plus format ("robustness" or "torchvision"). unsafe: unpickle
    files that need it (--unsafe-load); without it they are a ValueError (PickledObjects).
    Any other image classifier (load_classifier): arch "torchvision:NAME" or model
    "package.module:function" (the user's code, run only then), path its state dict (None:
    the module's own weights), with head, mean, std and image_size for it alone.
    A missing file is a FileNotFoundError, every other problem a one-line ValueError.
    """
    if model is not None or str(arch).startswith("torchvision:"):
        obj = None if path is None else read_torch_file(path, unsafe)
        if is_own(obj):
            raise ValueError(f"{path} is a checkpoint of advtrain.py: load it without --arch "
                             f"torchvision:NAME or --model")
        model, ckpt = load_classifier(path, obj, arch, model, dataset, head, mean, std,
                                      image_size)
        return model.to(device).eval(), ckpt
    if path is None:
        raise ValueError("no checkpoint given: --ckpt is needed, unless --model builds the "
                         "model with its weights")
    given = [flag for flag, value in (("--head", head), ("--mean", mean), ("--std", std),
                                      ("--image-size", image_size)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to a classifier given by --arch "
                         f"torchvision:NAME or --model only")
    obj = read_torch_file(path, unsafe)
    if is_own(obj):
        model, ckpt = _load_own(path, obj, arch), obj
    else:
        model, ckpt = load_published(path, obj, arch, dataset)
    return model.to(device).eval(), ckpt
