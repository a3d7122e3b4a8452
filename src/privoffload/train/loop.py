"""The one training skeleton: set up -> epochs of steps -> evaluate, log, save, checkpoint.

Each trainer (classifier, obfuscator, attacker) is a `Task`: its networks and optimisers, one step on a
batch, and its evaluation. Everything around that is written once, here: device and precision, DDP
ranks, data resident on the device, the run folder, per-epoch seeds, resume after a kill, progress.

    ctx = Context.open(cfg, out, ...)      # device, ranks, train/test data on the device
    task = SomeTask(ctx)                   # its inputs (checked before anything is written), networks, optimisers
    fit(ctx, task, resume=...)             # the run folder: config.toml, then resume from its checkpoint
    for epoch: for batch: task.step(x, y)  # shuffled, optionally flipped batches straight from the device
               record = means of the step's numbers (+ task.evaluate() when due)
               log -> weights -> checkpoint (its epoch says what is complete)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import nets
from ..config import OptimConfig, TrainConfig
from ..data import Dataset, DeviceData, load_dataset, parse_size, select, subset_indices
from ..errors import UserError
from ..runs import RunDir
from ..runtime import Dist, autocast, epoch_seed, init_dist, pick_device, rank_device, use_bf16


# ---------------------------------------------------------------- optimiser and schedule

def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def schedule_factor(cfg: OptimConfig, total: int, warm: int) -> Callable[[int], float]:
    """Per-step multiplier of the rate: linear warm-up over `warm` steps, then linear or cosine decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.schedule == "linear":
            return 1 - frac
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    return factor


def make_schedule(opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: float):
    """The schedule of `cfg` over `epochs` epochs of `steps_per_epoch` steps (warm-up in epochs too)."""
    total = max(1, round(steps_per_epoch * epochs))
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg, total, warm))


# ---------------------------------------------------------------- progress

class Progress:
    """A progress bar (stage, epoch, ETA) on a terminal, one plain line per epoch elsewhere; quiet on ranks > 0."""

    def __init__(self, stage: str, epochs: int, start_epoch: int, quiet: bool = False):
        self.stage, self.epochs, self.start_epoch, self.quiet = stage, epochs, start_epoch, quiet
        self.t0 = time.perf_counter()
        self.bar = None
        if not quiet and sys.stderr.isatty() and os.environ.get("PRIVOFFLOAD_PROGRESS", "1") != "0":
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
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(epoch - self.start_epoch, 1) * (self.epochs - epoch)
        msg = f"{self.stage} epoch {epoch}/{self.epochs} {text} eta {eta:.0f}s"
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------- the skeleton

def dataset_for(cfg: Any, data: Dataset | None = None, data_root: str | Path | None = None) -> Dataset:
    """The data set a config names (`dataset`, `image_size`): `data` when it is that one, else loaded."""
    if data is None:
        return load_dataset(cfg.dataset, data_root, cfg.image_size)
    size = parse_size(cfg.image_size)
    if data.name != cfg.dataset or (size is not None and data.shape[1:] != size):
        raise UserError(f"this run is set for the data set {cfg.dataset!r} {cfg.image_size}, but was handed {data.name!r} "
                        f"at {data.shape[1]}x{data.shape[2]}")
    return data


def check_input(model: nn.Module, data: Dataset, what: str) -> nn.Module:
    """Refuse a network built for other images than the data set's (a classifier also for another class count)."""
    want = nets.image_of(model)
    c, h, w = data.shape
    got = {"channels": c, "size": (h, w)}
    if "num_classes" in want:
        got["num_classes"] = len(data.classes)
    if any(want[k] != v for k, v in got.items()):
        raise UserError(f"{what} takes {'x'.join(map(str, nets.image_shape(model)))} images"
                        f"{' and ' + str(want['num_classes']) + ' classes' if 'num_classes' in want else ''}, but the "
                        f"data set {data.name} gives {c}x{h}x{w}{' and ' + str(len(data.classes)) + ' classes' if 'num_classes' in want else ''}")
    return model

