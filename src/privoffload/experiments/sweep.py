"""The privacy-utility frontier: one obfuscator per lambda and seed, each attacked by the whole attack suite.

Layout: OUT/lam-<λ>/seed-<s>/obfuscator and OUT/lam-<λ>/seed-<s>/suite (ordinary run folders),
OUT/frontier.json, OUT/frontier.png. Privacy is the **strongest** attack of each suite (highest PSNR; the
target also takes the highest SSIM of any attack), never the co-trained D, which O can fool by making its
output worse than a guess. A point is the mean over seeds with its 95 % t-interval. Every run is started
with resume, so rerunning the same command continues an interrupted sweep and reuses finished runs; a
changed setting is refused by the run's config check.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import config as config_mod
from ..config import SweepConfig
from ..data import Dataset
from ..metrics import mean_ci
from ..privacy.suite import run_suite
from ..runs import last_record, read_metrics
from ..runtime import atomic_write_text, init_dist, pick_device
from ..train.loop import dataset_for
from ..train.obfuscator import train_obfuscator
from . import figures

# the project's target: obfuscated accuracy >= 90 % of clean, strongest attack <= 15 dB PSNR and <= 0.3 SSIM
TARGET = {"relative_accuracy": 0.9, "psnr_db": 15.0, "ssim": 0.3}


def wall_s(run: Path) -> float:
    """Training plus evaluation seconds over all epochs of a run (resumed runs included)."""
    return sum(r.get("time_s", 0.0) + r.get("eval_time_s", 0.0) for r in read_metrics(run))


def seed_result(lam: float, seed: int, obf_run: Path, suite_json: Path) -> dict:
    """One obfuscator's utility (its run's last evaluation) and privacy (its suite's strongest attack)."""
    obf = last_record(read_metrics(obf_run), "obfuscated_accuracy")
    suite = json.loads(suite_json.read_text())
    attacks = {k: r for k, r in suite["rows"].items() if r["kind"] == "attack"}
    return {"lam": lam, "seed": seed, "test_accuracy": obf["test_accuracy"],
            "quantized_obfuscated_accuracy": obf["quantized_obfuscated_accuracy"],
            "relative_accuracy": obf["quantized_obfuscated_accuracy"] / obf["test_accuracy"],
            "deobfuscator_psnr_db": obf["deobfuscator_psnr_db"], "strongest": suite["strongest"],
            "psnr_db": suite["strongest_psnr_db"], "ssim": suite["max_ssim"],
            "attacks": {k: {"psnr_db": r["psnr_db"], "ssim": r["ssim"]} for k, r in attacks.items()},
            "mean_image_psnr_db": suite["rows"]["mean image"]["psnr_db"],
            "obfuscator_wall_s": wall_s(obf_run), "obfuscator_run": str(obf_run), "suite": str(suite_json)}


def frontier_point(results: list[dict]) -> dict:
    """Mean and 95 % t-interval over seeds of each number, and whether the target is met (by the CIs)."""
    point = {"lam": results[0]["lam"], "seeds": [r["seed"] for r in results]}
    for key in ("test_accuracy", "quantized_obfuscated_accuracy", "relative_accuracy", "psnr_db", "ssim",
                "deobfuscator_psnr_db", "mean_image_psnr_db"):
        point[key], point[f"{key}_ci"] = mean_ci([r[key] for r in results])
    point["strongest"] = sorted({r["strongest"] for r in results})
    point["target_met"] = meets(point)
    return point


def meets(p: dict) -> bool:
    """The target holds only where the whole 95 % interval does (an unknown interval, one seed, never meets it)."""
    ci = {k: p[f"{k}_ci"] for k in TARGET}
    if any(v != v for v in ci.values()):  # nan
        return False
    return (p["relative_accuracy"] - ci["relative_accuracy"] >= TARGET["relative_accuracy"]
            and p["psnr_db"] + ci["psnr_db"] <= TARGET["psnr_db"] and p["ssim"] + ci["ssim"] <= TARGET["ssim"])


def sweep_lambda(cfg: SweepConfig, out: str | Path, *, data: Dataset | None = None, device: str = "auto",
                 data_root: str | Path | None = None) -> Path:
    """Train and attack one obfuscator per lambda and seed; returns the path of frontier.json."""
    out = Path(out)
    main = init_dist(pick_device(device)).main  # under torchrun, only rank 0 writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "sweep.toml", config_mod.to_toml(cfg))
    data = dataset_for(cfg.obfuscator, data, data_root)
    points, runs = [], []
    for lam in cfg.lams:
        results = []
        for seed in cfg.seeds:
            folder = out / f"lam-{lam:g}" / f"seed-{seed}"
            obf_run = folder / "obfuscator"
            train_obfuscator(dataclasses.replace(cfg.obfuscator, lam=lam, seed=seed), obf_run, resume=True, data=data,
                             device=device)
            suite = run_suite(dataclasses.replace(cfg.suite, obfuscator=str(obf_run)), folder / "suite", data=data,
                              device=device)
            results.append(seed_result(lam, seed, obf_run, suite))
        runs += results
        points.append(frontier_point(results))
        if main:  # after every lambda, so an interrupted sweep still shows what it has
            atomic_write_text(out / "frontier.json", json.dumps({"target": TARGET, "points": points, "runs": runs},
                                                                indent=2) + "\n")
            figures.frontier(points, out / "frontier.png", target=TARGET)
    return out / "frontier.json"
