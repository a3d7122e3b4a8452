"""The adversarial game of Leroux et al., in one place: the reconstruction loss, O's readability loss, one step.

One step per batch x, y:
  1. D minimises R(D(O(x)), x), with O(x) detached: D's step never moves O;
  2. O minimises CE(C(O(x)), y) - lam * R(D(O(x)), x) against the D just updated: the class stays
     readable for C while reconstruction gets hard. D's weights take no gradient here.
C is frozen (`runtime.frozen`: eval mode, no weight gradients), so its weights and BatchNorm statistics
stay exactly as the cloud trained them. The obfuscator trainer plays it epoch after epoch; re-sync
(train/resync.py) plays it against a new classifier, or against a surrogate of one.

Drift robustness (`Readability` with extras, docs/drift-robustness.md): the CE term becomes a weighted
mean over C and extra frozen classifiers that look like C's next updates, so O(x) stays readable when C moves.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import mirror
from ..runtime import autocast

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reconstruction_loss(name: str) -> Loss:
    """R: mean squared or mean absolute error between a reconstruction and the original."""
    return {"mse": F.mse_loss, "l1": F.l1_loss}[name]


class Readability:
    """O's classification loss: CE under C, or the weighted mean CE under C and the extra classifiers.

    loss = (CE_C + w * sum_k CE_k) / (1 + w * K). With `per_step` = k > 0 each step draws k of the K
    extras (seeded per epoch) and scales their sum by K / k, so the expected loss is the same at a cost
    of 1 + k classifier passes instead of 1 + K. With `flip_consistency`, every classifier reads the upload
    with a random half of the batch mirrored (the same half for all of them), so that O's class survives
    the flips a classifier trained with flips is indifferent to. Returns the loss and C's logits.
    """

    def __init__(self, classifier: nn.Module, extras: list[nn.Module] = (), weight: float = 1.0, per_step: int = 0,
                 flip_consistency: bool = False):
        self.classifier, self.extras, self.weight = classifier, list(extras), weight
        self.per_step = per_step or len(self.extras)
        self.flip_consistency = flip_consistency
        self.draw = random.Random(0)
        self.flips = torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        self.draw = random.Random(seed)
        self.flips = torch.Generator().manual_seed(seed)

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flip_consistency:
            z = mirror(z, (torch.rand(len(z), generator=self.flips) < 0.5).to(z.device))
        logits = self.classifier(z).float()
        ce = F.cross_entropy(logits, y)
        if not self.extras or self.weight == 0:
            return ce, logits
        chosen = self.draw.sample(self.extras, self.per_step)
        extra = sum(F.cross_entropy(c(z).float(), y) for c in chosen) * (len(self.extras) / len(chosen))
        return (ce + self.weight * extra) / (1 + self.weight * len(self.extras)), logits


def game_step(obf_net: nn.Module, deobf_net: nn.Module, readability: Callable, xb: torch.Tensor, yb: torch.Tensor,
              opt_o: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, *, lam: float, recon: Loss,
              device: torch.device, bf16: bool, d_steps: int = 1,
              recon_cap: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One step of the game (D, then O against the updated D); returns the detached CE, D's loss, O's loss, C's logits.

    `readability(z, y)` -> (classification loss, logits): a `Readability`, or a surrogate's in black-box re-sync.
    `yb` may be labels or C's soft outputs (probabilities). Recipe options: `d_steps` D steps on the batch before
    O's step; `recon_cap` (an image, e.g. the mean training image): O's reward for D's error on an image stops at
    the error that image would have if answered by `recon_cap`, so O cannot gain by making D's output worse than
    a guess (anti-correlated), which no fresh attacker would copy.
    """
    deobf = getattr(deobf_net, "module", deobf_net)
    with autocast(device, bf16):
        z = obf_net(xb).float()
    for _ in range(d_steps):  # 1. D's steps, on the upload as given: O(x) detached, so they cannot move O
        with autocast(device, bf16):
            loss_d = recon(deobf_net(z.detach()).float(), xb)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

    # 2. O's step: readable for the frozen classifier(s), hard for the updated D (whose weights take no gradient)
    deobf.requires_grad_(False)
    with autocast(device, bf16):
        ce, logits = readability(z, yb)
        if lam > 0 and recon_cap is not None:
            per_image = recon(deobf(z).float(), xb, reduction="none").mean(dim=(1, 2, 3))
            cap = recon(recon_cap.expand_as(xb), xb, reduction="none").mean(dim=(1, 2, 3))
            loss_o = ce - lam * torch.minimum(per_image, cap).mean()
        else:
            loss_o = ce - lam * recon(deobf(z).float(), xb) if lam > 0 else ce
    opt_o.zero_grad(set_to_none=True)
    loss_o.backward()
    opt_o.step()
    deobf.requires_grad_(True)
    return ce.detach(), loss_d.detach(), loss_o.detach(), logits.detach()
