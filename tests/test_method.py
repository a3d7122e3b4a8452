"""The method does what it claims, on small real slices: checks that could fail.

- lambda trades readability for privacy: after the same steps from the same start, O trained at lam = 0 is
  read better by C than O trained at a huge lam, and its co-trained D reconstructs better;
- white-box re-sync regains accuracy lost to a deliberately shifted classifier;
- PSNR and SSIM agree with independent formulas (a known PSNR under 8-bit rounding; SSIM written out in numpy).

C is a small CNN trained here in half a second: smooth enough that 30 steps of the game make O readable.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privoffload import nets
from privoffload.config import OptimConfig, ResyncConfig
from privoffload.data import DeviceData
from privoffload.metrics import psnr_ssim, reconstruction_quality
from privoffload.runtime import frozen
from privoffload.train.game import Readability, game_step, reconstruction_loss
from privoffload.train.loop import make_optimizer
from privoffload.train.resync import white_box

N, STEPS = 512, 30


@pytest.fixture(scope="module")
def game(cifar):
    """Images, labels, a trained small C, and a function that plays STEPS steps of the game at a given lambda."""
    x, y = torch.from_numpy(cifar.x_train[:N]).float() / 255, torch.from_numpy(cifar.y_train[:N])
    torch.manual_seed(0)
    c = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(c.parameters(), 3e-3)
    for _ in range(200):
        i = torch.randint(0, N, (64,))
        loss = F.cross_entropy(c(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    frozen(c)

    def play(lam: float) -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(1)
        obf, deobf = nets.codec(4), nets.codec(4)
        opt_o = make_optimizer(obf.parameters(), OptimConfig(name="adam", lr=1e-2, weight_decay=0.0))
        opt_d = make_optimizer(deobf.parameters(), OptimConfig(name="adam", lr=1e-3, weight_decay=0.0))
        draw = torch.Generator().manual_seed(2)
        for _ in range(STEPS):
            i = torch.randint(0, N, (64,), generator=draw)
            game_step(obf, deobf, Readability(c), x[i], y[i], opt_o, opt_d, lam=lam, recon=reconstruction_loss("mse"),
                      device=torch.device("cpu"), bf16=False)
        return obf.eval(), deobf.eval()

    return x, y, c, play


@torch.no_grad()
def read(classifier: nn.Module, obf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (classifier(obf(x)).argmax(1) == y).float().mean().item()


def test_lambda_trades_readability_for_privacy(game):
    x, y, c, play = game
    (o_free, d_free), (o_private, d_private) = play(0.0), play(1000.0)
    readable, private = read(c, o_free, x, y), read(c, o_private, x, y)
    print(f"\nobfuscated accuracy: lam=0 {readable:.3f}, lam=1000 {private:.3f}")
    assert readable > private + 0.04
    with torch.no_grad():
        assert F.mse_loss(d_private(o_private(x)), x) > F.mse_loss(d_free(o_free(x)), x)


class Inverted(nn.Module):
    """The classifier after a deliberate shift: it reads every image as its negative."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(1 - z)


def test_white_box_resync_regains_accuracy_after_a_shift(game, cifar):
    x, y, c, play = game
    obf, deobf = (copy.deepcopy(n) for n in play(0.0))
    new = Inverted(c)
    before = read(new, obf, x, y)
    cfg = ResyncConfig(steps=STEPS, batch_size=64, lam=0.0, precision="fp32",
                       optim_o=OptimConfig(name="adam", lr=1e-2, weight_decay=0.0, schedule="constant", warmup_epochs=0.0))
    white_box(obf, deobf, new, DeviceData(cifar.x_train[:N], cifar.y_train[:N]), cfg)
    after = read(new, obf.eval(), x, y)
    print(f"\nshifted classifier: before re-sync {before:.3f}, after {after:.3f}")
    assert after > before + 0.05


def test_psnr_of_an_identity_attack_under_8_bit_rounding_is_known():
    """O halves the image and D doubles the upload: on pixels of odd value, 8-bit rounding of x/2 is off by half a
    step, doubled by D, so every pixel is off by exactly 1/255 and PSNR = 20 log10(255) = 48.13 dB."""
    odd = np.random.default_rng(0).integers(0, 127, (16, 3, 32, 32)).astype(np.uint8) * 2 + 1  # 1..253: D stays <= 1
    data = DeviceData(odd, np.zeros(16, np.int64))

    class Scale(nn.Module):
        def __init__(self, factor: float):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    psnr, ssim = reconstruction_quality(Scale(2.0), Scale(0.5), data)
    assert psnr == pytest.approx(20 * np.log10(255), abs=1e-3)
    assert 0.99 < ssim < 1.0


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two [3, H, W] images in [0, 1], written out: Gaussian 11x11 (sigma 1.5) local statistics over the
    image with reflected borders, constants (0.01)^2 and (0.03)^2, averaged over pixels and channels."""
    w = gaussian_window()
    k = w.shape[0]

    def filt(img):
        img = np.pad(img, k // 2, mode="reflect")
        out = np.empty((img.shape[0] - k + 1, img.shape[1] - k + 1))
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = (img[i:i + k, j:j + k] * w).sum()
        return out

    c1, c2, scores = 0.01**2, 0.03**2, []
    for ca, cb in zip(a.astype(np.float64), b.astype(np.float64)):
        ma, mb = filt(ca), filt(cb)
        va, vb, cov = filt(ca * ca) - ma**2, filt(cb * cb) - mb**2, filt(ca * cb) - ma * mb
        scores.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(scores))


def test_psnr_and_ssim_match_written_out_formulas(cifar):
    x = torch.from_numpy(cifar.x_test[:3]).float() / 255
    rec = (x + 0.08 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    psnr, ssim = psnr_ssim(rec, x)
    for i in range(3):
        mse = float(((rec[i] - x[i]).double() ** 2).mean())
        assert psnr[i].item() == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
        assert ssim[i].item() == pytest.approx(ssim_numpy(rec[i].numpy(), x[i].numpy()), abs=2e-3)
