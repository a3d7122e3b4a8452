"""The decoder attack: a fresh network trained on (upload, original) pairs after O is frozen, to convergence.

The cloud sees every upload, quantise8(O(x)), and can make as many pairs (quantise8(O(x)), x) as it likes:
O ships with every client. A decoder trained on such pairs from the training split and scored on the test
split measures how much of x that cloud recovers. The co-trained D of `train.obfuscator` is weaker evidence:
O was trained to beat exactly that D.

Converged, not just trained: the last `val_images` images of the training subset are held out, the decoder
is scored on them after every epoch, training stops once that score has not improved for `patience` epochs,
and the weights kept (attacker.safetensors, and every test score logged) are those of the best epoch.
metrics.jsonl says, every epoch, `val_psnr_db` and `best_epoch`: the epoch where validation stopped improving.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .. import nets
from ..config import AttackConfig
from .. import ldp
from ..data import Dataset, quantize8
from ..metrics import reconstruction_quality
from ..runs import load_codec, run_weights
from ..runtime import epoch_seed, frozen
from ..train.game import reconstruction_loss
from ..train.loop import Context, Task, check_input, fit


class EarlyStopping:
    """The best validation score so far, its epoch and weights, and the epochs since; saved in checkpoints."""

    def __init__(self, model: torch.nn.Module, patience: int):
        self.patience, self.best, self.best_epoch, self.since = patience, float("-inf"), 0, 0
        self.weights = copy.deepcopy(model.state_dict())

    def update(self, epoch: int, score: float, model: torch.nn.Module) -> None:
        if score > self.best:
            self.best, self.best_epoch, self.since = score, epoch, 0
            self.weights = copy.deepcopy(model.state_dict())
        else:
            self.since += 1

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "since": self.since, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.since = state["best"], state["best_epoch"], state["since"]
        self.weights = state["weights"]


class AttackTask(Task):
    stage = "attack"

    def __init__(self, ctx: Context):
        self.ctx, cfg = ctx, ctx.cfg
        self.obf = frozen(ctx.place(check_input(load_codec(cfg.obfuscator), ctx.data, f"obfuscator {cfg.obfuscator}")))
        attacker = nets.build(cfg.arch, cfg.width, **ctx.data.image_args())
        if cfg.init:  # start from another attack's decoder (the adaptive attack's fine-tune)
            nets.load_into(attacker, run_weights(cfg.init, "attacker.safetensors", "attack"))
        self.attacker = ctx.place(attacker)
        self.best = ctx.place(copy.deepcopy(attacker)).eval()  # the weights of the best validation epoch
        # with local DP, the uploads it learns from and is scored on carry the noise: per epoch from the epoch's
        # seed (a resumed run draws what it would have), and the same test uploads at every evaluation (seed 0)
        self.mech = ldp.mechanism(cfg.ldp.epsilon, cfg.ldp.delta, ctx.data.shape, cfg.ldp.clip)
        self.noise = None
        self.net = ctx.ddp(self.attacker)
        self.opt, self.sched = ctx.optimizer(self.attacker.parameters(), cfg.optim)
        self.recon = reconstruction_loss(cfg.recon_loss)
        self.stopping = EarlyStopping(self.attacker, cfg.patience)
        self.arch = nets.arch_of(self.attacker)
        self.parts = {"model": self.attacker, "optim": self.opt, "sched": self.sched, "early_stopping": self.stopping}

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

    def end_epoch(self, epoch: int) -> dict:
        """Score the decoder on the validation split (never the test split) and keep the best weights."""
        ctx = self.ctx
        if ctx.val is None:  # no validation: the last epoch's weights are the attack
            self.stopping.update(epoch, float(epoch), self.attacker)
            return {"best_epoch": epoch, "steps": epoch * ctx.steps}
        t0 = time.perf_counter()
        psnr, ssim = reconstruction_quality(self.attacker, self.obf, ctx.val, bf16=ctx.bf16, dist=ctx.dist,
                                            noise=ldp.Noisy(self.mech, seed=0) if self.mech else None)
        self.stopping.update(epoch, psnr, self.attacker)
        return {"val_psnr_db": psnr, "val_ssim": ssim, "best_epoch": self.stopping.best_epoch,
                "steps": epoch * ctx.steps, "val_time_s": time.perf_counter() - t0}

    def converged(self) -> bool:
        return self.stopping.stop

    def best_model(self) -> torch.nn.Module:
        self.best.load_state_dict(self.stopping.weights)
        return self.best

    def evaluate(self) -> dict:
        ctx = self.ctx
        psnr, ssim = reconstruction_quality(self.best_model(), self.obf, ctx.test, bf16=ctx.bf16, dist=ctx.dist,
                                            noise=ldp.Noisy(self.mech, seed=0) if self.mech else None)
        record = {"arch": ctx.cfg.arch, "attacker_psnr_db": psnr, "attacker_ssim": ssim}
        if self.mech is not None:
            record.update(ldp_epsilon=self.mech.epsilon, ldp_delta=self.mech.delta, ldp_sigma=self.mech.sigma)
        return record

    def save(self, folder: Path, epoch: int) -> None:
        nets.save(self.best_model(), folder / "attacker.safetensors", epoch=str(self.stopping.best_epoch),
                  obfuscator=str(self.ctx.cfg.obfuscator))

    def describe(self, r: dict) -> str:
        text = f"loss {r['train_reconstruction_loss']:.4f}"
        if "val_psnr_db" in r:
            text += f" val {r['val_psnr_db']:.2f} dB (best epoch {r['best_epoch']})"
        return text + (f" test {r['attacker_psnr_db']:.2f} dB ssim {r['attacker_ssim']:.3f}" if "attacker_psnr_db" in r else "")


def train_attack(cfg: AttackConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                 device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Train (or resume) a decoder attack in `out`; returns the path of the attacker's (best) weights."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root, holdout=cfg.val_images)
    return fit(ctx, AttackTask(ctx), resume=resume) / "attacker.safetensors"
