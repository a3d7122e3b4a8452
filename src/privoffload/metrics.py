"""Scores on held-out images: accuracy of a classifier on clean or obfuscated images, and how well an
adversary rebuilds x from the upload (PSNR, SSIM). Every score is computed in one pass over the data.
`mean_ci` gives a mean with its 95 % confidence interval (over images, or over seeds).

The upload is the 8-bit quantised O(x) (`data.quantize8`), so that is what deobfuscators are scored on.
PSNR (dB, data range 1) and SSIM (Gaussian 11x11, sigma 1.5) come from torchmetrics, per image, then
averaged over the images: lower means more private. Under DDP each rank scores its stride of the images
and the sums are reduced.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from typing import Callable

from . import nets
from .data import DeviceData, PairedData, quantize8
from .runtime import Dist, autocast

Noise = Callable[[torch.Tensor], torch.Tensor]  # local-DP noise on O(x) before the 8-bit rounding (ldp.Noisy)

# Images per forward pass when scoring. Small batches keep the codec's full-resolution activations in cache: on a
# 2-core CPU, 128 images at a time run the width-8 codec 4.5x and the width-16 ResNet18 1.6x faster than 1,000.
EVAL_BATCH = 128


def psnr_ssim(rec: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of reconstructions `rec` against originals `x`, both in [0, 1], in fp32."""
    rec, x = rec.float().clamp(0, 1), x.float()
    psnr = peak_signal_noise_ratio(rec, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(rec, x, data_range=1.0, reduction="none")
    return psnr, ssim


class _Sums:
    """Running sums of per-batch scores, reduced over ranks once at the end."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names, self.values = names, torch.zeros(len(names) + 1, dtype=torch.float64, device=device)

    def add(self, n: int, **scores: torch.Tensor) -> None:
        self.values += torch.stack([*(scores[k].double().sum() for k in self.names),
                                    torch.tensor(float(n), dtype=torch.float64, device=self.values.device)])

    def means(self, dist: Dist) -> dict[str, float]:
        *totals, n = dist.sum(self.values).tolist()
        return {k: t / max(n, 1.0) for k, t in zip(self.names, totals)}


class _EvalMode:
    """Networks in eval mode for the block, each put back as it was."""

    def __init__(self, *nets: nn.Module | None):
        self.nets = [n for n in nets if n is not None]

    def __enter__(self):
        self.modes = [n.training for n in self.nets]
        for n in self.nets:
            n.eval()

    def __exit__(self, *exc):
        for n, mode in zip(self.nets, self.modes):
            n.train(mode)


@torch.no_grad()
def accuracy(classifier: nn.Module, data: DeviceData, *, bf16: bool = False, batch_size: int = EVAL_BATCH,
             dist: Dist = Dist()) -> float:
    """Top-1 accuracy of `classifier` on the clean images of `data`."""
    sums = _Sums(("correct",), data.device)
    with _EvalMode(classifier):
        for xb, yb in data.batches(batch_size, rank=dist.rank, world=dist.world):
            with autocast(data.device, bf16):
                sums.add(len(yb), correct=classifier(xb).argmax(1) == yb)
    return sums.means(dist)["correct"]


@torch.no_grad()
def obfuscation_scores(classifier: nn.Module, obf: nn.Module, data: DeviceData, *, deobf: nn.Module | None = None,
                       unquantized: bool = True, bf16: bool = False, batch_size: int = EVAL_BATCH,
                       dist: Dist = Dist(), noise: Noise | None = None) -> dict[str, float]:
    """Utility and privacy of an obfuscator side by side, with O run once per image.

    `quantized_obfuscated_accuracy` (C on the 8-bit upload, what the cloud receives), `obfuscated_accuracy`
    (C on O(x) before rounding; skipped with unquantized=False) and, given a deobfuscator, its
    `deobfuscator_psnr_db` / `deobfuscator_ssim` on the upload. With `noise`, the upload is the noisy one.
    """
    names = ("quantized",) + (("obfuscated",) if unquantized else ()) + (("psnr", "ssim") if deobf is not None else ())
    sums = _Sums(names, data.device)
    with _EvalMode(classifier, obf, deobf):
        for xb, yb in data.batches(batch_size, rank=dist.rank, world=dist.world):
            with autocast(data.device, bf16):
                z = obf(xb).float()
                if noise is not None:
                    z = noise(z).clamp(0, 1)
                upload = quantize8(z)
                scores = {"quantized": classifier(upload).argmax(1) == yb}
                if unquantized:
                    scores["obfuscated"] = classifier(z).argmax(1) == yb
                rec = deobf(upload) if deobf is not None else None
            if rec is not None:  # scored in fp32, outside autocast
                scores["psnr"], scores["ssim"] = psnr_ssim(rec, xb)
            sums.add(len(yb), **scores)
    m = sums.means(dist)
    out = {"quantized_obfuscated_accuracy": m["quantized"]}
    if unquantized:
        out["obfuscated_accuracy"] = m["obfuscated"]
    if deobf is not None:
        out.update(deobfuscator_psnr_db=m["psnr"], deobfuscator_ssim=m["ssim"])
    return out


@torch.no_grad()
def upload_accuracies(classifiers: dict[str, nn.Module], obf: nn.Module, data: DeviceData, *, bf16: bool = False,
                      batch_size: int = EVAL_BATCH, dist: Dist = Dist(), reference: str | None = None) -> dict[str, float]:
    """The accuracy of each classifier on the same 8-bit uploads of `obf`: O runs once per image for all of them.
    With `reference` (one of the names), also each other classifier's negative-flip rate `NAME_negative_flips`: the
    share of the uploads the reference classifies right and it classifies wrong (what an update breaks)."""
    others = [k for k in classifiers if reference is not None and k != reference]
    sums = _Sums((*classifiers, *(f"{k}_negative_flips" for k in others)), data.device)
    with _EvalMode(obf, *classifiers.values()):
        for xb, yb in data.batches(batch_size, rank=dist.rank, world=dist.world):
            with autocast(data.device, bf16):
                upload = quantize8(obf(xb).float())
                right = {k: c(upload).argmax(1) == yb for k, c in classifiers.items()}
            sums.add(len(yb), **right, **{f"{k}_negative_flips": right[reference] & ~right[k] for k in others})
    return sums.means(dist)


@torch.no_grad()
def reconstruction_quality(deobf: nn.Module, obf: nn.Module, data: DeviceData, *, bf16: bool = False,
                           batch_size: int = EVAL_BATCH, dist: Dist = Dist(), noise: Noise | None = None) -> tuple[float, float]:
    """Mean per-image (PSNR in dB, SSIM) of deobf(quantize8(obf(x))) against x over `data` (with `noise` on O(x)).

    `bf16` is the precision of the two networks' forward passes; the scores are computed in fp32.
    """
    sums = _Sums(("psnr", "ssim"), data.device)
    with _EvalMode(obf, deobf):
        for xb, _ in data.batches(batch_size, rank=dist.rank, world=dist.world):
            with autocast(data.device, bf16):
                z = obf(xb).float()
                rec = deobf(quantize8(z if noise is None else noise(z)))
            psnr, ssim = psnr_ssim(rec, xb)
            sums.add(len(xb), psnr=psnr, ssim=ssim)
    m = sums.means(dist)
    return m["psnr"], m["ssim"]


@torch.no_grad()
def pair_quality(decoder: nn.Module, data: PairedData, *, bf16: bool = False, batch_size: int = EVAL_BATCH,
                 dist: Dist = Dist(), noise: Noise | None = None) -> tuple[float, float]:
    """Mean per-image (PSNR in dB, SSIM) of what `decoder` rebuilds from the cached uploads of `data` (and C's
    answers, for a decoder that reads them; `nets.decode`) against its images. With `noise`, drawn on the uploads
    and rounded to 8 bits again. The decoder runs in eval mode, the scores in fp32."""
    sums = _Sums(("psnr", "ssim"), data.device)
    with _EvalMode(decoder):
        for xb, _, upload, answer in data.batches(batch_size, rank=dist.rank, world=dist.world):
            with autocast(data.device, bf16):
                rec = nets.decode(decoder, upload if noise is None else quantize8(noise(upload)), answer)
            psnr, ssim = psnr_ssim(rec, xb)
            sums.add(len(xb), psnr=psnr, ssim=ssim)
    m = sums.means(dist)
    return m["psnr"], m["ssim"]


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (Student's t, n - 1 degrees of freedom); nan for n < 2."""
    from scipy.stats import t  # here, so that importing the trainers (and the client) does not load scipy

    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
