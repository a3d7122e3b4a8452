"""Fig. 4's images: test images, what the client uploads, and what each adversary rebuilds from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from .. import nets
from ..config import SuiteConfig
from ..data import Dataset, load_dataset, quantize8, select
from ..runs import load_attacker, load_classifier, load_codec, run_dataset
from ..runtime import frozen, pick_device
from .adaptive import MEAN, chosen
from .inversion import invert
from .uploads import recipe_classifier


def one_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first test image of each class, for the first n classes (chosen by label, whatever the order)."""
    classes = np.unique(labels)[:n]
    return np.array([int(np.flatnonzero(labels == c)[0]) for c in classes])


def attack_rows(suite: Path, obf: torch.nn.Module, upload: torch.Tensor, data: Dataset,
                dev: torch.device) -> dict[str, torch.Tensor]:
    """One row per attack of a suite folder, and the label-only decoder's: decoders run on the upload (and C's
    answer), the adaptive attack as it chose, inversions run again on these images with the suite's budget and the
    rate and TV weight it chose on validation (the per-image search does not depend on other images)."""
    cfg = config_mod.load(SuiteConfig, suite / "config.toml")
    answer = torch.softmax(frozen(load_classifier(recipe_classifier(cfg.obfuscator), dev))(upload).float(), 1)
    mean = torch.from_numpy(select(data, cfg.decoder.subset, cfg.seed)[0]).float().mean(0, keepdim=True).div(255).to(dev)
    rows = {}
    for name in cfg.attacks + (["label-only"] if (suite / "label-only" / "attacker.safetensors").exists() else []):
        if name in ("decoder", "label-aware", "label-only") or (name == "adaptive" and chosen(suite / name) != MEAN):
            attacker = frozen(load_attacker(suite / name, device=dev))
            rows[f"{name}\n({nets.arch_of(attacker)['arch']})"] = nets.decode(attacker, upload, answer)
        elif name == "adaptive":
            rows[f"{name}\n(chose the {MEAN})"] = mean.expand_as(upload)
        else:
            inv = cfg.part(name, str(suite / "decoder"))
            tuned = json.loads((suite / name / "tuning.json").read_text())["chosen"]
            start = frozen(load_attacker(inv.decoder, device=dev))(upload) if inv.start == "decoder" else mean
            with torch.enable_grad():
                rows[f"{name}\n({inv.steps} steps)"] = invert(obf, upload, start, steps=inv.steps, lr=tuned["lr"],
                                                               tv=tuned["tv"])
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

