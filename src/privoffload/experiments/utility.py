"""What utility costs (`privoffload sweep-utility`): O alone against a frozen C (lam = 0, no adversary), one run per
width x epoch budget x training images x loss, each scored on a validation split of training images.

Utility is O's share of clean accuracy on that split: C's accuracy on the 8-bit uploads over C's accuracy on the clean
images. A point trains until its validation utility has not improved for `patience` epochs (converged) or its budget
is spent ("not converged" in the table); its cost is the seconds of its training steps and validations on this
machine. The test split is never read for the table: it is what the chosen recipe is finally scored on.

Layout: OUT/sweep.toml, OUT/<point>/ (an ordinary obfuscator run folder), OUT/utility.json, OUT/utility.png. A
finished point (DONE) is reused as it is; an interrupted one resumes from its checkpoint, so rerunning the same
command continues a sweep; a point whose settings changed is refused (a new --out, or delete that folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import config as config_mod
from ..config import ObfuscatorConfig, UtilitySweepConfig
from ..data import Dataset
from ..runs import read_metrics
from ..runtime import atomic_write_text, init_dist, pick_device
from ..train.loop import dataset_for
from ..train.obfuscator import train_obfuscator
from . import figures


def point_name(cfg: ObfuscatorConfig) -> str:
    """w8-e16-first-10000-distill: the folder of one point."""
    return f"w{cfg.width}-e{cfg.epochs}-{cfg.subset.replace(':', '-')}-{'distill' if cfg.distill else 'ce'}"


def point_result(cfg: ObfuscatorConfig, run: Path) -> dict:
    """One point's row: its validation utility at the end and at best, epochs run, cost, and whether it converged."""
    records = [r for r in read_metrics(run) if "val_utility" in r]
    if not records:
        raise ValueError(f"{run} has no validation record")
    last = records[-1]
    best = max(records, key=lambda r: r["val_utility"])
    stalled = last["epoch"] - best["epoch"]
    return {"point": run.name, "width": cfg.width, "budget": cfg.epochs, "epochs": last["epoch"], "subset": cfg.subset,
            "loss": "distill" if cfg.distill else "ce", "utility": last["val_utility"], "best_utility": best["val_utility"],
            "best_epoch": best["epoch"], "val_accuracy": last["val_accuracy"],
            "val_upload_accuracy": last["val_upload_accuracy"], "converged": bool(cfg.patience and stalled >= cfg.patience),
            "seconds": sum(r.get("time_s", 0.0) + r.get("val_time_s", 0.0) for r in records),
            "curve": {r["epoch"]: r["val_utility"] for r in records}, "run": str(run)}


def table(results: list[dict]) -> list[str]:
    """The sweep as a Markdown table, one row per point."""
    lines = ["| point | width | epochs (budget) | images | loss | share of clean (best, epoch) | seconds | converged |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['point']} | {r['width']} | {r['epochs']} ({r['budget']}) | {r['subset']} | {r['loss']} | "
                     f"{r['utility']:.3f} ({r['best_utility']:.3f}, {r['best_epoch']}) | {r['seconds']:.0f} | "
                     f"{'yes' if r['converged'] else 'not converged'} |")
    return lines


def sweep_utility(cfg: UtilitySweepConfig, out: str | Path, *, data: Dataset | None = None, device: str = "auto",
                  data_root: str | Path | None = None) -> Path:
    """Train (or reuse) every point, then write utility.json and utility.png; returns the path of utility.json."""
    out = Path(out)
    main = init_dist(pick_device(device)).main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "sweep.toml", config_mod.to_toml(cfg))
    data = dataset_for(cfg.obfuscator, data, data_root)
    results = []
    for point in cfg.points():
        run = out / point_name(point)
        train_obfuscator(point, run, resume=True, data=data, device=device)  # a finished run: its config checked, reused
        results.append(point_result(point, run))
        if main:  # after every point, so an interrupted sweep still shows what it has
            atomic_write_text(out / "utility.json", json.dumps({"points": results}, indent=2) + "\n")
            figures.utility_cost(results, out / "utility.png")
    return out / "utility.json"
