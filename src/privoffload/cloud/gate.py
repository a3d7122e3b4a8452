"""The swap gate: a classifier version is published only if it keeps the registered obfuscators working.

For every obfuscator version k registered with the model, on held-out images x (the test split's, never trained
on by any classifier or obfuscator) and their 8-bit uploads u = O_k(x), exactly as a client sends them:

    accuracy            the new classifier's accuracy on u
    negative_flip_rate  the share of images that the classifier k was registered with (`works_with`) classifies
                        right from u and the new one wrong

The reference is the registered version, not the one serving now: measured against the serving version, every
update could flip a few more and the damage would add up unseen; measured against the version the obfuscator was
known to work with, it cannot. A rate above `max_flip_rate` refuses the version (nothing is written), unless
`allow_breaking`: then it is published with k marked unsupported, and k's clients are answered by the newest
served version that supports it (cloud/dataplane.py). The gate measures and decides against a fixed bound; it
tunes nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import to_pixels
from ..errors import UserError
from .repository import Repository

BATCH = 256


@torch.inference_mode()
def _classes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i:i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])


@torch.inference_mode()
def measure(repo: Repository, name: str, model: nn.Module, images: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """{obfuscator version: {accuracy, negative_flip_rate, images, reference}} of `model` (eval mode) on
    uint8 `images` [N, C, H, W] with their `labels`, for every obfuscator registered with `name`."""
    x, y = torch.from_numpy(images).float().div_(255), torch.from_numpy(labels).long()
    out = {}
    for k in repo.obfuscators(name):
        registration = repo.obfuscator(name, k)
        obfuscator = repo.load_obfuscator(name, k)
        uploads = torch.cat([to_pixels(obfuscator(x[i:i + BATCH])) for i in range(0, len(x), BATCH)]).float() / 255
        old = repo.load(name, registration.works_with).model
        right_old, right_new = _classes(old, uploads) == y, _classes(model, uploads) == y
        out[str(k)] = {"accuracy": round(right_new.float().mean().item(), 4),
                       "negative_flip_rate": round((right_old & ~right_new).float().mean().item(), 4),
                       "images": len(y), "reference": registration.works_with}
    return out


def decide(measured: dict[str, dict], max_flip_rate: float, allow_breaking: bool) -> dict[str, dict]:
    """Mark each obfuscator version supported or not; a one-line UserError for the first one the version breaks,
    unless `allow_breaking`."""
    for k, m in measured.items():
        m["supported"] = m["negative_flip_rate"] <= max_flip_rate
        if not m["supported"] and not allow_breaking:
            raise UserError(f"refused: obfuscator version {k}'s negative-flip rate is {m['negative_flip_rate']:.4f} "
                            f"(above --max-flip-rate {max_flip_rate:g}; accuracy {m['accuracy']:.4f} on "
                            f"{m['images']} images); nothing published; --allow-breaking publishes it anyway, "
                            f"serving that obfuscator's clients an older version")
    return measured