def held_out(n: int, val_split: float, subset: str) -> int:
    """How many of a subset's n images a validation share holds out (at least one where the share is > 0)."""
    holdout = max(1, round(val_split * n)) if val_split > 0 else 0
    if holdout and holdout >= n:
        raise UserError(f"a validation split of {val_split:g} leaves none of the {n} images of subset {subset} to train on; "
                        "lower val_split")
    return holdout


@dataclass
class Context:
    """What a task is built from: its settings, where it runs, its data on the device and its run folder."""

    cfg: TrainConfig
    device: torch.device
    dist: Dist
    run: RunDir
    bf16: bool
    data: Dataset
    train: DeviceData
    test: DeviceData
    batch: int  # images per step on this rank
    steps: int  # steps per epoch
    val: DeviceData | None = None  # the validation split, held out of the training subset

    @classmethod
    def open(cls, cfg: TrainConfig, out: str | Path, *, data: Dataset | None = None, device: str = "auto",
             data_root: str | Path | None = None, val_split: float = 0.0, val_subset: str = "") -> "Context":
        """Set everything up but the run folder's contents: `fit` starts the run once the task has found its inputs.

        `val_split` > 0 carves that share of the training subset (its last images) into `val`, a validation split
        that training never sees (early stopping reads it, never the test split); `val_subset` names the training
        images of `val` instead, and those of them the training subset holds are taken out of it."""
        dev = rank_device(pick_device(device))
        dist = init_dist(dev)
        run = RunDir(out, dist)
        data = dataset_for(cfg, data, data_root)
        if val_subset:
            held = subset_indices(val_subset, len(data.y_train), cfg.seed)
            kept = np.setdiff1d(subset_indices(cfg.subset, len(data.y_train), cfg.seed), held)
            x, y = data.x_train[kept], data.y_train[kept]
            val = DeviceData(data.x_train[held], data.y_train[held], dev)
        else:
            x, y = select(data, cfg.subset, cfg.seed)
            holdout = held_out(len(y), val_split, cfg.subset)
            val = DeviceData(x[len(y) - holdout:], y[len(y) - holdout:], dev) if holdout else None
            x, y = x[:len(y) - holdout], y[:len(y) - holdout]
        train = DeviceData(x, y, dev)
        test = DeviceData(*select(data, cfg.test_subset, split="test"), dev)  # the same test images whatever the seed
        batch = cfg.batch_size // dist.world
        steps = train.steps(batch, drop_last=True, world=dist.world)
        if steps == 0:
            raise UserError(f"subset {cfg.subset} has {len(train)} images, fewer than one batch of {cfg.batch_size}; "
                            "lower batch_size")
        torch.manual_seed(cfg.seed)  # networks built after this start the same on every rank
        return cls(cfg, dev, dist, run, use_bf16(cfg.precision, dev), data, train, test, batch, steps, val)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def place(self, model: nn.Module) -> nn.Module:
        """A network on this device, in this run's memory layout."""
        return model.to(self.device, memory_format=self.memory_format)

    def ddp(self, model: nn.Module) -> nn.Module:
        """The network to step through: wrapped for DDP under torchrun, itself otherwise."""
        return DDP(model) if self.dist.world > 1 else model

    def optimizer(self, params, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, Any]:
        """An optimiser and its per-step schedule over the whole run."""
        opt = make_optimizer(params, cfg)
        return opt, make_schedule(opt, cfg, self.steps, self.cfg.epochs)

    def autocast(self):
        return autocast(self.device, self.bf16)

    def batches(self, epoch: int, indices: bool = False):
        """This rank's shuffled (optionally flipped) batches of one epoch; the seed fixes order and flips. With
        `indices`, each batch also says its images' positions in `train` and which were mirrored."""
        return self.train.batches(self.batch, shuffle=True, flip_images=self.cfg.flip, seed=epoch_seed(self.cfg.seed, epoch),
                                  drop_last=True, rank=self.dist.rank, world=self.dist.world,
                                  channels_last=self.cfg.channels_last, indices=indices)


