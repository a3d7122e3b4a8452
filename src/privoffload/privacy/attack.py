"""The fresh attacker: a new deobfuscator trained after O is frozen. This is the privacy number that counts.

The cloud sees every upload, quantise8(O(x)), and may know the originals x of some images (its own
photos, public ones, a partner's). Training a decoder on those (upload, original) pairs from the
training split and scoring it on the test split measures how much of x any such cloud recovers.
The co-trained D of `train.obfuscator` is weaker evidence: O was trained to beat exactly that D.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import nets
from ..config import AttackConfig
from ..data import Cifar10, DeviceData, load_cifar10, select
from ..errors import UserError
from ..metrics import quantize8
from ..train.common import (Progress, RunDir, autocast, frozen, init_dist, make_optimizer, make_schedule, pick_device,
                            rank_device, use_bf16)
from ..train.obfuscator import load_obfuscator, reconstruction_loss
from .metrics import reconstruction_quality


def train_attack(cfg: AttackConfig, out: str | Path, *, resume: bool = False, data: Cifar10 | None = None,
                 device: str = "auto", data_root: str | None = None) -> Path:
    """Train (or resume) an attack run in `out`; returns the path of the attacker's weights."""
    dev = rank_device(pick_device(device))
    dist = init_dist(dev)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    obf = frozen(load_obfuscator(cfg.obfuscator, dev).to(memory_format=memory))
    run = RunDir(out, dist)
    run.start(cfg, resume)
    bf16 = use_bf16(cfg.precision, dev)
    recon = reconstruction_loss(cfg.recon_loss)

    data = data or load_cifar10(data_root)
    train = DeviceData(*select(data, cfg.subset, cfg.seed), dev)
    test = DeviceData(*select(data, cfg.test_subset, cfg.seed, split="test"), dev)
    per_rank_batch = cfg.batch_size // dist.world
    steps = train.steps(per_rank_batch, drop_last=True, world=dist.world)
    if steps == 0:
        raise UserError(f"subset {cfg.subset} has {len(train)} images, fewer than one batch of {cfg.batch_size}; lower batch_size")

    torch.manual_seed(cfg.seed)
    attacker = nets.build(cfg.arch, cfg.width).to(dev, memory_format=memory)
    net = DDP(attacker) if dist.world > 1 else attacker
    opt = make_optimizer(attacker.parameters(), cfg.optim)
    sched = make_schedule(opt, cfg.optim, steps, cfg.epochs)

    arch = nets.arch_of(attacker)
    parts = {"model": attacker, "optim": opt, "sched": sched}
    start = run.restore(arch, parts, resume)

    progress = Progress(f"attack ({cfg.arch})", cfg.epochs, start)
    for epoch in range(start, cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        with progress.epoch(epoch + 1, steps):
            for xb, _ in train.batches(per_rank_batch, shuffle=True, flip_images=cfg.flip, seed=cfg.seed * 100_003 + epoch,
                                       drop_last=True, rank=dist.rank, world=dist.world, channels_last=cfg.channels_last):
                with torch.no_grad(), autocast(dev, bf16):
                    upload = quantize8(obf(xb).float())  # exactly the pixels the cloud receives
                with autocast(dev, bf16):
                    loss = recon(net(upload).float(), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                progress.step()
        seen = steps * per_rank_batch * dist.world
        record = {"stage": "attack", "epoch": epoch + 1, "arch": cfg.arch,
                  "train_reconstruction_loss": dist.sum(loss_sum).item() / (steps * dist.world)}
        record["time_s"] = time.perf_counter() - t0
        record["images_per_s"] = seen / record["time_s"]
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            t1 = time.perf_counter()
            record["attacker_psnr_db"], record["attacker_ssim"] = reconstruction_quality(attacker, obf, test, bf16=bf16,
                                                                                         dist=dist)
            record["eval_time_s"] = time.perf_counter() - t1
        run.log(record)

        if dist.main:
            nets.save(attacker, run.path / "attacker.safetensors", epoch=str(epoch + 1), obfuscator=str(cfg.obfuscator))
        run.checkpoint(arch, epoch + 1, parts)
        shown = f"loss {record['train_reconstruction_loss']:.4f}"
        if "attacker_psnr_db" in record:
            shown += f" test {record['attacker_psnr_db']:.2f} dB ssim {record['attacker_ssim']:.3f}"
        progress.line(epoch + 1, f"{shown} {record['images_per_s']:.0f} img/s")
    progress.close()
    run.finish()
    return run.path / "attacker.safetensors"
