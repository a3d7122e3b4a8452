"""How well an adversary reconstructs x from what the client uploads, on held-out images.

The upload is the 8-bit quantised O(x) (`metrics.quantize8`), so that is what deobfuscators are
scored on. PSNR (dB, data range 1) and SSIM (Gaussian 11x11, sigma 1.5) come from torchmetrics,
per image, then averaged over the images: lower means more private.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..data import DeviceData
from ..metrics import accuracy, quantize8
from ..train.common import Dist, autocast


@torch.no_grad()
def reconstruction_quality(deobf: nn.Module, obf: nn.Module, data: DeviceData, *, quantize: bool = True,
                           bf16: bool = False, batch_size: int = 500, dist: Dist = Dist()) -> tuple[float, float]:
    """Mean per-image (PSNR in dB, SSIM) of deobf(quantize8(obf(x))) against x over `data`.

    `bf16` is the precision of the two codecs' forward passes; the scores are computed in fp32.
    Under DDP each rank scores its stride of the images and the sums are reduced.
    """
    modes = obf.training, deobf.training
    obf.eval()
    deobf.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=data.device)  # psnr, ssim, images
    for xb, _ in data.batches(batch_size, rank=dist.rank, world=dist.world):
        with autocast(data.device, bf16):
            z = obf(xb).float()
            if quantize:
                z = quantize8(z)
            rec = deobf(z).float().clamp(0, 1)
        psnr = peak_signal_noise_ratio(rec, xb, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(rec, xb, data_range=1.0, reduction="none")
        sums += torch.stack([psnr.sum(), ssim.sum(), torch.tensor(float(len(xb)), device=data.device)]).double()
    obf.train(modes[0])
    deobf.train(modes[1])
    psnr_sum, ssim_sum, n = dist.sum(sums).tolist()
    return psnr_sum / max(n, 1), ssim_sum / max(n, 1)


def obfuscation_metrics(classifier: nn.Module, obf: nn.Module, deobf: nn.Module, test: DeviceData, *,
                        bf16: bool = False, dist: Dist = Dist()) -> dict[str, float]:
    """Utility and privacy of an obfuscator side by side, on `test` (always the test split)."""
    was_training = obf.training
    obf.eval()
    out = {
        "test_accuracy": accuracy(classifier, test, bf16=bf16, dist=dist),
        "obfuscated_accuracy": accuracy(classifier, test, transform=obf, bf16=bf16, dist=dist),
        "quantized_obfuscated_accuracy": accuracy(classifier, test, transform=obf, quantize=True, bf16=bf16, dist=dist),
    }
    out["deobfuscator_psnr_db"], out["deobfuscator_ssim"] = reconstruction_quality(deobf, obf, test, bf16=bf16, dist=dist)
    obf.train(was_training)
    return out
