"""A U-Net-style decoder: the stronger attacker against an obfuscator.

Same contract as the Table I codec (an image in [0, 1] in, an image in [0, 1] of the same shape
out), but with plain 3x3 convolutions and skip connections that carry each resolution's features
straight to the decoder, so whatever detail survives in O(x) is easy to recover.
32x32 (w) -> 16x16 (2w) -> 8x8 (4w) -> 4x4 (8w) -> back up, concatenating the skip at each scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codec import check_image


def double_conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, width: int = 32, *, channels: int = 3, size: tuple[int, int] = (32, 32)):
        super().__init__()
        check_image(channels, size)
        self.width = width
        self.image = {"channels": channels, "size": tuple(size)}
        ch = [width, 2 * width, 4 * width, 8 * width]
        self.stem = double_conv(channels, ch[0])
        self.down = nn.ModuleList(double_conv(ch[i], ch[i + 1], stride=2) for i in range(3))
        self.up = nn.ModuleList(double_conv(ch[i + 1] + ch[i], ch[i]) for i in reversed(range(3)))
        self.head = nn.Conv2d(ch[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images in [0, 1] -> images in [0, 1] of the same shape."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.up:
            h = up(torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), skips.pop()], 1))
        return torch.sigmoid(self.head(h))


def unet(width: int = 32, **image) -> UNet:
    return UNet(width, **image)
