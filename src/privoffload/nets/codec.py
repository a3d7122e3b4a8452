"""Table I's encoder-decoder, used both as the obfuscator O and as the deobfuscator D.

3x32x32 -> conv 32 -> bottleneck 32 (s2, 16x16) -> 64 (s2, 8x8) -> 128 (s2, 4x4)
        -> up 64 (8x8) -> up 32 (16x16) -> up 3 (32x32) -> sigmoid, an image in [0, 1].
"Bottleneck" is MobileNetV2's inverted residual; "Upsample Bottleneck" is x2 nearest-neighbour
upsampling and a stride-1 bottleneck (see docs/method-decisions.md). `width` scales every
channel count but the 3 output channels (32 is Table I).
"""

from __future__ import annotations

import torch
from torch import nn


class StridedDepthwise(nn.Conv2d):
    """A 3x3 depthwise convolution with stride 2 that runs in fp32 under CPU autocast.

    On CPUs, its bf16 backward takes 4-13x as long as fp32's (bench/obfuscator_precision.py), while every other
    layer of the codec is faster in bf16: fp32 here makes a whole step of the game 1.6x faster. Elsewhere (CUDA,
    or no autocast) it is a plain convolution. The weights are those of nn.Conv2d, so files do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class Bottleneck(nn.Module):
    """1x1 expand (x6) -> 3x3 depthwise (stride s) -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int = 6):
        super().__init__()
        mid = cin * expansion
        self.block = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            (StridedDepthwise if stride == 2 else nn.Conv2d)(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class UpBottleneck(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), Bottleneck(cin, cout, 1))


class Codec(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        w1, w2, w4 = width, 2 * width, 4 * width
        self.net = nn.Sequential(
            nn.Conv2d(3, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU6(inplace=True),
            Bottleneck(w1, w1, 2),
            Bottleneck(w1, w2, 2),
            Bottleneck(w2, w4, 2),
            UpBottleneck(w4, w2),
            UpBottleneck(w2, w1),
            UpBottleneck(w1, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images in [0, 1] -> images in [0, 1] of the same shape."""
        return torch.sigmoid(self.net(x))


def codec(width: int = 32) -> Codec:
    return Codec(width)
