"""The fresh attacker: a new deobfuscator trained after O is frozen. This is the privacy number that counts.

The cloud sees every upload, quantise8(O(x)), and may know the originals x of some images (its own
photos, public ones, a partner's). Training a decoder on those (upload, original) pairs from the
training split and scoring it on the test split measures how much of x any such cloud recovers.
The co-trained D of `train.obfuscator` is weaker evidence: O was trained to beat exactly that D.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import nets
from ..config import AttackConfig
from .. import ldp
from ..data import Dataset, quantize8
from ..metrics import reconstruction_quality
from ..runs import load_codec
from ..runtime import epoch_seed, frozen
from ..train.game import reconstruction_loss
from ..train.loop import Context, Task, check_input, fit


class AttackTask(Task):
    stage = "attack"

    def __init__(self, ctx: Context):
        self.ctx, cfg = ctx, ctx.cfg
        self.obf = frozen(ctx.place(check_input(load_codec(cfg.obfuscator), ctx.data, f"obfuscator {cfg.obfuscator}")))
        self.attacker = ctx.place(nets.build(cfg.arch, cfg.width, **ctx.data.image_args()))
        # with local DP, the uploads it learns from and is scored on carry the noise: per epoch from the epoch's
        # seed (a resumed run draws what it would have), and the same test uploads at every evaluation (seed 0)
        self.mech = ldp.mechanism(cfg.ldp.epsilon, cfg.ldp.delta, ctx.data.shape, cfg.ldp.clip)
        self.noise = None
        self.net = ctx.ddp(self.attacker)
        self.opt, self.sched = ctx.optimizer(self.attacker.parameters(), cfg.optim)
        self.recon = reconstruction_loss(cfg.recon_loss)
        self.arch = nets.arch_of(self.attacker)
        self.parts = {"model": self.attacker, "optim": self.opt, "sched": self.sched}

    def begin_epoch(self, epoch: int) -> None:
        self.net.train()
        if self.mech is not None:
            self.noise = ldp.Noisy(self.mech, seed=epoch_seed(self.ctx.cfg.seed, epoch) * 64 + self.ctx.dist.rank + 1)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self.ctx.autocast():
            z = self.obf(x).float()
            upload = quantize8(z if self.noise is None else self.noise(z))  # exactly the pixels the cloud receives
        with self.ctx.autocast():
            loss = self.recon(self.net(upload).float(), x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"train_reconstruction_loss": loss.detach()}

    def evaluate(self) -> dict:
        ctx = self.ctx
        psnr, ssim = reconstruction_quality(self.attacker, self.obf, ctx.test, bf16=ctx.bf16, dist=ctx.dist,
                                            noise=ldp.Noisy(self.mech, seed=0) if self.mech else None)
        record = {"arch": ctx.cfg.arch, "attacker_psnr_db": psnr, "attacker_ssim": ssim}
        if self.mech is not None:
            record.update(ldp_epsilon=self.mech.epsilon, ldp_delta=self.mech.delta, ldp_sigma=self.mech.sigma)
        return record

    def save(self, folder: Path, epoch: int) -> None:
        nets.save(self.attacker, folder / "attacker.safetensors", epoch=str(epoch), obfuscator=str(self.ctx.cfg.obfuscator))

    def describe(self, r: dict) -> str:
        text = f"loss {r['train_reconstruction_loss']:.4f}"
        return text + (f" test {r['attacker_psnr_db']:.2f} dB ssim {r['attacker_ssim']:.3f}" if "attacker_psnr_db" in r else "")


def train_attack(cfg: AttackConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                 device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Train (or resume) an attack run in `out`; returns the path of the attacker's weights."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root)
    return fit(ctx, AttackTask(ctx), resume=resume) / "attacker.safetensors"