class Task:
    """A trainer's own part. `stage` names it in logs; `arch` (what checkpoints are for) and `parts` (what they
    hold: networks, optimisers, schedules) are set by the constructor."""

    stage: str = "train"
    arch: dict[str, Any]
    parts: dict[str, Any]
    indexed: bool = False  # step(x, y, idx, flipped): also the batch's positions in ctx.train and its mirrored images

    def begin_epoch(self, epoch: int) -> None:
        """Before the epoch's first step (train mode, per-epoch draws)."""

    def step(self, x: torch.Tensor, y: torch.Tensor, *rest: Any) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch (images, labels, and whatever else the task's data cuts with them:
        `PairedData` adds uploads and C's answers); returns detached per-batch means, averaged into the record."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """After every epoch's steps, before any test evaluation: per-epoch numbers (e.g. validation) for the record."""
        return {}

    def converged(self) -> bool:
        """True once training should stop before its last epoch (early stopping); restored with `parts` on resume."""
        return False

    def evaluate(self) -> dict[str, Any]:
        """Scores on the test images (always the test split)."""
        return {}

    def save(self, folder: Path, epoch: int) -> None:
        """Write the weights (rank 0 only, after every epoch)."""

    def describe(self, record: dict[str, Any]) -> str:
        """The numbers of an epoch's progress line."""
        return ""


def timed(evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = evaluate()
    out["eval_time_s"] = time.perf_counter() - t0
    return out


def fit(ctx: Context, task: Task, *, resume: bool) -> Path:
    """Train `task` for the epochs its settings give, from the last checkpoint when resuming; returns the run folder."""
    cfg, run, dist = ctx.cfg, ctx.run, ctx.dist
    run.start(cfg, resume)
    start = run.restore(task.arch, task.parts, resume)
    if start == 0 and getattr(cfg, "init", "") and not any(r.get("epoch") == 0 for r in run.metrics()):
        run.log({"stage": task.stage, "epoch": 0, **timed(task.evaluate)})  # the starting point, scored

    progress = Progress(task.stage, cfg.epochs, start, quiet=not dist.main)
    for epoch in range(start, cfg.epochs):
        if task.converged():
            break
        t0 = time.perf_counter()
        task.begin_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        with progress.epoch(epoch + 1, ctx.steps):
            for batch in ctx.batches(epoch, indices=task.indexed):
                for key, value in task.step(*batch).items():
                    sums[key] = sums[key] + value if key in sums else value.float()
                progress.step()
        means = (dist.sum(torch.stack(list(sums.values()))) / (ctx.steps * dist.world)).tolist()
        record = {"stage": task.stage, "epoch": epoch + 1, **dict(zip(sums, means))}
        record["time_s"] = time.perf_counter() - t0
        record["images_per_s"] = ctx.steps * ctx.batch * dist.world / record["time_s"]
        record.update(task.end_epoch(epoch + 1))
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or task.converged():
            record.update(timed(task.evaluate))
        run.log(record)
        if dist.main:  # weights every epoch (and the snapshots asked for), then the checkpoint: its epoch says what is complete
            task.save(run.path, epoch + 1)
            if cfg.snapshot_every and (epoch + 1) % cfg.snapshot_every == 0:
                snapshot = run.path / f"epoch-{epoch + 1}"
                snapshot.mkdir(exist_ok=True)
                task.save(snapshot, epoch + 1)
        run.checkpoint(task.arch, epoch + 1, task.parts)
        progress.line(epoch + 1, f"{task.describe(record)} {record['images_per_s']:.0f} img/s")
    progress.close()
    run.finish()
    return run.path
