"""TensorBoard event files from run folders, where PyTorch users look at curves (`privoffload tensorboard RUN`).

metrics.jsonl stays the one record of a run; the event files are a view of it, written again from the logs
each time (so a resumed or extended run is shown as it is now). Every run folder under RUN becomes one
TensorBoard run, named by its path (`seed-0/drift`); every number of a record is a scalar at its epoch
(or re-sync step), nested ones by their path (`probes/O0/quantized_obfuscated_accuracy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..runs import read_metrics

STEP_KEYS = ("epoch", "step")
SKIPPED = ("stage", "time", "images_per_s")  # bookkeeping, not curves


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        if key in STEP_KEYS or (not prefix and key in SKIPPED):
            continue
        if isinstance(value, dict):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def export(folder: str | Path, logdir: str | Path | None = None) -> Path:
    """Write event files for every run folder under `folder` into `logdir` (default FOLDER/tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("TensorBoard is not installed: pip install 'privoffload[tensorboard]'") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a run folder or a protocol folder")
    logdir = Path(logdir) if logdir else folder / "tensorboard"
    runs = sorted(p.parent for p in folder.rglob("metrics.jsonl") if logdir not in p.parents)
    if not runs:
        raise UserError(f"{folder} holds no run folder (no metrics.jsonl below it)")
    for run in runs:
        name = run.relative_to(folder).as_posix() if run != folder else run.name
        for old in (logdir / name).glob("events.out.tfevents.*"):  # the view is written anew; nothing else is touched
            old.unlink()
        with SummaryWriter(str(logdir / name)) as writer:
            for i, record in enumerate(read_metrics(run)):
                step = next((int(record[k]) for k in STEP_KEYS if k in record), i)
                for tag, value in scalars(record):
                    writer.add_scalar(tag, value, step)
    return logdir
