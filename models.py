"""Models: the small `cnn` and the CIFAR `resnet18`, each with the interface every script
relies on (`features(x)` -> [N, d] penultimate representation, `head` the last linear layer,
inputs in [0, 1] normalised inside), the adapter that gives any other image classifier that
interface (`adapt_classifier`), the optimizer and the one training loop (`sgd_epoch`)
of training and fine-tuning, the mode context managers `eval_mode` and `train_mode`,
and the few tensor helpers the core functions share: their input checks and the per-example
L2 norm of the normalised (L2) steps. Checkpoints are read and written by checkpoints.py,
which builds on this module (never the other way round).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ARCHS = ("cnn", "resnet18")


def get_device(name="auto"):
    """'auto' -> cuda if available, else cpu; a CUDA device asked for without CUDA, or an
    unknown name, is a ValueError. The device setup of every script: a CUDA device comes with
    TF32 off (full_float32)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but CUDA is not available")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        full_float32()
    return device


def full_float32():
    """float32 matrix products and convolutions at full float32 precision on CUDA: PyTorch may
    run them as TF32 (10-bit mantissa), under which evaluation attacks, Fisher's Lanczos (its
    jvp/vjp pair no longer exactly symmetric) and the inversion are not the float32 that
    DESIGN.md, Precision, asks for. The CPU has no TF32: the flags change nothing there."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class Normalize(nn.Module):
    """(x - mean) / std as the model's first layer, so everything outside works in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Net(nn.Module):
    """normalise -> body -> features [N, d] -> head (linear) -> logits [N, k]. head: an
    existing nn.Linear(feature_dim, num_classes) to use as it is (adapt_classifier), else a
    new one."""

    def __init__(self, body, feature_dim, num_classes, mean, std, head=None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes) if head is None else head

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


# ----------------------------------------------------------------------------- any classifier

# The last name of a buffer by which a network shows that it normalises its own input: ours
# (Normalize: mean, std), the robustness library's normalizer (new_mean, new_std) and the
# mu, sigma of RobustBench-style models. BatchNorm's running_mean is not one of them.
NORMALIZER_BUFFERS = ("mean", "std", "new_mean", "new_std", "mu", "sigma")


def inner_normalizer(net):
    """The name of the first buffer of net that says it normalises its own input (its last
    part in NORMALIZER_BUFFERS), or None."""
    for name, _ in net.named_buffers():
        if name.rsplit(".", 1)[-1] in NORMALIZER_BUFFERS:
            return name
    return None


def find_head(net, example):
    """The dotted name of net's head: the last nn.Linear called in net(example) whose output
    is net's output (logits [N, k]), found by forward hooks in one pass, in eval mode and
    without gradients (every module's mode given back). example: a batch net takes. A net
    without such a layer, or whose head is called more than once, is a ValueError naming
    net's class."""
    calls = []  # (name, output) of every nn.Linear call, in call order
    hooks = [module.register_forward_hook(
        lambda module, inputs, output, name=name: calls.append((name, output)))
        for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    try:
        with eval_mode(net), torch.no_grad():
            out = net(example)
    finally:
        for hook in hooks:
            hook.remove()
    what = type(net).__name__
    if not torch.is_tensor(out) or out.dim() != 2:
        raise ValueError(f"{what} returns a {_describe(out)}, not logits [N, k]")
    heads = [name for name, output in calls if output is out or (
        torch.is_tensor(output) and output.shape == out.shape and torch.equal(output, out))]
    if not heads or heads[-1] == "":
        found = f"its last nn.Linear, {calls[-1][0]}, is followed by other layers" if calls \
            else "it has no nn.Linear"
        raise ValueError(f"{what} has no linear head whose output is its output ({found}): "
                         f"name its last linear layer (head)")
    if sum(name == heads[-1] for name, _ in calls) > 1:
        raise ValueError(f"{what}'s last linear layer {heads[-1]} is called more than once "
                         f"in a forward pass: not a head")
    return heads[-1]


class AdaptedNet(Net):
    """A Net around a classifier of other code (adapt_classifier). Its attention layers, if
    any, run in PyTorch's math kernel of scaled_dot_product_attention: the fused CPU kernel
    has no forward-mode derivative, which the lambda_max estimators (jvp) need."""

    def features(self, x):
        with sdpa_kernel(SDPBackend.MATH):
            return super().features(x)


def adapt_classifier(net, mean=None, std=None, head=None, example=None):
    """Any image classifier as a Net with the interface of ours: `features(x)` -> [N, d] (what
    its last linear layer sees), `head` that layer, model(x) == head(features(x)), inputs in
    [0, 1] with the normalisation inside.

    net: a module from normalised images [N, C, H, W] to logits [N, k]. mean, std: the
    per-channel normalisation it was trained with, or both None when net normalises its
    input itself (or takes [0, 1] images); given for a net that normalises inside
    (inner_normalizer) they are a ValueError: twice normalised. head: the dotted name of its
    last nn.Linear, or None to find it (find_head, which needs `example`, a batch net takes).
    No weight is copied: net becomes the Net's body, with nn.Identity in its head's place,
    and the head moves to the Net; net's mode is left as it is. Bad values are ValueErrors
    naming net's class."""
    what = type(net).__name__
    if (mean is None) != (std is None):
        raise ValueError(f"give both mean and std for {what}, or neither")
    inner = inner_normalizer(net)
    if mean is not None and inner is not None:
        raise ValueError(f"{what} normalises its input itself (buffer {inner}): a mean and std "
                         f"given too would normalise twice")
    if head is None:
        if example is None:
            raise ValueError(f"finding the head of {what} needs an example batch")
        head = find_head(net, example)
    try:
        last = net.get_submodule(head) if head else None
    except AttributeError:
        raise ValueError(f"{what} has no module {head!r}") from None
    if not isinstance(last, nn.Linear):
        raise ValueError(f"{what}'s module {head!r} is a {type(last).__name__}, not nn.Linear")
    parent, _, attr = head.rpartition(".")
    identity = nn.Identity()
    identity.training = last.training  # every module of net keeps its mode
    setattr(net.get_submodule(parent), attr, identity)
    if mean is None:  # (x - 0) / 1 is x exactly; [1, 1, 1, 1] broadcasts over any channels
        mean, std = (0.0,), (1.0,)
    model = AdaptedNet(net, last.in_features, last.out_features, mean, std, head=last)
    model.training = model.normalize.training = net.training  # net's mode, not a new one
    return model


def torchvision_classifier(name, num_classes=1000, image_size=224):
    """torchvision.models' classifier `name` (one of list_models(module=torchvision.models))
    with random weights (weights=None: nothing is downloaded); a ViT built for image_size.
    An unknown name is a ValueError."""
    import torchvision
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ValueError(f"unknown torchvision classifier {name!r}; torchvision "
                         f"{torchvision.__version__} has {', '.join(names[:4])}, ... (see "
                         f"torchvision.models.list_models())")
    extra = {"image_size": image_size} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)


