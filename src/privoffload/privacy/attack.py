"""The decoder attack: a fresh network trained on (upload, original) pairs after O is frozen, until validation
stops improving.

The cloud sees every upload, quantise8(O(x)), and can make as many pairs (quantise8(O(x)), x) as it likes: O
ships with every client. A decoder trained on such pairs from the training split and scored on the test split
measures how much of x that cloud recovers. The co-trained D of `train.obfuscator` is weaker evidence: O was
trained to beat exactly that D. The uploads come from the cache (privacy/uploads.py), so a step costs the
decoder alone. The cloud also has C's answer for every upload: a label-aware decoder (`answer = true`) reads it
beside the upload, and the label-only decoder (`arch = "answer"`) reads nothing else.

Converged, not just trained: the last `val_split` of the training subset is held out and scored after every
epoch; the rate is constant until validation stops improving, then cut, and the plateau after the last cut
stops training (`EarlyStopping`). The weights kept (attacker.safetensors, and every test score logged) are those
of the best epoch. metrics.jsonl says, every epoch, `val_psnr_db`, `best_epoch`, `lr` and `converged`: a run
whose budget ran out first has `converged` false, and so does a run whose best epoch is its last.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import ldp, nets
from ..config import AttackConfig
from ..data import Dataset, PairedData, quantize8
from ..errors import UserError
from ..metrics import pair_quality
from ..runs import load_codec, read_metrics, run_weights
from ..runtime import epoch_seed
from ..train.game import reconstruction_loss
from ..train.loop import Context, Task, check_input, fit
from .uploads import cloud_view


class EarlyStopping:
    """Validation decides when to stop: the best score so far, its epoch and weights. After `patience` epochs
    without a gain of `min_delta`, the rate is cut (`update` returns True), at most `cuts` times; the plateau
    after the last cut stops training. Saved in checkpoints."""

    def __init__(self, model: nn.Module, patience: int, min_delta: float = 0.0, cuts: int = 0):
        self.patience, self.min_delta, self.cuts = patience, min_delta, cuts
        self.best, self.best_epoch, self.since, self.cuts_done, self.stopped = float("-inf"), 0, 0, 0, False
        self.weights = copy.deepcopy(model.state_dict())

    def update(self, epoch: int, score: float, model: nn.Module) -> bool:
        """Record an epoch's score; True when the rate is to be cut now."""
        if score > self.best + self.min_delta:
            self.best, self.best_epoch, self.since = score, epoch, 0
            self.weights = copy.deepcopy(model.state_dict())
            return False
        self.since += 1
        if self.patience == 0 or self.since < self.patience:
            return False
        if self.cuts_done < self.cuts:
            self.cuts_done, self.since = self.cuts_done + 1, 0
            return True
        self.stopped = True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "since": self.since, "cuts_done": self.cuts_done,
                "stopped": self.stopped, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.since = state["best"], state["best_epoch"], state["since"]
        self.cuts_done, self.stopped, self.weights = state["cuts_done"], state["stopped"], state["weights"]


def start_from(model: nn.Module, path: Path) -> None:
    """Copy another attack's decoder into `model`. A label-aware U-Net started from a plain one gets zero weights on
    the answer's input planes: it starts exactly where the plain decoder ended."""
    src = nets.load(path)
    if nets.arch_of(src) != nets.arch_of(model):
        raise UserError(f"init {path} holds a {nets.arch_of(src)}, this attack builds a {nets.arch_of(model)}")
    state, own = src.state_dict(), model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape and own[key].shape[1] > value.shape[1]:
            widened = torch.zeros_like(own[key])
            widened[:, :value.shape[1]] = value
            state[key] = widened
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"init {path} does not fit this attack's decoder ({str(e).splitlines()[0][:150]})") from None


