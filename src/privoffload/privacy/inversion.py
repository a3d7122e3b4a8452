"""White-box inversion of O: search, for each upload u, the image x' whose upload is u.

O's weights ship with every client, so the cloud can run O itself. For each upload u it minimises

    ||quantise8(O(x')) - u||^2 + tv * TV(x'),   x' in [0, 1],

with Adam from the mean training image (or from a decoder's reconstruction: decoder + inversion). The
quantiser's gradient is the identity's (straight-through, `data.quantize8`); x' is kept in [0, 1] by
clipping after every step. O runs in eval mode, exactly as on the client. Nothing trains: the test
uploads are inverted in chunks of `batch_size` images, each saved as it finishes, so a killed run goes on
from the next chunk. Under torchrun each rank takes every world-th chunk.

    OUT/config.toml, OUT/chunk-<i>.pt (reconstructions), OUT/reconstructions.pt, OUT/metrics.jsonl, OUT/DONE
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import InversionConfig
from ..data import Cifar10, load_cifar10, quantize8, select
from ..metrics import psnr_ssim
from ..runs import RunDir, is_done, load_attacker, load_codec
from ..runtime import atomic_path, atomic_write_text, autocast, frozen, init_dist, pick_device, rank_device, use_bf16


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image [N]."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return dh + dw


def invert(obf: nn.Module, upload: torch.Tensor, start: torch.Tensor, *, steps: int, lr: float, tv: float,
           bf16: bool = False) -> torch.Tensor:
    """x' in [0, 1] with quantise8(obf(x')) close to `upload` ([N, 3, H, W]), from `start` (broadcast to N)."""
    obf = frozen(obf)
    x = start.expand_as(upload).clone().float().clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # large moves first, then settle
    for _ in range(steps):
        with autocast(upload.device, bf16):
            out = quantize8(obf(x).float())
        # per image: squared error summed over pixels (mean over pixels x 3072 keeps the rate independent of size)
        loss = ((out - upload) ** 2).mean(dim=(1, 2, 3)) + tv * total_variation(x)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach()


def starting_points(cfg: InversionConfig, data: Cifar10, x_test: torch.Tensor, obf: nn.Module,
                    device: torch.device) -> torch.Tensor:
    """The mean of the training images `cfg.subset`, or the decoder's reconstructions of the uploads."""
    if cfg.start == "decoder":
        decoder = frozen(load_attacker(cfg.decoder, device))
        with torch.no_grad():
            return torch.cat([decoder(quantize8(obf(xb))) for xb in x_test.split(cfg.batch_size)])
    x_train, _ = select(data, cfg.subset, cfg.seed)
    return torch.from_numpy(x_train).float().mean(0, keepdim=True).div(255).to(device)


def run_inversion(cfg: InversionConfig, out: str | Path, *, resume: bool = False, data: Cifar10 | None = None,
                  device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Invert the test uploads `cfg.test_subset` (or go on where a killed run stopped); returns reconstructions.pt."""
    dev = rank_device(pick_device(device))
    dist = init_dist(dev)
    run = RunDir(out, dist)
    run.start(cfg, resume)
    out = Path(out)
    if is_done(out):
        return out / "reconstructions.pt"
    bf16 = use_bf16(cfg.precision, dev)
    data = data or load_cifar10(data_root)
    x_np, _ = select(data, cfg.test_subset, split="test")  # the same test images whatever the seed
    x = torch.from_numpy(x_np).to(dev).float() / 255
    obf = frozen(load_codec(cfg.obfuscator, device=dev))
    with torch.no_grad():
        upload = torch.cat([quantize8(obf(xb)) for xb in x.split(cfg.batch_size)])
    final = out / "reconstructions.pt"
    chunks = range(-(-len(x) // cfg.batch_size))
    if not final.exists():
        start = starting_points(cfg, data, x, obf, dev)
        for i in chunks[dist.rank::dist.world]:
            path = out / f"chunk-{i:04d}.pt"
            if path.exists():
                continue
            part = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
            rec = invert(obf, upload[part], start[part] if len(start) > 1 else start, steps=cfg.steps, lr=cfg.lr,
                         tv=cfg.tv, bf16=bf16)
            with atomic_path(path) as tmp:
                torch.save(rec.cpu(), tmp)
            print(f"inversion chunk {i + 1}/{len(chunks)}", flush=True)
        dist.barrier()
        if dist.main:
            with atomic_path(final) as tmp:
                torch.save(torch.cat([torch.load(out / f"chunk-{i:04d}.pt", weights_only=True) for i in chunks]), tmp)
        dist.barrier()
    if dist.main:
        rec = torch.load(final, weights_only=True)
        psnr, ssim = psnr_ssim(rec, x.cpu())
        record = {"stage": "inversion", "images": len(rec), "steps": cfg.steps, "start": cfg.start,
                  "attacker_psnr_db": psnr.mean().item(), "attacker_ssim": ssim.mean().item()}
        atomic_write_text(out / "metrics.jsonl", json.dumps(record) + "\n")
        run.finish()
        for i in chunks:
            (out / f"chunk-{i:04d}.pt").unlink(missing_ok=True)
    return final