def torchvision_preprocessing(name):
    """(mean, std, crop size) that the default weights torchvision publishes for classifier
    `name` declare (read from the weights' description: nothing is downloaded), or None."""
    import torchvision
    try:
        weights = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None
    default = getattr(weights, "DEFAULT", None) or next(iter(weights), None)
    transform = default.transforms() if default is not None else None
    if transform is None or not hasattr(transform, "mean"):
        return None
    return list(transform.mean), list(transform.std), transform.crop_size[0]


def user_classifier(spec):
    """The nn.Module that the function named by spec, "package.module:function", returns when
    called without arguments. The module is imported (its code runs) here and only here; it
    is looked up on sys.path and in the current folder. A malformed spec, a module that cannot
    be imported, a missing function or a return value that is not an nn.Module is a
    ValueError naming it; errors inside the user's function keep their traceback."""
    import importlib
    import os
    import sys
    module_name, _, function = str(spec).partition(":")
    if not module_name or not function or ":" in function:
        raise ValueError(f"--model must look like package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:  # a script's sys.path[0] is its own folder, not the cwd
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {spec}: cannot import {module_name} ({e})") from None
    build = getattr(module, function, None)
    if not callable(build):
        raise ValueError(f"--model {spec}: module {module_name} has no function {function}")
    net = build()
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model {spec}: {function}() returned a {type(net).__name__}, "
                         f"not an nn.Module")
    return net


# ----------------------------------------------------------------------------- training

@contextlib.contextmanager
def _mode(model, training):
    """The one mode context manager: model.train(training) inside the block, then every
    submodule given back the mode it had before."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


def eval_mode(model):
    """Run the block with model in eval mode (BatchNorm uses its running statistics and never
    updates them), then give every submodule back the mode it had."""
    return _mode(model, False)


def train_mode(model):
    """Run the block with model in train mode (BatchNorm normalises by the batch's statistics
    and updates its running ones), then give every submodule back the mode it had."""
    return _mode(model, True)


@contextlib.contextmanager
def cudnn_autotune(on):
    """Run the block with cuDNN's autotuning (torch.backends.cudnn.benchmark) on or off, then
    give the flag back. Autotuning times the algorithms of every new input shape once and
    keeps the fastest: a gain where shapes are fixed (training: the batch, its last batch and
    the attack's), a loss where they vary (APGD attacks the subset still robust, of any size,
    so each size would be tuned again). The CPU ignores the flag."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


def make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with Nesterov momentum; weight decay on weights (tensors of 2 or more dimensions),
    not on BatchNorm parameters and biases."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=True)


