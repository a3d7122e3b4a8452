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

The utility-first recipe (docs/method-decisions.md) keeps this step and changes what goes into it: O's loss also
distils C's answer on the clean image (`distillation`), and lam follows `UtilityGate`: 0 until O's utility on a
validation split reaches a target (or stops rising), then a ramp, held back whenever utility falls below the target.
"""

from __future__ import annotations

import math
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


def distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(logits / T)), batch mean: O keeps what C sees in x, not only the label
    (Hinton et al.'s knowledge distillation; T^2 keeps the gradient's scale as T changes)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher.float() / t, 1), log_target=True,
                    reduction="batchmean") * t * t


class UtilityGate:
    """lam per step under the utility-first recipe: privacy is switched on only once utility is there.

    Closed (lam 0) until O's validation utility (upload accuracy / C's clean accuracy) reaches `target`, or has not
    improved for `patience` validations, or `latest` epochs have passed; then lam rises linearly to `lam` over
    `ramp_steps` steps. While open, a validation below `target` halves lam's scale and one at or above doubles it
    back (at most 1): utility is held at the target, privacy takes what is left. With lam = 0 there is no gate, and
    `patience` validations without improvement stop training (`stop`). Without any of these settings lam is `lam`
    from the first step: the paper's game. `opened` (a stage that continues a trained O) starts with the gate open
    and the ramp done: only the hold acts. Saved with the checkpoint (`state_dict`).
    """

    def __init__(self, lam: float, *, target: float = 0.0, patience: int = 0, latest: int = 0, ramp_steps: int = 0,
                 opened: bool = False):
        self.lam_max, self.target, self.patience, self.latest, self.ramp_steps = lam, target, patience, latest, ramp_steps
        gated = lam > 0 and (target > 0 or patience > 0 or latest > 0) and not opened
        self.opened_at = None if gated else (-ramp_steps if opened else 0)  # the step at which lam began to rise
        self.steps, self.scale, self.best, self.best_epoch, self.since = 0, 1.0, -math.inf, 0, 0

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def lam(self) -> float:
        """lam for the next step (and count that step)."""
        self.steps += 1
        if self.opened_at is None:
            return 0.0
        ramp = min(1.0, (self.steps - self.opened_at) / self.ramp_steps) if self.ramp_steps else 1.0
        return self.lam_max * ramp * self.scale

    def update(self, epoch: int, utility: float | None) -> None:
        """At the end of `epoch` (1-based), with the validation utility (None: no validation split)."""
        if utility is not None:
            if utility > self.best:
                self.best, self.best_epoch, self.since = utility, epoch, 0
            else:
                self.since += 1
        if self.opened_at is None:
            if (self.latest and epoch >= self.latest) or (utility is not None and (
                    (self.target and utility >= self.target) or (self.patience and self.since >= self.patience))):
                self.opened_at = self.steps
        elif self.target and utility is not None:
            self.scale = self.scale / 2 if utility < self.target else min(1.0, self.scale * 2)

    @property
    def stop(self) -> bool:
        return self.lam_max == 0 and self.patience > 0 and self.since >= self.patience

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("opened_at", "steps", "scale", "best", "best_epoch", "since")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def game_step(obf_net: nn.Module, deobf_net: nn.Module, readability: Callable, xb: torch.Tensor, yb: torch.Tensor,
              opt_o: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, *, lam: float, recon: Loss,
              device: torch.device, bf16: bool, d_steps: int = 1,
              recon_cap: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One step of the game (D, then O against the updated D); returns the detached CE, D's loss, O's loss, C's logits.

    `readability(z, y)` -> (classification loss, logits): a `Readability`, or a surrogate's in black-box re-sync.
    `yb` may be labels or C's soft outputs (probabilities). Recipe options: `d_steps` D steps on the batch before
    O's step (0: D rests, and its loss comes back as nan; then lam must be 0); `recon_cap` (an image, e.g. the mean training image): O's reward for D's error on an image stops at
    the error that image would have if answered by `recon_cap`, so O cannot gain by making D's output worse than
    a guess (anti-correlated), which no fresh attacker would copy.
    """
    deobf = getattr(deobf_net, "module", deobf_net)
    if d_steps == 0 and lam > 0:
        raise ValueError("D must play (d_steps > 0) when lam > 0")
    with autocast(device, bf16):
        z = obf_net(xb).float()
    loss_d = torch.full((), float("nan"), device=xb.device)
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
