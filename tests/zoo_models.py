"""Classifiers of a user's own code, for `--model tests.zoo_models:FUNCTION` in
tests/test_zoo.py: each function, called without arguments, returns an nn.Module (normalised
images -> logits), as a user's module would. Small, seeded, CPU-fast; nothing is downloaded."""
import torch
import torch.nn as nn


def tiny_vit():
    """A torchvision VisionTransformer built small: 32x32 images, 8x8 patches, 2 layers of
    width 32, 10 classes; its head (heads.head) sees the class token [N, 32]."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


class SelfNormalising(nn.Module):
    """A small CNN that normalises its own [0, 1] input by buffers mu and sigma, as
    RobustBench's models do; its head is `fc` after a global pool: features [N, 16]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1))
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        z = self.conv((x - self.mu) / self.sigma)
        return self.fc(z.mean((2, 3)))


def self_normalising():
    torch.manual_seed(1)
    return SelfNormalising()


def conv_head():
    """A classifier whose last layer is a 1x1 convolution (as SqueezeNet's): no linear head."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def not_a_module():
    return "a string"
