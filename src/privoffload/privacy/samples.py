"""Fig. 4's images: test images, what the client uploads, and what adversaries rebuild from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import nets
from ..data import Dataset, load_dataset, quantize8
from ..runs import load_attacker, load_codec, run_dataset
from ..runtime import frozen, pick_device


def one_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first test image of each class, for the first n classes (chosen by label, whatever the order)."""
    classes = np.unique(labels)[:n]
    return np.array([int(np.flatnonzero(labels == c)[0]) for c in classes])


@torch.no_grad()
def sample_rows(obfuscator_run: str | Path, *, attack_runs: dict[str, str | Path] | None = None, n: int = 8,
                data: Dataset | None = None, device: str = "auto", data_root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Rows of images [n, C, H, W] in [0, 1]: originals (one per class), the 8-bit upload the cloud receives,
    and each adversary's rebuild from that upload: the co-trained D, then every attack in `attack_runs`."""
    dev = pick_device(device)
    obf = frozen(load_codec(obfuscator_run, device=dev))
    deobf = frozen(load_codec(obfuscator_run, "deobfuscator", device=dev))
    if data is None:
        dataset, image_size = run_dataset(obfuscator_run)
        data = load_dataset(dataset, data_root, image_size)
    x = torch.from_numpy(data.x_test[one_per_class(data.y_test, n)]).to(dev).float() / 255
    upload = quantize8(obf(x))
    rows = {"original": x, "uploaded\n(8-bit O(x))": upload, "co-trained D": deobf(upload)}
    for label, run in (attack_runs or {}).items():
        attacker = frozen(load_attacker(run, device=dev))
        rows[f"{label}\n({nets.arch_of(attacker)['arch']})"] = attacker(upload)
    return {k: v.cpu() for k, v in rows.items()}