def attack_pairs(ctx: Context, uploads: Path) -> Context:
    """`ctx` with its training, validation and test images paired with their cached uploads (and C's answers, for
    a decoder that reads them). With `extra_obfuscators`, the training images take turns: image i goes through
    obfuscator i mod (1 + extras), the target first; validation and test pairs are always the target's."""
    cfg = ctx.cfg

    def cached(obfuscator: str, split: str, subset: str) -> tuple[np.ndarray, np.ndarray | None]:
        return cloud_view(uploads, obfuscator, ctx.data, subset, answers=cfg.reads_answer, split=split,
                          seed=cfg.seed if split == "train" else 0, bf16=ctx.bf16, device=ctx.device)

    n_train = len(ctx.train)
    up, ans = cached(cfg.obfuscator, "train", cfg.subset)
    upload, answer = up[:n_train].copy(), None if ans is None else ans[:n_train].copy()
    for k, other in enumerate(cfg.extra_obfuscators, 1):  # every (k+1)-th training image through another obfuscator
        o_up, o_ans = cached(other, "train", cfg.subset)
        mine = slice(k, n_train, len(cfg.extra_obfuscators) + 1)
        upload[mine] = o_up[mine]
        if answer is not None:
            answer[mine] = o_ans[mine]
    train = ctx.train.paired(upload, answer)
    val = ctx.val.paired(up[n_train:], None if ans is None else ans[n_train:]) if ctx.val is not None else None
    test = ctx.test.paired(*cached(cfg.obfuscator, "test", cfg.test_subset))
    torch.manual_seed(cfg.seed)  # building O and C for the cache drew from the generator: the decoder starts the same
    return dataclasses.replace(ctx, train=train, val=val, test=test,
                               steps=train.steps(ctx.batch, drop_last=True, world=ctx.dist.world))


