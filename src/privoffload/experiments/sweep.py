"""The privacy-utility frontier: one obfuscator per lambda, each attacked by a fresh deobfuscator.

Layout: OUT/lam-<λ>/obfuscator, OUT/lam-<λ>/attack (ordinary run folders), OUT/frontier.json,
OUT/frontier.png. Every run is started with resume, so rerunning the same command continues an
interrupted sweep and reuses finished lambdas; a changed setting is refused by the run's config check.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import config as config_mod
from ..config import SweepConfig
from ..data import Dataset
from ..privacy.attack import train_attack
from ..runs import last_record, read_metrics
from ..runtime import atomic_write_text, init_dist, pick_device
from ..train.loop import dataset_for
from ..train.obfuscator import train_obfuscator
from . import figures

POINT_KEYS = ("test_accuracy", "obfuscated_accuracy", "quantized_obfuscated_accuracy", "deobfuscator_psnr_db",
              "deobfuscator_ssim", "attacker_psnr_db", "attacker_ssim")


def wall_s(run: Path) -> float:
    """Training plus evaluation seconds over all epochs of a run (resumed runs included)."""
    return sum(r.get("time_s", 0.0) + r.get("eval_time_s", 0.0) for r in read_metrics(run))


def frontier_point(lam: float, obf_run: Path, attack_run: Path) -> dict:
    point = {"lam": lam, **last_record(read_metrics(obf_run), "obfuscated_accuracy"),
             **last_record(read_metrics(attack_run), "attacker_psnr_db")}
    point = {k: point[k] for k in ("lam", *POINT_KEYS)}
    point.update(obfuscator_wall_s=wall_s(obf_run), attack_wall_s=wall_s(attack_run),
                 obfuscator_run=str(obf_run), attack_run=str(attack_run))
    return point


def sweep_lambda(cfg: SweepConfig, out: str | Path, *, data: Dataset | None = None, device: str = "auto",
                 data_root: str | Path | None = None) -> Path:
    """Train and attack one obfuscator per lambda; returns the path of frontier.json."""
    out = Path(out)
    main = init_dist(pick_device(device)).main  # under torchrun, only rank 0 writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "sweep.toml", config_mod.to_toml(cfg))
    data = dataset_for(cfg.obfuscator, data, data_root)
    points = []
    for lam in cfg.lams:
        folder = out / f"lam-{lam:g}"
        obf_run, attack_run = folder / "obfuscator", folder / "attack"
        train_obfuscator(dataclasses.replace(cfg.obfuscator, lam=lam), obf_run, resume=True, data=data, device=device)
        train_attack(dataclasses.replace(cfg.attack, obfuscator=str(obf_run)), attack_run, resume=True, data=data,
                     device=device)
        points.append(frontier_point(lam, obf_run, attack_run))
        if main:  # after every lambda, so an interrupted sweep still shows what it has
            atomic_write_text(out / "frontier.json", json.dumps(points, indent=2) + "\n")
            figures.frontier(points, out / "frontier.png")
    return out / "frontier.json"