def sgd_epoch(model, opt, x, y, *, batch_size=128, lr_schedule=None, step0=0, prepare=None,
              amp=False, shard=None, reduce=None, generator=None):
    """One epoch of minibatch training on in-memory tensors x [N, ...], y [N]: the loop of
    adversarial training (advtrain.train_epoch) and of fine-tuning (transfer.finetune).

    The batches follow a random order drawn on the CPU, from `generator` or else the global
    generator (so every device trains on the same order), and copied once to x's device,
    where they are gathered; each
    batch moves to the model's device, is replaced by prepare(xb, yb) when given (e.g. an
    attack) and trained on in train mode with the mean cross-entropy, under bf16 autocast
    when amp; opt steps after lr_schedule (global step -> learning rate; None leaves the
    optimizer's rate) sets the rate; step0 is the global step of the first batch. shard
    (data-parallel training, every process drawing the same order): the indices of a global
    batch -> (this process's share, the weight of its mean loss; weight 0 marks a stand-in
    share, trained with no effect and counted nowhere); reduce: the sum over the
    processes of the totals [loss sum, correct, examples] (float64 on the device).

    Nothing in the loop waits for the host (DESIGN.md, Scale): the loss and the correct
    predictions are summed on the device and read once, after the last batch. A non-finite
    loss is recorded there (its first step and value) and raises FloatingPointError after
    the epoch, so the caller never saves the weights it poisoned. The model's mode is given
    back. Returns (mean loss, accuracy on the trained examples, next global step).
    """
    device = next(model.parameters()).device
    order = torch.randperm(len(x), generator=generator).to(x.device, non_blocking=True)
    # on the device: loss sum, correct, then the first non-finite loss's step and value
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    count, step = 0, step0
    with train_mode(model):
        for i in range(0, len(x), batch_size):
            idx, weight = order[i:i + batch_size], None
            if shard is not None:
                idx, weight = shard(idx)
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            counted = weight != 0  # weight 0: a stand-in that keeps the collectives in step
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if prepare is not None:
                    xb = prepare(xb, yb)
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
            if lr_schedule is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_schedule(step)
            opt.zero_grad(set_to_none=True)
            (loss if weight is None else loss * weight).backward()
            opt.step()
            step += 1
            count += len(yb) if counted else 0
            with torch.no_grad():
                first_bad = (sums[2] == 0) & ~torch.isfinite(loss)
                if counted:
                    sums[0] += loss.double() * len(yb)
                    sums[1] += (logits.argmax(1) == yb).sum()
                sums[2] = torch.where(first_bad, step - step0, sums[2])
                sums[3] = torch.where(first_bad, loss.double(), sums[3])
    totals = torch.cat([sums[:2], sums.new_full((1,), count)])  # [loss sum, correct, examples]
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, correct, count, bad_step, bad_loss = torch.cat([totals, sums[2:]]).tolist()
    if not math.isfinite(loss_sum):  # reduced: every process stops
        where = f"at step {bad_step:.0f} of the epoch" if bad_step else "in another process"
        raise FloatingPointError(f"loss is {bad_loss if bad_step else loss_sum} {where}")
    return loss_sum / count, correct / count, step


# ----------------------------------------------------------------------------- tensor helpers
# Shared by the attacks (advtrain.py), the Fisher estimators (fisher.py), feature extraction
# (transfer.py) and the inversion (invert.py); each copies out with this module.

def per_example_norm(t):
    """The L2 norm of each example of t [N, ...], shaped [N, 1, ..., 1] to divide t by;
    at least 1e-12, so a zero example divides to zero."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))


def l2_step(grad, size):
    """The normalised L2 step of the attacks and the inversion: size * grad / ||grad|| per
    example, grad [N, ...] -> [N, ...], each example moved `size` in L2 along its own gradient
    (so examples with small gradients move as far as the others). size: a number or a tensor
    that broadcasts against grad."""
    return size * grad / per_example_norm(grad)


def _describe(t):
    """What a value is, for an error message: 'float32 tensor [2, 3]' or its type."""
    return f"{str(t.dtype).replace('torch.', '')} tensor {list(t.shape)}" if torch.is_tensor(t) \
        else type(t).__name__


def check_images(x, name="x", high=1.0):
    """ValueError naming `name` unless x is a floating tensor of images [N, C, H, W], N >= 1,
    with every value in [0, high] (models take [0, 1] images and normalise inside; a
    normalised or NaN image is the mistake this catches). One reduction over x, read on the
    host."""
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point() or len(x) == 0:
        raise ValueError(f"{name} must be a float tensor of images [N, C, H, W] with N >= 1, "
                         f"got {_describe(x)}")
    if not bool(((x >= 0) & (x <= high)).all()):
        raise ValueError(f"{name} must hold images with values in [0, {high:g}], got values "
                         f"from {x.min().item():.4g} to {x.max().item():.4g}")


def check_labels(y, n, name="y"):
    """ValueError naming `name` unless y is an integer tensor of n class labels [n]. Shape and
    type only: nothing is read from the device (a label out of range fails in the loss)."""
    if (not torch.is_tensor(y) or y.dim() != 1 or len(y) != n or y.is_floating_point()
            or y.is_complex() or y.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor of class labels [{n}] (one per "
                         f"example), got {_describe(y)}")
