"""Evaluation on held-out images: accuracy of a classifier, on clean or transformed images.

Privacy metrics (PSNR, SSIM, attacks) live in `privoffload.privacy`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .data import DeviceData
from .train.common import Dist, autocast

Transform = Callable[[torch.Tensor], torch.Tensor]


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """What is really uploaded: the image rounded to 8-bit pixels."""
    return torch.round(x.clamp(0, 1) * 255) / 255


@torch.no_grad()
def accuracy(classifier: nn.Module, data: DeviceData, *, transform: Transform | None = None, quantize: bool = False,
             bf16: bool = False, batch_size: int = 1000, dist: Dist = Dist(), channels_last: bool = False) -> float:
    """Top-1 accuracy of `classifier` on `transform(x)` (e.g. an obfuscator), optionally 8-bit quantised.

    Under DDP each rank scores its stride of the images and the counts are summed.
    """
    was_training = classifier.training
    classifier.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    seen = torch.zeros((), dtype=torch.long, device=data.device)
    for xb, yb in data.batches(batch_size, rank=dist.rank, world=dist.world, channels_last=channels_last):
        with autocast(data.device, bf16):
            if transform is not None:
                xb = transform(xb).float()
            if quantize:
                xb = quantize8(xb)
            logits = classifier(xb)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
    classifier.train(was_training)
    return (dist.sum(correct).item()) / max(1, dist.sum(seen).item())
