"""Training of the obfuscator O against a frozen classifier C, with a co-trained deobfuscator D (train/game.py).

Two recipes share this task (docs/method-decisions.md). The paper's: the plain game with lam from the first step.
Utility first: O's loss also distils C's answer on the clean image (`distill`), lam stays 0 until O's utility on
a validation split of training images reaches `utility_target` or stops rising (`UtilityGate`), then ramps up and
is held back whenever utility falls below the target; D may be a U-Net and start afresh every few epochs, so that
O cannot overfit one D. Every option's default is the paper's game.

Precision ("auto"): everything under bf16 autocast wherever `use_bf16` finds bf16 fast (CUDA, CPUs
with AVX512-BF16/AMX), with channels_last. Measured on a 2-core AVX512-BF16 CPU, one thread, with
bench/obfuscator_precision.py: on its own, forward + backward of the codec's strided depthwise
convolutions takes 4-17x as long in bf16 as in fp32, but its stride-1 ones (in the upsampling half)
take 0.3x; a whole step of this game at Table I width (32) is 1.34-1.36x faster with the codecs in
bf16 too than with only the classifier in bf16. At width 8 the two are equal.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import nets
from ..config import ObfuscatorConfig
from ..data import Dataset
from ..metrics import accuracy, obfuscation_scores
from ..runs import load_classifier, run_weights
from ..runtime import epoch_seed, frozen
from .game import Readability, UtilityGate, distillation, game_step, reconstruction_loss
from .loop import Context, Task, check_input, fit


class ObfuscatorTask(Task):
    stage = "obfuscator"
    indexed = True  # C's clean logits are cached per training image (and orientation)

    def __init__(self, ctx: Context):
        self.ctx, cfg = ctx, ctx.cfg
        self.val = ctx.val  # val_subset: training images O never trains on
        self.classifier = frozen(ctx.place(check_input(load_classifier(cfg.classifier), ctx.data, f"classifier {cfg.classifier}")))
        extras = [frozen(ctx.place(check_input(load_classifier(c), ctx.data, f"classifier {c}"))) for c in cfg.ensemble]
        self.readability = Readability(self.classifier, extras, cfg.ensemble_weight, cfg.ensemble_per_step,
                                       cfg.flip_consistency)
        image = ctx.data.image_args()
        obf, deobf = nets.codec(cfg.width, **image), nets.build(cfg.d_arch, cfg.d_width or cfg.width, **image)
        if cfg.init:  # continue from an earlier O and D (recovery, re-training)
            for net, name in ((obf, "obfuscator"), (deobf, "deobfuscator")):
                nets.load_into(net, run_weights(cfg.init, f"{name}.safetensors", "obfuscator"))
        self.obf, self.deobf = ctx.place(obf), ctx.place(deobf)
        self.obf_net, self.deobf_net = ctx.ddp(self.obf), ctx.ddp(self.deobf)
        self.opt_o, self.sched_o = ctx.optimizer(self.obf.parameters(), cfg.optim_o)
        self.opt_d, self.sched_d = ctx.optimizer(self.deobf.parameters(), cfg.optim_d)
        self.recon = reconstruction_loss(cfg.recon_loss)
        self.recon_cap = ctx.train.x.float().mean(0, keepdim=True).div(255) if cfg.recon_cap else None  # the mean image
        self.gate = UtilityGate(cfg.lam, target=cfg.utility_target, patience=cfg.patience, latest=cfg.gate_epoch,
                                ramp_steps=round(cfg.lam_ramp_epochs * ctx.steps), opened=bool(cfg.init))
        self.logits = None  # C's logits on each clean training image, as is and mirrored (`clean_logits`)
        self.clean_accuracy = None  # C is frozen: its clean accuracy is measured once (test split)
        self.clean_val_accuracy = None  # and on the validation split
        self.arch = {"obfuscator": nets.arch_of(self.obf), "deobfuscator": nets.arch_of(self.deobf)}
        self.parts = {"obfuscator": self.obf, "deobfuscator": self.deobf, "optim_o": self.opt_o, "optim_d": self.opt_d,
                      "sched_o": self.sched_o, "sched_d": self.sched_d, "gate": self.gate}

    def begin_epoch(self, epoch: int) -> None:
        cfg = self.ctx.cfg
        self.epoch = epoch
        if cfg.d_reset_every and epoch and epoch % cfg.d_reset_every == 0:
            self.reset_deobfuscator(epoch_seed(cfg.seed, epoch))
        self.obf_net.train()
        self.deobf_net.train()
        self.readability.reseed(epoch_seed(cfg.seed, epoch) * 64 + self.ctx.dist.rank)

    def reset_deobfuscator(self, seed: int) -> None:
        """D starts afresh (new weights, BatchNorm statistics and Adam state), the same on every rank; O is untouched."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for module in self.deobf.modules():
                if module is not self.deobf and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.opt_d.state.clear()

    @torch.no_grad()
    def clean_logits(self, idx: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """C's logits on the clean training images `idx` (mirrored where `flipped`). C is frozen, so they are computed
        once, for every training image in both orientations (one with flips off), in large batches: cheaper than a
        forward pass of C on every batch once O trains for more than two epochs (BENCHMARKS.md)."""
        ctx = self.ctx
        if self.logits is None:
            views = 2 if ctx.cfg.flip else 1
            chunks = []
            for xb, _ in ctx.train.batches(512, channels_last=ctx.cfg.channels_last):
                with ctx.autocast():
                    chunks.append(torch.stack([self.classifier(xb if v == 0 else xb.flip(-1)).float()
                                               for v in range(views)], 1))
            self.logits = torch.cat(chunks)
        return self.logits[idx, flipped.long() if self.logits.shape[1] == 2 else 0]

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None,
             flipped: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        ctx, cfg = self.ctx, self.ctx.cfg
        if self.epoch < cfg.autoencoder_epochs and not cfg.init:
            return self.autoencoder_step(x)
        target, readability = y, self.readability
        if cfg.soft_targets or cfg.distill:  # C's answer on the clean image: what O must keep
            if idx is not None:
                teacher = self.clean_logits(idx, flipped)
            else:
                with torch.no_grad(), ctx.autocast():
                    teacher = self.classifier(x).float()
            if cfg.soft_targets:
                target = torch.softmax(teacher, 1)
            if cfg.distill:
                def readability(z, labels):
                    ce, logits = self.readability(z, labels)
                    return ce + cfg.distill * distillation(logits, teacher, cfg.temperature), logits
        lam = self.gate.lam()
        d_steps = 0 if cfg.d_idle and lam == 0 else cfg.d_steps
        ce, loss_d, loss_o, logits = game_step(self.obf_net, self.deobf_net, readability, x, target, self.opt_o,
                                               self.opt_d, lam=lam, recon=self.recon, device=ctx.device,
                                               bf16=ctx.bf16, d_steps=d_steps, recon_cap=self.recon_cap)
        if d_steps:  # D's schedule advances with D's own steps
            self.sched_d.step()
        self.sched_o.step()
        return {"train_classification_loss": ce, "train_reconstruction_loss": loss_d, "train_obfuscator_loss": loss_o,
                "train_obfuscated_accuracy": (logits.argmax(1) == y).float().mean(),
                "train_lam": torch.full((), lam, device=x.device)}

    def autoencoder_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """O alone learns to rebuild x: a start from which C already reads O(x) (the game's first epochs are spent
        finding what C needs, not any image at all). Neither C nor D runs: a fraction of a game step's cost."""
        with self.ctx.autocast():
            loss = self.recon(self.obf_net(x).float(), x)
        self.opt_o.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_o.step()
        self.sched_o.step()
        self.gate.lam()  # a step at lam 0
        return {"train_autoencoder_loss": loss.detach()}

    def end_epoch(self, epoch: int) -> dict:
        """Utility on the validation split (never the test split): what the gate and the stopping rule read."""
        if self.val is None:
            self.gate.update(epoch, None)  # only its `latest` epoch can open the gate
            return {"gate_open": self.gate.open}
        ctx, t0 = self.ctx, time.perf_counter()
        if self.clean_val_accuracy is None:
            self.clean_val_accuracy = accuracy(self.classifier, self.val, bf16=ctx.bf16, dist=ctx.dist)
        upload = obfuscation_scores(self.classifier, self.obf, self.val, unquantized=False, bf16=ctx.bf16,
                                    dist=ctx.dist)["quantized_obfuscated_accuracy"]
        utility = upload / max(self.clean_val_accuracy, 1e-9)
        self.gate.update(epoch, utility)
        return {"val_accuracy": self.clean_val_accuracy, "val_upload_accuracy": upload, "val_utility": utility,
                "val_best_epoch": self.gate.best_epoch, "gate_open": self.gate.open, "val_time_s": time.perf_counter() - t0}

    def converged(self) -> bool:
        return self.gate.stop

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
        if "train_autoencoder_loss" in r:
            text = f"autoencoder {r['train_autoencoder_loss']:.4f}"
        else:
            text = (f"ce {r['train_classification_loss']:.3f} recon {r['train_reconstruction_loss']:.4f} "
                    f"obf-train {r['train_obfuscated_accuracy']:.3f}")
        if "val_utility" in r:
            text += f" val {r['val_utility']:.3f} of clean, lam {r.get('train_lam', 0.0):.2f}{'' if r['gate_open'] else ' (gate closed)'}"
        if "obfuscated_accuracy" in r:
            text += (f" obf {r['obfuscated_accuracy']:.4f} q8 {r['quantized_obfuscated_accuracy']:.4f}"
                     f" D {r['deobfuscator_psnr_db']:.2f} dB ssim {r['deobfuscator_ssim']:.3f}")
        return text


def train_obfuscator(cfg: ObfuscatorConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                     device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Train (or resume) an obfuscator run in `out`; returns the path of O's weights."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root, val_subset=cfg.val_subset)
    return fit(ctx, ObfuscatorTask(ctx), resume=resume) / "obfuscator.safetensors"
