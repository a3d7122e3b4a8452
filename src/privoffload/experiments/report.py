"""report.md and the figures of a protocol folder, from its logs alone (`privoffload plot RUN`).

Each seed folder is read into its records: every finished stage's typed record (stage.read), so that a field a
finished stage should have logged and did not stops the report with a message naming the file. Then every
registered stage that has a section writes it, in the protocol's order, from the records of the seeds that
finished it: means over the seeds with their 95 % t-interval (`stats.estimate`), n printed. Only Fig. 4 runs
networks (seed 0's final O and its attacks on one test image per class); nothing trains.
"""

from __future__ import annotations

import json
import os
import platform
import tomllib
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runs import is_done
from ..runtime import atomic_write_text
from .stage import Records
from .stages import STAGES
from .stats import estimate


def seed_folders(out: Path) -> list[Path]:
    folders = sorted((p for p in out.glob("seed-*") if p.is_dir() and p.name.split("-")[1].isdigit()),
                     key=lambda p: int(p.name.split("-")[1]))
    if not any(is_done(f / "c0") for f in folders):
        raise UserError(f"{out} has no seed folder with a finished baseline classifier yet; run `privoffload reproduce` first")
    return folders


def seed_records(folder: Path, dataset: str) -> Records:
    """Every finished stage of one seed, as its record."""
    return Records(folder.name, dataset, {s.name: s.read(folder / s.name) for s in STAGES if is_done(folder / s.name)})


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu} (host {platform.node()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_report(out: str | Path, data_root: str | Path | None = None, **_: Any) -> Path:
    """Draw the figures and write report.md of a protocol folder from its seeds' logs."""
    out = Path(out)
    folders = seed_folders(out)
    setting = tomllib.loads((out / "config.toml").read_text()) if (out / "config.toml").exists() else {}
    profile, dataset = setting.get("profile", "?"), setting.get("dataset", "cifar10")
    seeds = [seed_records(f, dataset) for f in folders]
    k = len(seeds)
    lines = [f"# Reproduction report (data set `{dataset}`, profile `{profile}`, {k} seed{'s' if k > 1 else ''}: "
             f"{', '.join(r.name for r in seeds)})", "",
             "A figure is the mean over the seeds that finished its stages ± the half-width of its 95 % t-interval; a "
             "target is met only when the whole interval is on its side. Stages run and not shown here: none of their "
             "seeds has finished them. Each section says its n."]
    drawn: list[str] = []
    for stage in STAGES:
        having = [r for r in seeds if stage.name in r]
        if not having:
            continue
        if stage.report is not None:
            lines += [""] + stage.report(having)
        if stage.figures is not None:
            drawn += [p.name for p in stage.figures(having, out, folders=[f for f in folders if f.name in
                                                                        {r.name for r in having}], data_root=data_root)]
    lines += timing_lines(folders)
    source = (out / "data.txt").read_text().strip() if (out / "data.txt").exists() else "unknown"
    lines += ["", f"Machine: {machine()}.", "", f"Data: {source}."]
    if "lossy" in source:
        lines += ["", "This CIFAR-10 copy is lossy (JPEG quality 75, 4:2:0 chroma; median PSNR 30.5 dB against the "
                  "originals): accuracies are a few points off what the real data set gives."]
    lines += ["", f"Figures: {', '.join(drawn) or 'none yet'}."]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def timing_lines(folders: list[Path]) -> list[str]:
    times = [json.loads((f / "timings.json").read_text()) for f in folders if (f / "timings.json").exists()]
    if not times:
        return []
    lines = ["", "## Wall time (seconds per seed, mean over the seeds; seeds run side by side share the cores)", "",
             "| stage | seconds | seeds |", "|---|---|---|"]
    for s in STAGES:
        values = [t[s.name] for t in times if s.name in t]
        if values:
            lines.append(f"| {s.name} | {estimate(values).mean:.0f} | {len(values)} |")
    lines.append(f"| total | {sum(sum(t.values()) for t in times) / len(times):.0f} | {len(times)} |")
    return lines
