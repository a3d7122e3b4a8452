"""White-box inversion of O: search, for each upload u, the image x' whose upload is u.

O's weights ship with every client, so the cloud can run O itself. For each upload u it minimises

    ||quantise8(O(x')) - u||^2 + tv * TV(x'),   x' in [0, 1],

with Adam from a decoder's reconstruction (decoder + inversion: can the search improve on the decoder?) or from
the mean training image. The quantiser's gradient is the identity's (straight-through, `data.quantize8`); x' is
kept in [0, 1] by clipping after every step. O runs in eval mode, exactly as on the client.

Its settings are chosen on validation images, never on test images: the last `val_images` images of the
training subset (the attacker knows their originals) are inverted with every rate of `lrs` and TV weight of
`tvs`, and the pair with the best validation PSNR inverts the test uploads. A search that moves the validation
images' pixels by less than `min_change` on average, against where it started, is **empty** at this budget:
the suite prints it so and leaves it out of the choice of the strongest attack. Nothing trains; the test uploads
are inverted in chunks of `batch_size` images, each saved as it finishes, so a killed run goes on from the next
chunk. Under torchrun each rank takes every world-th chunk.

    OUT/config.toml, OUT/tuning.json (every setting's validation scores, and the choice), OUT/chunk-<i>.pt,
    OUT/reconstructions.pt, OUT/uploads/ (the cache), OUT/metrics.jsonl, OUT/DONE
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import nets
from ..config import InversionConfig
from ..data import Dataset, load_dataset, quantize8, select
from ..errors import UserError
from ..metrics import psnr_ssim
from ..runs import RunDir, is_done, load_attacker, load_codec, read_metrics, run_dataset
from ..runtime import atomic_path, atomic_write_text, autocast, frozen, init_dist, pick_device, rank_device, use_bf16
from .uploads import cloud_view


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image [N]."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return dh + dw


def invert(obf: nn.Module, upload: torch.Tensor, start: torch.Tensor, *, steps: int, lr: float, tv: float,
           bf16: bool = False) -> torch.Tensor:
    """x' in [0, 1] with quantise8(obf(x')) close to `upload` ([N, C, H, W]), from `start` (broadcast to N)."""
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


def as_images(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(pixels).to(device).float() / 255


class Inversion:
    """The search's inputs: the uploads of the validation and test images, and where the search starts."""

    def __init__(self, cfg: InversionConfig, data: Dataset, folder: Path, device: torch.device):
        self.cfg, self.device = cfg, device
        self.obf = frozen(load_codec(cfg.obfuscator, device=device))
        self.decoder = frozen(load_attacker(cfg.decoder, device)) if cfg.start == "decoder" else None
        reads = self.decoder is not None and "num_classes" in nets.image_of(self.decoder)
        known, _ = select(data, cfg.subset, cfg.seed)
        if cfg.val_images >= len(known):
            raise UserError(f"inversion: val_images = {cfg.val_images} leaves none of the {len(known)} images of subset "
                            f"{cfg.subset} to start from; lower val_images")
        self.mean = as_images(known, device).mean(0, keepdim=True)
        self.val_x = as_images(known[len(known) - cfg.val_images:], device)
        view = dict(answers=reads, bf16=use_bf16(cfg.precision, device), device=device)
        up, ans = cloud_view(folder, cfg.obfuscator, data, cfg.subset, seed=cfg.seed, **view)
        self.val_upload, self.val_answer = self.part(up, ans, len(known) - cfg.val_images)
        self.test_upload, self.test_answer = self.part(*cloud_view(folder, cfg.obfuscator, data, cfg.test_subset,
                                                                   split="test", **view), 0)

    def part(self, up: np.ndarray, ans: np.ndarray | None, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return as_images(up[start:], self.device), None if ans is None else torch.from_numpy(ans[start:]).to(self.device)

    @torch.no_grad()
    def start(self, upload: torch.Tensor, answer: torch.Tensor | None) -> torch.Tensor:
        """Where the search starts for these uploads: the decoder's reconstructions, or the mean image."""
        if self.decoder is None:
            return self.mean.expand_as(upload)
        return torch.cat([nets.decode(self.decoder, upload[i:i + 500], None if answer is None else answer[i:i + 500]).float()
                          for i in range(0, len(upload), 500)])


def tune(inv: Inversion, cfg: InversionConfig, bf16: bool) -> dict:
    """Every (rate, TV weight) on the validation images: PSNR, SSIM and mean pixel change against the start; the
    best PSNR is chosen. Also the start's own scores, which the search is measured against."""
    start = inv.start(inv.val_upload, inv.val_answer)
    psnr, ssim = psnr_ssim(start, inv.val_x)
    result = {"start": {"val_psnr_db": psnr.mean().item(), "val_ssim": ssim.mean().item()}, "settings": []}
    for lr, tv in itertools.product(cfg.lrs, cfg.tvs):
        rec = torch.cat([invert(inv.obf, u, s, steps=cfg.steps, lr=lr, tv=tv, bf16=bf16)
                         for u, s in zip(inv.val_upload.split(cfg.batch_size), start.split(cfg.batch_size))])
        psnr, ssim = psnr_ssim(rec, inv.val_x)
        result["settings"].append({"lr": lr, "tv": tv, "val_psnr_db": psnr.mean().item(), "val_ssim": ssim.mean().item(),
                                   "val_change": (rec - start).abs().mean().item()})
    result["chosen"] = max(result["settings"], key=lambda r: r["val_psnr_db"])
    result["empty"] = result["chosen"]["val_change"] < cfg.min_change
    return result


def run_inversion(cfg: InversionConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                  device: str = "auto", data_root: str | Path | None = None, uploads: str | Path | None = None) -> Path:
    """Tune on validation images, then invert the test uploads `cfg.test_subset` (or go on where a killed run
    stopped); returns reconstructions.pt. The uploads are cached in `uploads` (default OUT/uploads)."""
    dev = rank_device(pick_device(device))
    dist = init_dist(dev)
    run = RunDir(out, dist)
    run.start(cfg, resume)
    out = Path(out)
    if is_done(out):
        return out / "reconstructions.pt"
    bf16 = use_bf16(cfg.precision, dev)
    if data is None:
        dataset, image_size = run_dataset(cfg.obfuscator)
        data = load_dataset(dataset, data_root, image_size)
    inv = Inversion(cfg, data, Path(uploads) if uploads else out / "uploads", dev)
    tuning_path = out / "tuning.json"
    if not tuning_path.exists():
        tuning = tune(inv, cfg, bf16)
        if dist.main:
            atomic_write_text(tuning_path, json.dumps(tuning, indent=1) + "\n")
    dist.barrier()
    tuning = json.loads(tuning_path.read_text())
    lr, tv = tuning["chosen"]["lr"], tuning["chosen"]["tv"]
    final = out / "reconstructions.pt"
    n = len(inv.test_upload)
    chunks = range(-(-n // cfg.batch_size))
    if not final.exists():
        for i in chunks[dist.rank::dist.world]:
            path = out / f"chunk-{i:04d}.pt"
            if path.exists():
                continue
            part = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
            upload = inv.test_upload[part]
            start = inv.start(upload, None if inv.test_answer is None else inv.test_answer[part])
            rec = invert(inv.obf, upload, start, steps=cfg.steps, lr=lr, tv=tv, bf16=bf16)
            with atomic_path(path) as tmp:
                torch.save({"rec": rec.cpu(), "change": (rec - start).abs().mean(dim=(1, 2, 3)).cpu()}, tmp)
            print(f"inversion chunk {i + 1}/{len(chunks)}", flush=True)
        dist.barrier()
        if dist.main:
            parts = [torch.load(out / f"chunk-{i:04d}.pt", weights_only=True) for i in chunks]
            with atomic_path(final) as tmp:
                torch.save({k: torch.cat([p[k] for p in parts]) for k in ("rec", "change")}, tmp)
        dist.barrier()
    if dist.main:
        saved = torch.load(final, weights_only=True)
        x, _ = select(data, cfg.test_subset, split="test")
        psnr, ssim = psnr_ssim(saved["rec"], as_images(x, torch.device("cpu")))
        record = {"stage": "inversion", "images": n, "steps": cfg.steps, "start": cfg.start, "lr": lr, "tv": tv,
                  "val_psnr_db": tuning["chosen"]["val_psnr_db"], "start_val_psnr_db": tuning["start"]["val_psnr_db"],
                  "val_change": tuning["chosen"]["val_change"], "empty": tuning["empty"],
                  "mean_abs_change": saved["change"].mean().item(),
                  "attacker_psnr_db": psnr.mean().item(), "attacker_ssim": ssim.mean().item()}
        if not read_metrics(out):
            atomic_write_text(out / "metrics.jsonl", json.dumps(record) + "\n")
        run.finish()
        for i in chunks:
            (out / f"chunk-{i:04d}.pt").unlink(missing_ok=True)
    return final


def reconstructions(folder: str | Path) -> torch.Tensor:
    """The test reconstructions of a finished inversion run."""
    return torch.load(Path(folder) / "reconstructions.pt", weights_only=True)["rec"]
