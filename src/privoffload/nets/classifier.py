"""ResNet18 for the data set's images, with a width knob for quick runs.

It takes images in [0, 1] and normalises them itself (the data set's per-channel mean and deviation), so the
cloud classifies exactly the pixels a client uploads, obfuscated or not. The stem follows the input size:
below 64 pixels on the short side the CIFAR variant (3x3 convolution, stride 1, no max-pool); below 128 a
3x3 convolution of stride 2; from 128 up ImageNet's 7x7 stride-2 convolution and 3x3 max-pool. The first
stage thus always sees feature maps of about 32 pixels or fewer on the short side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def stem(channels: int, width: int, size: tuple[int, int]) -> nn.Module:
    short = min(size)
    if short < 64:
        return nn.Conv2d(channels, width, 3, 1, 1, bias=False)
    if short < 128:
        return nn.Conv2d(channels, width, 3, 2, 1, bias=False)
    return nn.Conv2d(channels, width, 7, 2, 3, bias=False)


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, num_classes: int = 10, *, channels: int = 3, size: tuple[int, int] = (32, 32),
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.width = width
        mean = tuple(mean or (CIFAR_MEAN if channels == 3 else (0.5,) * channels))
        std = tuple(std or (CIFAR_STD if channels == 3 else (0.25,) * channels))
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels})")
        self.image = {"channels": channels, "size": tuple(size), "num_classes": num_classes, "mean": mean, "std": std}
        self.register_buffer("mean", torch.tensor(mean).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, channels, 1, 1), persistent=False)
        self.conv1 = stem(channels, width, size)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1) if min(size) >= 128 else nn.Identity()
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images in [0, 1], [N, channels, *size] -> logits [N, classes]."""
        x = (x - self.mean) / self.std
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(width: int = 64, num_classes: int = 10, **image) -> ResNet18:
    return ResNet18(width, num_classes, **image)
