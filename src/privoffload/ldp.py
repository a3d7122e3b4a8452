"""Local differential privacy of one upload: the Gaussian mechanism on the obfuscated image (opt-in).

    v = O(x) - 1/2                      the upload around mid-grey, all C*H*W pixels (the full dimension)
    v <- v * min(1, R / ||v||_2)        clipped to the L2 ball of radius R
    M(x) = 1/2 + v + N(0, sigma^2 I)    then rounded to 8-bit pixels as always (post-processing: free)

In the local model any two images are neighbours, so the L2 sensitivity of the clipped upload is the ball's
diameter, 2R. With R = sqrt(C*H*W)/2 (the default) the ball holds the whole pixel cube [0, 1]^(C*H*W): nothing is
clipped and the sensitivity is the cube's diameter, sqrt(C*H*W). sigma is the smallest that makes one upload
(epsilon, delta)-DP by the exact condition of the analytic Gaussian mechanism (Balle & Wang 2018), computed by
dp_accounting. k uploads of the same image, each with fresh noise, are one Gaussian mechanism of sensitivity
2R*sqrt(k): `epsilon_after(k)` gives their epsilon at the same delta (docs/threat-model.md).

epsilon = inf is no mechanism at all: callers keep today's path unchanged (`mechanism` returns None).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .errors import UserError

CENTRE = 0.5


def _accounting():
    try:
        import dp_accounting
    except ImportError:
        raise UserError("local DP needs dp_accounting: pip install 'privoffload[ldp]'") from None
    return dp_accounting


@dataclass(frozen=True)
class GaussianMechanism:
    """Clip to an L2 ball of radius `clip` around mid-grey, add N(0, sigma^2) to every pixel."""

    epsilon: float
    delta: float
    clip: float  # R
    sigma: float
    dim: int  # C*H*W, the pixels of one upload

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the clipped upload: any two images' clipped uploads lie within 2R of each other."""
        return 2 * self.clip

    @classmethod
    def calibrate(cls, epsilon: float, delta: float, shape: tuple[int, ...], clip: float = 0.0) -> "GaussianMechanism":
        dim = math.prod(shape)
        clip = clip or math.sqrt(dim) / 2
        sigma = _accounting().get_sigma_gaussian(epsilon, delta) * 2 * clip  # noise per unit sensitivity, scaled
        return cls(epsilon, delta, clip, float(sigma), dim)

    def epsilon_after(self, uploads: int) -> float:
        """The epsilon (at the same delta) of `uploads` noisy uploads of the same image: their composition."""
        return float(_accounting().get_epsilon_gaussian(self.sigma / (self.sensitivity * math.sqrt(uploads)), self.delta))

    def clip_upload(self, z: torch.Tensor) -> torch.Tensor:
        v = z.float() - CENTRE
        norms = v.flatten(1).norm(dim=1).clamp_min(1e-12)
        return CENTRE + v * (self.clip / norms).clamp(max=1.0).view(-1, *[1] * (v.ndim - 1))

    def __call__(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """O(x) [N, C, H, W] in [0, 1] -> the noisy upload, before the 8-bit rounding (which clamps to [0, 1])."""
        if math.prod(z.shape[1:]) != self.dim:
            raise UserError(f"the mechanism was calibrated for {self.dim} pixels per image, got {list(z.shape[1:])}")
        clipped = self.clip_upload(z)
        noise = torch.randn(clipped.shape, generator=generator, device=clipped.device, dtype=clipped.dtype)
        return clipped + self.sigma * noise

    def describe(self) -> str:
        return (f"(epsilon {self.epsilon:g}, delta {self.delta:g}) per upload: L2 clip {self.clip:.3g}, "
                f"sensitivity {self.sensitivity:.3g}, sigma {self.sigma:.4g} per pixel")


def mechanism(epsilon: float, delta: float, shape: tuple[int, ...], clip: float = 0.0) -> GaussianMechanism | None:
    """The calibrated mechanism, or None for epsilon = inf (no noise: exactly the plain upload)."""
    if not epsilon > 0 or not 0 < delta < 1 or clip < 0:
        raise UserError(f"local DP needs epsilon > 0, 0 < delta < 1 and clip >= 0, got {epsilon}, {delta}, {clip}")
    return None if math.isinf(epsilon) else GaussianMechanism.calibrate(epsilon, delta, shape, clip)


class Noisy:
    """A mechanism with its own random stream: seeded for reproducible evaluations, from the operating system's
    entropy on a client (`seed=None`). Call it on O(x) like the mechanism."""

    def __init__(self, mech: GaussianMechanism, seed: int | None = None):
        self.mech, self.seed = mech, seed
        self.generators: dict[str, torch.Generator] = {}

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        key = str(z.device)
        if key not in self.generators:
            seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generators[key] = torch.Generator(device=z.device).manual_seed(seed)
        return self.mech(z, self.generators[key])
