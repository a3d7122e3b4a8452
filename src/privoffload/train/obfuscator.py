"""Training of the obfuscator O against a frozen classifier C, with a co-trained deobfuscator D.

Leroux et al.'s game, one step per batch x, y:
  1. D minimises R(D(O(x)), x), with O(x) detached: D's step never moves O;
  2. O minimises CE(C(O(x)), y) - lam * R(D(O(x)), x) against the D just updated: the class stays
     readable for C while reconstruction gets hard. D's weights take no gradient here.
C is frozen (`frozen`: eval mode, no weight gradients), so its weights and BatchNorm statistics
stay exactly as the cloud trained them. Everything else (run folder, per-epoch seeds, checkpoints,
DDP) follows `train.classifier`.

Drift robustness (`ensemble`, docs/drift-robustness.md): the CE term becomes a weighted mean over C
and extra frozen classifiers that look like C's next updates, so O(x) stays readable when C moves.
`game_step` is the one step of the game; the client's re-sync (client/resync.py) plays it too.

Precision ("auto"): everything under bf16 autocast wherever `use_bf16` finds bf16 fast (CUDA, CPUs
with AVX512-BF16/AMX), with channels_last. Measured on a 2-core AVX512-BF16 CPU, one thread, with
bench/obfuscator_precision.py: on its own, forward + backward of the codec's strided depthwise
convolutions takes 4-17x as long in bf16 as in fp32, but its stride-1 ones (in the upsampling half)
take 0.3x; a whole step of this game at Table I width (32) is 1.34-1.36x faster with the codecs in
bf16 too than with only the classifier in bf16. At width 8 the two are equal.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import nets
from ..config import ObfuscatorConfig
from ..data import Cifar10, DeviceData, load_cifar10, select
from ..errors import UserError
from ..privacy.metrics import obfuscation_metrics
from .common import (Progress, RunDir, autocast, frozen, init_dist, make_optimizer, make_schedule, pick_device,
                     rank_device, use_bf16)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reconstruction_loss(name: str) -> Loss:
    """R: mean squared or mean absolute error between a reconstruction and the original."""
    return {"mse": F.mse_loss, "l1": F.l1_loss}[name]


def run_weights(run: str | Path, filename: str, what: str) -> Path:
    """`run/filename`, or a one-line error that says which run is missing what."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{what} run {run} does not exist")
    path = run / filename
    if not path.exists():
        raise UserError(f"{run} has no {filename}; is it a {what} run that finished an epoch?")
    return path


def load_classifier(run: str | Path, device: torch.device) -> nn.Module:
    """C of a classifier run folder, or of a classifier .safetensors file."""
    path = Path(run) if Path(run).is_file() else run_weights(run, "classifier.safetensors", "classifier")
    return nets.load(path, expect="resnet18", device=device)


def load_obfuscator(run: str | Path, device: torch.device, name: str = "obfuscator") -> nn.Module:
    """O (or, with name="deobfuscator", D) of an obfuscator run."""
    return nets.load(run_weights(run, f"{name}.safetensors", "obfuscator"), expect="codec", device=device)


class Readability:
    """O's classification loss: CE under C, or the weighted mean CE under C and the extra classifiers.

    loss = (CE_C + w * sum_k CE_k) / (1 + w * K). With `per_step` = k > 0 each step draws k of the K
    extras (seeded per epoch) and scales their sum by K / k, so the expected loss is the same at a cost
    of 1 + k classifier passes instead of 1 + K. Returns the loss and C's logits.
    """

    def __init__(self, classifier: nn.Module, extras: list[nn.Module] = (), weight: float = 1.0, per_step: int = 0):
        self.classifier, self.extras, self.weight = classifier, list(extras), weight
        self.per_step = per_step or len(self.extras)
        self.draw = random.Random(0)

    def reseed(self, seed: int) -> None:
        self.draw = random.Random(seed)

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(z).float()
        ce = F.cross_entropy(logits, y)
        if not self.extras or self.weight == 0:
            return ce, logits
        chosen = self.draw.sample(self.extras, self.per_step)
        extra = sum(F.cross_entropy(c(z).float(), y) for c in chosen) * (len(self.extras) / len(chosen))
        return (ce + self.weight * extra) / (1 + self.weight * len(self.extras)), logits


