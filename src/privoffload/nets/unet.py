"""A U-Net-style decoder: the stronger attacker against an obfuscator.

Same contract as the Table I codec (an image in [0, 1] in, an image in [0, 1] of the same shape
out), but with plain 3x3 convolutions and skip connections that carry each resolution's features
straight to the decoder, so whatever detail survives in O(x) is easy to recover.
32x32 (w) -> 16x16 (2w) -> 8x8 (4w) -> 4x4 (8w) -> back up, concatenating the skip at each scale.

The cloud also has C's answer for every upload (its softmax over the classes). `num_classes` > 0 makes the
U-Net label-aware: the answer enters as constant input planes beside the upload. `AnswerDecoder` rebuilds an
image from the answer alone, without a single pixel of the upload: what the class by itself gives away.
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


def answer_features(answer: torch.Tensor) -> torch.Tensor:
    """C's softmax [N, K] -> what a decoder reads of it [N, 2K]: the probabilities and their logarithms (scaled
    to about [-1, 0]), so that both the likely class and the ranking of the unlikely ones are easy to use."""
    p = answer.float()
    return torch.cat([p, p.clamp_min(1e-6).log() / 14], 1)


class UNet(nn.Module):
    def __init__(self, width: int = 32, *, channels: int = 3, size: tuple[int, int] = (32, 32), num_classes: int = 0):
        super().__init__()
        check_image(channels, size)
        self.width = width
        self.image = {"channels": channels, "size": tuple(size), **({"num_classes": num_classes} if num_classes else {})}
        ch = [width, 2 * width, 4 * width, 8 * width]
        self.stem = double_conv(channels + 2 * num_classes, ch[0])
        self.down = nn.ModuleList(double_conv(ch[i], ch[i + 1], stride=2) for i in range(3))
        self.up = nn.ModuleList(double_conv(ch[i + 1] + ch[i], ch[i]) for i in reversed(range(3)))
        self.head = nn.Conv2d(ch[0], channels, 1)

    def forward(self, x: torch.Tensor, answer: torch.Tensor | None = None) -> torch.Tensor:
        """x: images in [0, 1] -> images in [0, 1] of the same shape; a label-aware U-Net also reads C's answer."""
        if "num_classes" in self.image:
            planes = answer_features(answer).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], 1)
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.up:
            h = up(torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), skips.pop()], 1))
        return torch.sigmoid(self.head(h))


class AnswerDecoder(nn.Module):
    """An image from C's answer alone: a two-layer MLP (16w hidden units) from the answer's features to every pixel.

    The label-only reference: it never sees the upload, so whatever it recovers, any system that tells the cloud
    the class gives away."""

    def __init__(self, width: int = 32, *, channels: int = 3, size: tuple[int, int] = (32, 32), num_classes: int = 10):
        super().__init__()
        check_image(channels, size)
        self.width = width
        self.image = {"channels": channels, "size": tuple(size), "num_classes": num_classes}
        hidden = 16 * width
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, channels * size[0] * size[1]))

    def forward(self, answer: torch.Tensor) -> torch.Tensor:
        """C's softmax [N, K] -> images [N, C, H, W] in [0, 1]."""
        c, (h, w) = self.image["channels"], self.image["size"]
        return torch.sigmoid(self.mlp(answer_features(answer)).float()).view(-1, c, h, w)


def unet(width: int = 32, **image) -> UNet:
    return UNet(width, **image)
