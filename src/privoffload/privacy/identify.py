"""Does the class survive the attacker's reconstruction? A fresh classifier trained on what the attacker rebuilds.

On ORL faces the class is who it is: if a classifier trained on the attacker's reconstructions of the training
faces recognises the people in the reconstructions of the test faces far above chance (1/40 = 2.5 %), the
reconstructions give identity away, whatever their PSNR. The classifier is trained like the cloud's (the
classifier task, on reconstructions instead of images) and scored on the test images' reconstructions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import config as config_mod
from .. import ldp
from ..config import AttackConfig, IdentifyConfig
from ..data import Dataset, quantize8
from ..metrics import accuracy
from ..runs import load_attacker, load_codec
from ..runtime import frozen
from ..train.classifier import ClassifierTask
from ..train.loop import Context, check_input, fit


class Reconstruct(nn.Module):
    """x -> what the attacker rebuilds from its upload (quantised O(x), with the attack's local-DP noise if any)."""

    def __init__(self, obf: nn.Module, attacker: nn.Module, noise: ldp.Noisy | None = None):
        super().__init__()
        self.obf, self.attacker, self.noise = obf, attacker, noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.obf(x).float()
        return self.attacker(quantize8(z if self.noise is None else self.noise(z))).float().clamp(0, 1)


class IdentifyTask(ClassifierTask):
    stage = "identify"

    def __init__(self, ctx: Context):
        attack = config_mod.load(AttackConfig, Path(ctx.cfg.attack) / "config.toml")
        obf = check_input(load_codec(attack.obfuscator), ctx.data, f"obfuscator {attack.obfuscator}")
        mech = ldp.mechanism(attack.ldp.epsilon, attack.ldp.delta, ctx.data.shape, attack.ldp.clip)
        self.view = frozen(ctx.place(Reconstruct(obf, load_attacker(ctx.cfg.attack), ldp.Noisy(mech, 0) if mech else None)))
        super().__init__(ctx)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self.ctx.autocast():
            rec = self.view(x)
        return super().step(rec, y)

    def evaluate(self) -> dict:
        ctx = self.ctx
        acc = accuracy(nn.Sequential(self.view, self.model), ctx.test, bf16=ctx.bf16, dist=ctx.dist)
        return {"test_accuracy": acc, "chance": 1 / len(ctx.data.classes)}


def train_identify(cfg: IdentifyConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                   device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Train (or resume) the classifier of reconstructions in `out`; returns the path of its weights."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root)
    return fit(ctx, IdentifyTask(ctx), resume=resume) / "classifier.safetensors"