def game_step(obf_net: nn.Module, deobf_net: nn.Module, readability: Callable, xb: torch.Tensor, yb: torch.Tensor,
              opt_o: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, *, lam: float, recon: Loss,
              device: torch.device, bf16: bool) -> tuple[torch.Tensor, ...]:
    """One step of the game (D, then O against the updated D); returns the detached CE, D's loss, O's loss, C's logits.

    `readability(z, y)` -> (classification loss, logits): a `Readability`, or a surrogate's in black-box re-sync.
    """
    deobf = getattr(deobf_net, "module", deobf_net)
    with autocast(device, bf16):
        z = obf_net(xb).float()
        # 1. D's step, on the upload as given: O(x) detached, so it cannot move O
        loss_d = recon(deobf_net(z.detach()).float(), xb)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    # 2. O's step: readable for the frozen classifier(s), hard for the updated D (whose weights take no gradient)
    deobf.requires_grad_(False)
    with autocast(device, bf16):
        ce, logits = readability(z, yb)
        loss_o = ce - lam * recon(deobf(z).float(), xb) if lam > 0 else ce
    opt_o.zero_grad(set_to_none=True)
    loss_o.backward()
    opt_o.step()
    deobf.requires_grad_(True)
    return ce.detach(), loss_d.detach(), loss_o.detach(), logits.detach()


