"""Training of the obfuscator O against a frozen classifier C, with a co-trained deobfuscator D (train/game.py).

Precision ("auto"): everything under bf16 autocast wherever `use_bf16` finds bf16 fast (CUDA, CPUs
with AVX512-BF16/AMX), with channels_last. Measured on a 2-core AVX512-BF16 CPU, one thread, with
bench/obfuscator_precision.py: on its own, forward + backward of the codec's strided depthwise
convolutions takes 4-17x as long in bf16 as in fp32, but its stride-1 ones (in the upsampling half)
take 0.3x; a whole step of this game at Table I width (32) is 1.34-1.36x faster with the codecs in
bf16 too than with only the classifier in bf16. At width 8 the two are equal.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import nets
from ..config import ObfuscatorConfig
from ..data import Dataset
from ..metrics import accuracy, obfuscation_scores
from ..runs import load_classifier, run_weights
from ..runtime import epoch_seed, frozen
from .game import Readability, game_step, reconstruction_loss
from .loop import Context, Task, check_input, fit


class ObfuscatorTask(Task):
    stage = "obfuscator"

    def __init__(self, ctx: Context):
        self.ctx, cfg = ctx, ctx.cfg
        self.classifier = frozen(ctx.place(check_input(load_classifier(cfg.classifier), ctx.data, f"classifier {cfg.classifier}")))
        extras = [frozen(ctx.place(check_input(load_classifier(c), ctx.data, f"classifier {c}"))) for c in cfg.ensemble]
        self.readability = Readability(self.classifier, extras, cfg.ensemble_weight, cfg.ensemble_per_step,
                                       cfg.flip_consistency)
        obf, deobf = nets.codec(cfg.width, **ctx.data.image_args()), nets.codec(cfg.width, **ctx.data.image_args())
        if cfg.init:  # continue from an earlier O and D (recovery, re-training)
            for net, name in ((obf, "obfuscator"), (deobf, "deobfuscator")):
                nets.load_into(net, run_weights(cfg.init, f"{name}.safetensors", "obfuscator"))
        self.obf, self.deobf = ctx.place(obf), ctx.place(deobf)
        self.obf_net, self.deobf_net = ctx.ddp(self.obf), ctx.ddp(self.deobf)
        self.opt_o, self.sched_o = ctx.optimizer(self.obf.parameters(), cfg.optim_o)
        self.opt_d, self.sched_d = ctx.optimizer(self.deobf.parameters(), cfg.optim_d)
        self.recon = reconstruction_loss(cfg.recon_loss)
        self.recon_cap = ctx.train.x.float().mean(0, keepdim=True).div(255) if cfg.recon_cap else None  # the mean image
        self.clean_accuracy = None  # C is frozen: its clean accuracy is measured once
        self.arch = {"obfuscator": nets.arch_of(self.obf), "deobfuscator": nets.arch_of(self.deobf)}
        self.parts = {"obfuscator": self.obf, "deobfuscator": self.deobf, "optim_o": self.opt_o, "optim_d": self.opt_d,
                      "sched_o": self.sched_o, "sched_d": self.sched_d}

    def begin_epoch(self, epoch: int) -> None:
        self.obf_net.train()
        self.deobf_net.train()
        self.readability.reseed(epoch_seed(self.ctx.cfg.seed, epoch) * 64 + self.ctx.dist.rank)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        target = y
        if ctx.cfg.soft_targets:  # distillation: C's answer on the clean image, not the label, is what O must keep
            with torch.no_grad(), ctx.autocast():
                target = torch.softmax(self.classifier(x).float(), 1)
        ce, loss_d, loss_o, logits = game_step(self.obf_net, self.deobf_net, self.readability, x, target, self.opt_o,
                                               self.opt_d, lam=ctx.cfg.lam, recon=self.recon, device=ctx.device,
                                               bf16=ctx.bf16, d_steps=ctx.cfg.d_steps, recon_cap=self.recon_cap)
        self.sched_d.step()
        self.sched_o.step()
        return {"train_classification_loss": ce, "train_reconstruction_loss": loss_d, "train_obfuscator_loss": loss_o,
                "train_obfuscated_accuracy": (logits.argmax(1) == y).float().mean()}

    def evaluate(self) -> dict:
        ctx = self.ctx
        if self.clean_accuracy is None:
            self.clean_accuracy = accuracy(self.classifier, ctx.test, bf16=ctx.bf16, dist=ctx.dist)
        return {"test_accuracy": self.clean_accuracy,
                **obfuscation_scores(self.classifier, self.obf, ctx.test, deobf=self.deobf, bf16=ctx.bf16, dist=ctx.dist)}

    def save(self, folder: Path, epoch: int) -> None:
        cfg = self.ctx.cfg
        meta = {"epoch": str(epoch), "lam": repr(cfg.lam), "classifier": str(cfg.classifier), "ensemble": str(len(cfg.ensemble))}
        nets.save(self.obf, folder / "obfuscator.safetensors", **meta)
        nets.save(self.deobf, folder / "deobfuscator.safetensors", **meta)

    def describe(self, r: dict) -> str:
        text = (f"ce {r['train_classification_loss']:.3f} recon {r['train_reconstruction_loss']:.4f} "
                f"obf-train {r['train_obfuscated_accuracy']:.3f}")
        if "obfuscated_accuracy" in r:
            text += (f" obf {r['obfuscated_accuracy']:.4f} q8 {r['quantized_obfuscated_accuracy']:.4f}"
                     f" D {r['deobfuscator_psnr_db']:.2f} dB ssim {r['deobfuscator_ssim']:.3f}")
        return text


def train_obfuscator(cfg: ObfuscatorConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                     device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Train (or resume) an obfuscator run in `out`; returns the path of O's weights."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root)
    return fit(ctx, ObfuscatorTask(ctx), resume=resume) / "obfuscator.safetensors"
