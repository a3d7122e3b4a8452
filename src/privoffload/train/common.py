"""What every training loop shares, written once: device and precision, DDP ranks, the run folder
(config, metrics log, weights, atomic checkpoints), the optimiser and its schedule, progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from .. import config as config_mod
from ..config import OptimConfig
from ..errors import UserError
from ..runtime import (Dist, atomic_path, atomic_write_bytes, autocast, frozen, init_dist, pick_device,  # noqa: F401
                       rank_device, rng_state, set_rng_state, use_bf16)


# ---------------------------------------------------------------- run folder

class RunDir:
    """A run folder: config.toml, metrics.jsonl, *.safetensors, checkpoint.pt. Only rank 0 writes."""

    def __init__(self, path: str | Path, dist: Dist = Dist()):
        self.path = Path(path)
        self.dist = dist
        if dist.main:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def start(self, cfg: Any, resume: bool) -> None:
        """Write the resolved config; refuse to overwrite a run, or to resume with another config."""
        cfg_path = self.path / "config.toml"
        new = config_mod.to_toml(cfg)
        if cfg_path.exists() or self.checkpoint_path.exists():
            if not resume:
                raise UserError(f"{self.path} already holds a run; pass --resume to continue it, or choose a new --out")
            if cfg_path.exists() and cfg_path.read_text() != new:
                raise UserError(f"{self.path}/config.toml differs from this config; resume with the same settings, or use a new --out")
        self.dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if self.dist.main:
            atomic_write_bytes(cfg_path, new.encode())

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (flushed, so a kill loses at most this line)."""
        if not self.dist.main:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def rewind(self, epoch: int) -> None:
        """On resume, drop metrics logged after the checkpoint's epoch (the epoch is done again)."""
        if not self.dist.main:
            return
        kept = [r for r in self.metrics() if r.get("epoch", 0) <= epoch]
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.dist.main:
            with atomic_path(self.checkpoint_path) as tmp:
                torch.save(state, tmp)
        self.dist.barrier()

    def load_checkpoint(self, arch: dict[str, Any]) -> dict[str, Any] | None:
        """The last checkpoint, if any; an error if it was written for other networks."""
        if not self.checkpoint_path.exists():
            return None
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{self.checkpoint_path} is unreadable ({type(e).__name__}); delete it to start the run over") from None
        if state.get("arch") != arch:
            raise UserError(
                f"{self.checkpoint_path} is for {state.get('arch')}, this config builds {arch}; use the same settings or a new --out"
            )
        return state

    def restore(self, arch: dict[str, Any], parts: dict[str, Any], resume: bool) -> int:
        """On resume: load the last checkpoint into `parts` (name -> anything with load_state_dict),
        restore the RNG and drop metrics logged after it. Returns the epoch to start from."""
        if not resume:
            return 0
        state = self.load_checkpoint(arch)
        start = 0
        if state is not None:
            for key, part in parts.items():
                part.load_state_dict(state[key])
            set_rng_state(state["rng"])
            start = state["epoch"]
        self.rewind(start)
        return start

    def checkpoint(self, arch: dict[str, Any], epoch: int, parts: dict[str, Any]) -> None:
        """Save `parts` (the same names `restore` takes), the RNG and the number of finished epochs."""
        self.save_checkpoint({"arch": arch, "epoch": epoch, "rng": rng_state(),
                              **{key: part.state_dict() for key, part in parts.items()}})

    def finish(self) -> None:
        """Mark the run complete; the checkpoint stays so that a finished run can be extended."""
        if self.dist.main:
            atomic_write_bytes(self.path / "DONE", b"")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    f = Path(path) / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def is_done(path: str | Path) -> bool:
    return (Path(path) / "DONE").exists()


# ---------------------------------------------------------------- optimiser and schedule

def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    """Per-step multiplier: linear warm-up, then linear or cosine decay to 0, or constant."""
    total = max(1, steps_per_epoch * epochs)
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1 - frac)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- progress

class Progress:
    """A progress bar (stage, epoch, ETA) on a terminal, nothing per step elsewhere; under torchrun
    only rank 0 shows anything."""

    def __init__(self, stage: str, epochs: int, start_epoch: int):
        self.stage, self.epochs, self.start_epoch = stage, epochs, start_epoch
        self.t0 = time.perf_counter()
        self.bar = None
        self.quiet = os.environ.get("RANK", "0") != "0"
        if not self.quiet and sys.stderr.isatty() and os.environ.get("PRIVOFFLOAD_PROGRESS", "1") != "0":
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                    TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = None

    @contextlib.contextmanager
    def epoch(self, epoch: int, steps: int) -> Iterator[Any]:
        if self.bar is not None:
            self.task = self.bar.add_task(f"{self.stage} epoch {epoch}/{self.epochs}", total=steps)
        try:
            yield self
        finally:
            if self.bar is not None:
                self.bar.remove_task(self.task)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def line(self, epoch: int, text: str) -> None:
        """One plain line per epoch, with the ETA of the stage."""
        done = epoch - self.start_epoch
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.epochs - epoch)
        msg = f"{self.stage} epoch {epoch}/{self.epochs} {text} eta {eta:.0f}s"
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