class AttackTask(Task):
    stage = "attack"

    def __init__(self, ctx: Context):
        self.ctx, cfg = ctx, ctx.cfg
        image = ctx.data.image_args()
        if cfg.reads_answer:
            image["num_classes"] = len(ctx.data.classes)
        attacker = nets.build(cfg.arch, cfg.width, **image)
        if cfg.init:  # start from another attack's decoder (the adaptive attack, the label-aware decoder)
            start_from(attacker, run_weights(cfg.init, "attacker.safetensors", "attack"))
        self.attacker = ctx.place(attacker)
        self.best = ctx.place(copy.deepcopy(attacker)).eval()  # the weights of the best validation epoch
        # with local DP, the uploads it learns from and is scored on carry the noise: per epoch from the epoch's
        # seed (a resumed run draws what it would have), and the same validation and test noise at every evaluation
        self.mech = ldp.mechanism(cfg.ldp.epsilon, cfg.ldp.delta, ctx.data.shape, cfg.ldp.clip)
        self.noise = None
        self.net = ctx.ddp(self.attacker)
        self.opt, self.sched = ctx.optimizer(self.attacker.parameters(), cfg.optim)
        self.recon = reconstruction_loss(cfg.recon_loss)
        self.stopping = EarlyStopping(self.attacker, cfg.patience, cfg.min_delta, cfg.lr_cuts)
        if cfg.init:
            self.continue_schedule(Path(cfg.init))
        self.arch = nets.arch_of(self.attacker)
        self.parts = {"model": self.attacker, "optim": self.opt, "sched": self.sched, "early_stopping": self.stopping}

    def continue_schedule(self, init: Path) -> None:
        """A decoder continued from another attack's goes on where that one's schedule ended: at its last rate, with
        the rate cuts it had left (so a continuation of a converged decoder stops after `patience` flat epochs)."""
        last = next((r for r in reversed(read_metrics(init)) if "lr" in r), None)
        if last is None:
            return
        lr = last["lr"] * (self.ctx.cfg.lr_factor if last.get("lr_cut") else 1.0)
        self.sched.base_lrs = [lr for _ in self.sched.base_lrs]
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr"] / group["initial_lr"]
        self.stopping.cuts_done = min(last.get("lr_cuts", 0), self.stopping.cuts)

    def begin_epoch(self, epoch: int) -> None:
        if epoch == 0 and self.ctx.cfg.init and self.ctx.val is not None:  # the starting point is a candidate too
            self.stopping.update(0, self.score(self.ctx.val, self.attacker)[0], self.attacker)
        self.net.train()
        if self.mech is not None:
            self.noise = ldp.Noisy(self.mech, seed=epoch_seed(self.ctx.cfg.seed, epoch) * 64 + self.ctx.dist.rank + 1)

    def step(self, x: torch.Tensor, y: torch.Tensor, upload: torch.Tensor, answer: torch.Tensor | None) -> dict:
        if self.noise is not None:
            upload = quantize8(self.noise(upload))  # noise drawn on the cached upload, rounded to 8 bits again
        with self.ctx.autocast():
            loss = self.recon(nets.decode(self.net, upload, answer).float(), x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"train_reconstruction_loss": loss.detach()}

    def score(self, data: PairedData, net: nn.Module) -> tuple[float, float]:
        return pair_quality(net, data, bf16=self.ctx.bf16, dist=self.ctx.dist,
                            noise=ldp.Noisy(self.mech, seed=0) if self.mech else None)

    def end_epoch(self, epoch: int) -> dict:
        """Score the decoder on the validation split (never the test split), keep the best weights, cut the rate
        on a plateau, stop on the plateau after the last cut."""
        ctx = self.ctx
        lr = self.opt.param_groups[0]["lr"]
        if ctx.val is None:  # no validation: the last epoch's weights are the attack, and nothing says it converged
            self.stopping.update(epoch, float(epoch), self.attacker)
            return {"best_epoch": epoch, "steps": epoch * ctx.steps, "lr": lr, "converged": False}
        t0 = time.perf_counter()
        psnr, ssim = self.score(ctx.val, self.attacker)
        cut = self.stopping.update(epoch, psnr, self.attacker)
        if cut:
            factor = ctx.cfg.lr_factor
            self.sched.base_lrs = [b * factor for b in self.sched.base_lrs]
            for group in self.opt.param_groups:
                group["lr"] *= factor
        return {"val_psnr_db": psnr, "val_ssim": ssim, "best_epoch": self.stopping.best_epoch,
                "best_val_psnr_db": self.stopping.best, "steps": epoch * ctx.steps, "lr": lr, "lr_cut": cut,
                "lr_cuts": self.stopping.cuts_done, "converged": self.converged(), "val_time_s": time.perf_counter() - t0}

    def converged(self) -> bool:
        return self.stopping.stopped

    def best_model(self) -> nn.Module:
        self.best.load_state_dict(self.stopping.weights)
        return self.best

    def evaluate(self) -> dict:
        psnr, ssim = self.score(self.ctx.test, self.best_model())
        record = {"arch": self.ctx.cfg.arch, "attacker_psnr_db": psnr, "attacker_ssim": ssim}
        if self.mech is not None:
            record.update(ldp_epsilon=self.mech.epsilon, ldp_delta=self.mech.delta, ldp_sigma=self.mech.sigma)
        return record

    def save(self, folder: Path, epoch: int) -> None:
        nets.save(self.best_model(), folder / "attacker.safetensors", epoch=str(self.stopping.best_epoch),
                  obfuscator=str(self.ctx.cfg.obfuscator))

    def describe(self, r: dict) -> str:
        text = f"loss {r['train_reconstruction_loss']:.4f}"
        if "val_psnr_db" in r:
            text += f" val {r['val_psnr_db']:.2f} dB (best epoch {r['best_epoch']}, lr {r['lr']:.2g})"
        return text + (f" test {r['attacker_psnr_db']:.2f} dB ssim {r['attacker_ssim']:.3f}" if "attacker_psnr_db" in r else "")


def train_attack(cfg: AttackConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                 device: str = "auto", data_root: str | Path | None = None, uploads: str | Path | None = None) -> Path:
    """Train (or resume) a decoder attack in `out`; returns the path of the attacker's (best) weights. The uploads
    are cached in `uploads` (default OUT/uploads; an attack suite shares one folder among its attacks)."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root, val_split=cfg.val_split)
    for obfuscator in (cfg.obfuscator, *cfg.extra_obfuscators):
        check_input(load_codec(obfuscator), ctx.data, f"obfuscator {obfuscator}")
    ctx = attack_pairs(ctx, Path(uploads) if uploads else Path(out) / "uploads")
    return fit(ctx, AttackTask(ctx), resume=resume) / "attacker.safetensors"
