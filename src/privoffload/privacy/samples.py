"""Fig. 4's images: test images, what the client uploads, and what each adversary rebuilds from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from .. import nets
from ..config import SuiteConfig
from ..data import Dataset, load_dataset, quantize8, select
from ..runs import load_attacker, load_codec, run_dataset
from ..runtime import frozen, pick_device
from .inversion import invert


def one_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first test image of each class, for the first n classes (chosen by label, whatever the order)."""
    classes = np.unique(labels)[:n]
    return np.array([int(np.flatnonzero(labels == c)[0]) for c in classes])


def attack_rows(suite: Path, obf: torch.nn.Module, upload: torch.Tensor, data: Dataset,
               dev: torch.device) -> dict[str, torch.Tensor]:
    """One row per attack of a suite folder: decoders run on the upload, inversions run again on these images
    with the suite's settings (the same budget; the per-image optimisation does not depend on other images)."""
    cfg = config_mod.load(SuiteConfig, suite / "config.toml")
    rows = {}
    for name in cfg.attacks:
        if name in ("decoder", "adaptive"):
            attacker = frozen(load_attacker(suite / name, device=dev))
            rows[f"{name}\n({nets.arch_of(attacker)['arch']})"] = attacker(upload)
        else:
            inv = cfg.part(name, str(suite / "decoder"))
            if inv.start == "decoder":
                start = frozen(load_attacker(inv.decoder, device=dev))(upload)
            else:
                start = torch.from_numpy(select(data, inv.subset, inv.seed)[0]).float().mean(0, keepdim=True).div(255).to(dev)
            with torch.enable_grad():
                rows[f"{name}\n({inv.steps} steps)"] = invert(obf, upload, start, steps=inv.steps, lr=inv.lr, tv=inv.tv)
    return rows


@torch.no_grad()
def sample_rows(obfuscator_run: str | Path, *, attack_runs: dict[str, str | Path] | None = None,
                suite: str | Path | None = None, n: int = 8, data: Dataset | None = None, device: str = "auto",
                data_root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Rows of images [n, C, H, W] in [0, 1]: originals (one per class), the 8-bit upload the cloud receives,
    and each adversary's rebuild from that upload: the co-trained D, every attack in `attack_runs`, and every
    attack of the attack-suite folder `suite`."""
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
    if suite is not None:
        rows.update(attack_rows(Path(suite), obf, upload, data, dev))
    return {k: v.cpu() for k, v in rows.items()}

