"""Fig. 4's images: test images, what the client uploads, and what adversaries rebuild from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import nets
from ..data import Cifar10, load_cifar10
from ..metrics import quantize8
from ..train.common import frozen, pick_device
from ..train.obfuscator import load_obfuscator, run_weights


@torch.no_grad()
def sample_rows(obfuscator_run: str | Path, *, attack_run: str | Path | None = None, n: int = 8,
                data: Cifar10 | None = None, device: str = "auto", data_root: str | None = None) -> dict[str, torch.Tensor]:
    """Rows of images [n, 3, 32, 32] in [0, 1]: original, 8-bit upload, co-trained D's and the attacker's rebuilds.

    The n test images are evenly spaced over the test split, so they span the classes.
    """
    dev = pick_device(device)
    obf = frozen(load_obfuscator(obfuscator_run, dev))
    deobf = frozen(load_obfuscator(obfuscator_run, dev, name="deobfuscator"))
    data = data or load_cifar10(data_root)
    idx = np.linspace(0, len(data.y_test) - 1, n).astype(int)
    x = torch.from_numpy(data.x_test[idx]).to(dev).float() / 255
    upload = quantize8(obf(x))
    rows = {"original": x, "obfuscated\n(uploaded)": upload, "co-trained D": deobf(upload)}
    if attack_run is not None:
        attacker = frozen(nets.load(run_weights(attack_run, "attacker.safetensors", "attack"), device=dev))
        rows[f"fresh attacker\n({nets.arch_of(attacker)['arch']})"] = attacker(upload)
    return {k: v.cpu() for k, v in rows.items()}