def train_obfuscator(cfg: ObfuscatorConfig, out: str | Path, *, resume: bool = False, data: Cifar10 | None = None,
                     device: str = "auto", data_root: str | None = None) -> Path:
    """Train (or resume) an obfuscator run in `out`; returns the path of O's weights."""
    dev = rank_device(pick_device(device))
    dist = init_dist(dev)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    classifier = frozen(load_classifier(cfg.classifier, dev).to(memory_format=memory))
    extras = [frozen(load_classifier(c, dev).to(memory_format=memory)) for c in cfg.ensemble]
    readability = Readability(classifier, extras, cfg.ensemble_weight, cfg.ensemble_per_step)
    if cfg.init:
        run_weights(cfg.init, "deobfuscator.safetensors", "obfuscator")
    run = RunDir(out, dist)
    run.start(cfg, resume)
    bf16 = use_bf16(cfg.precision, dev)
    recon = reconstruction_loss(cfg.recon_loss)

    # ---- data, resident on the device as uint8; privacy and accuracy are scored on the test split
    data = data or load_cifar10(data_root)
    train = DeviceData(*select(data, cfg.subset, cfg.seed), dev)
    test = DeviceData(*select(data, cfg.test_subset, cfg.seed, split="test"), dev)
    per_rank_batch = cfg.batch_size // dist.world
    steps = train.steps(per_rank_batch, drop_last=True, world=dist.world)
    if steps == 0:
        raise UserError(f"subset {cfg.subset} has {len(train)} images, fewer than one batch of {cfg.batch_size}; lower batch_size")

    # ---- O and D, their optimisers
    torch.manual_seed(cfg.seed)
    obf = nets.codec(cfg.width).to(dev, memory_format=memory)
    deobf = nets.codec(cfg.width).to(dev, memory_format=memory)
    if cfg.init:
        nets.load_into(obf, Path(cfg.init) / "obfuscator.safetensors")
        nets.load_into(deobf, Path(cfg.init) / "deobfuscator.safetensors")
    obf_net = DDP(obf) if dist.world > 1 else obf
    deobf_net = DDP(deobf) if dist.world > 1 else deobf
    opt_o, opt_d = make_optimizer(obf.parameters(), cfg.optim_o), make_optimizer(deobf.parameters(), cfg.optim_d)
    sched_o = make_schedule(opt_o, cfg.optim_o, steps, cfg.epochs)
    sched_d = make_schedule(opt_d, cfg.optim_d, steps, cfg.epochs)

    arch = {"obfuscator": nets.arch_of(obf), "deobfuscator": nets.arch_of(deobf)}
    parts = {"obfuscator": obf, "deobfuscator": deobf, "optim_o": opt_o, "optim_d": opt_d, "sched_o": sched_o,
             "sched_d": sched_d}
    start = run.restore(arch, parts, resume)

    def evaluate(record: dict) -> dict:
        t0 = time.perf_counter()
        record.update(obfuscation_metrics(classifier, obf, deobf, test, bf16=bf16, dist=dist))
        record["eval_time_s"] = time.perf_counter() - t0
        return record

    if start == 0 and cfg.init and not any(r.get("epoch") == 0 for r in run.metrics()):
        run.log(evaluate({"stage": "obfuscator", "epoch": 0}))

    progress = Progress("obfuscator", cfg.epochs, start)
    for epoch in range(start, cfg.epochs):
        obf_net.train()
        deobf_net.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, device=dev)  # CE, D's reconstruction loss, O's loss
        correct = torch.zeros((), device=dev, dtype=torch.long)
        readability.reseed((cfg.seed * 100_003 + epoch) * 64 + dist.rank)
        with progress.epoch(epoch + 1, steps):
            for xb, yb in train.batches(per_rank_batch, shuffle=True, flip_images=cfg.flip, seed=cfg.seed * 100_003 + epoch,
                                        drop_last=True, rank=dist.rank, world=dist.world, channels_last=cfg.channels_last):
                ce, loss_d, loss_o, logits = game_step(obf_net, deobf_net, readability, xb, yb, opt_o, opt_d, lam=cfg.lam,
                                                       recon=recon, device=dev, bf16=bf16)
                sched_d.step()
                sched_o.step()
                sums += torch.stack([ce, loss_d, loss_o])
                correct += (logits.argmax(1) == yb).sum()
                progress.step()
        seen = steps * per_rank_batch * dist.world
        ce_sum, d_sum, o_sum = (dist.sum(sums) / (steps * dist.world)).tolist()
        record = {"stage": "obfuscator", "epoch": epoch + 1, "train_classification_loss": ce_sum,
                  "train_reconstruction_loss": d_sum, "train_obfuscator_loss": o_sum,
                  "train_obfuscated_accuracy": dist.sum(correct).item() / seen}
        record["time_s"] = time.perf_counter() - t0
        record["images_per_s"] = seen / record["time_s"]
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            evaluate(record)
        run.log(record)

        # ---- weights every epoch, then the checkpoint (its epoch says what is complete)
        if dist.main:
            meta = {"epoch": str(epoch + 1), "lam": repr(cfg.lam), "classifier": str(cfg.classifier),
                    "ensemble": str(len(cfg.ensemble))}
            nets.save(obf, run.path / "obfuscator.safetensors", **meta)
            nets.save(deobf, run.path / "deobfuscator.safetensors", **meta)
        run.checkpoint(arch, epoch + 1, parts)
        shown = (f"ce {ce_sum:.3f} recon {d_sum:.4f} obf-train {record['train_obfuscated_accuracy']:.3f}")
        if "obfuscated_accuracy" in record:
            shown += (f" obf {record['obfuscated_accuracy']:.4f} q8 {record['quantized_obfuscated_accuracy']:.4f}"
                      f" D {record['deobfuscator_psnr_db']:.2f} dB ssim {record['deobfuscator_ssim']:.3f}")
        progress.line(epoch + 1, f"{shown} {record['images_per_s']:.0f} img/s")
    progress.close()
    run.finish()
    return run.path / "obfuscator.safetensors"
