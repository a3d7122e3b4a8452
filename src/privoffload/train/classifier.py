"""Training of the cloud's classifier C, readable top to bottom.

Used for the baseline C0 and for the cloud's later updates (experiment 1, `init` = C0's run).
`probes` are obfuscators whose accuracy on the current C is measured at every evaluation: that
is how experiment 1 watches O0 degrade while C keeps training.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import nets
from ..config import ClassifierConfig
from ..data import Cifar10, DeviceData, load_cifar10, select
from ..errors import UserError
from ..metrics import accuracy
from .common import (Progress, RunDir, autocast, init_dist, make_optimizer, make_schedule, pick_device, rank_device,
                     use_bf16)


def train_classifier(cfg: ClassifierConfig, out: str | Path, *, resume: bool = False, data: Cifar10 | None = None,
                     device: str = "auto", probes: dict[str, nn.Module] | None = None, data_root: str | None = None) -> Path:
    """Train (or resume) a classifier run in `out`; returns the path of its weights."""
    dev = rank_device(pick_device(device))
    dist = init_dist(dev)
    run = RunDir(out, dist)
    run.start(cfg, resume)
    bf16 = use_bf16(cfg.precision, dev)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format

    # ---- data, resident on the device as uint8
    data = data or load_cifar10(data_root)
    train = DeviceData(*select(data, cfg.subset, cfg.seed), dev)
    test = DeviceData(*select(data, cfg.test_subset, cfg.seed, split="test"), dev)
    per_rank_batch = cfg.batch_size // dist.world
    steps = train.steps(per_rank_batch, drop_last=True, world=dist.world)
    if steps == 0:
        raise UserError(f"subset {cfg.subset} has {len(train)} images, fewer than one batch of {cfg.batch_size}; lower batch_size")

    # ---- model and optimiser
    torch.manual_seed(cfg.seed)
    model = nets.resnet18(cfg.width).to(dev, memory_format=memory)
    if cfg.init:
        nets.load_into(model, Path(cfg.init) / "classifier.safetensors")
    net = DDP(model) if dist.world > 1 else model
    opt = make_optimizer(model.parameters(), cfg.optim)
    sched = make_schedule(opt, cfg.optim, steps, cfg.epochs)
    probes = {k: v.to(dev).eval() for k, v in (probes or {}).items()}

    arch = nets.arch_of(model)
    parts = {"model": model, "optim": opt, "sched": sched}
    start = run.restore(arch, parts, resume)

    def evaluate(epoch: int, record: dict) -> dict:
        record["test_accuracy"] = accuracy(model, test, bf16=bf16, dist=dist)
        for name, obf in probes.items():
            record.setdefault("probes", {})[name] = {
                "obfuscated_accuracy": accuracy(model, test, transform=obf, bf16=bf16, dist=dist),
                "quantized_obfuscated_accuracy": accuracy(model, test, transform=obf, quantize=True, bf16=bf16, dist=dist),
            }
        return record

    if start == 0 and cfg.init and not any(r.get("epoch") == 0 for r in run.metrics()):
        run.log(evaluate(0, {"stage": "classifier", "epoch": 0}))

    progress = Progress("classifier", cfg.epochs, start)
    for epoch in range(start, cfg.epochs):
        # ---- one epoch: shuffled (and flipped) batches straight from the device tensor
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        with progress.epoch(epoch + 1, steps):
            for xb, yb in train.batches(per_rank_batch, shuffle=True, flip_images=cfg.flip, seed=cfg.seed * 100_003 + epoch,
                                        drop_last=True, rank=dist.rank, world=dist.world, channels_last=cfg.channels_last):
                with autocast(dev, bf16):
                    logits = net(xb)
                    loss = F.cross_entropy(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == yb).sum()
                progress.step()
        seen = steps * per_rank_batch * dist.world
        record = {"stage": "classifier", "epoch": epoch + 1,
                  "train_loss": dist.sum(loss_sum).item() / (steps * dist.world),
                  "train_accuracy": dist.sum(correct).item() / seen}
        record["time_s"] = time.perf_counter() - t0
        record["images_per_s"] = seen / record["time_s"]
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            evaluate(epoch + 1, record)
        run.log(record)

        # ---- weights every epoch, then the checkpoint (its epoch says what is complete)
        if dist.main:
            nets.save(model, run.path / "classifier.safetensors", epoch=str(epoch + 1))
        run.checkpoint(arch, epoch + 1, parts)
        shown = f"loss {record['train_loss']:.3f} train {record['train_accuracy']:.3f}"
        if "test_accuracy" in record:
            shown += f" test {record['test_accuracy']:.4f}"
        progress.line(epoch + 1, f"{shown} {record['images_per_s']:.0f} img/s")
    progress.close()
    run.finish()
    return run.path / "classifier.safetensors"
