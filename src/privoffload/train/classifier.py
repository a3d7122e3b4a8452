"""Training of the cloud's classifier C: the baseline C0, and the cloud's later updates (experiment 1, `init` = C0).

`probes` are obfuscators whose accuracy on the current C is measured at every evaluation: that is how
experiment 1 watches O0 degrade while C keeps training.

A compatible update (`compat`, docs/drift-robustness.md) adds a term that keeps the new C's answers on the uploads
of every obfuscator the cloud has published close to the answers of the classifier that obfuscator was trained
against (Compatibility below): the cloud keeps the promise its published obfuscators rely on.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import nets
from ..config import ClassifierConfig
from ..data import Dataset, quantize8
from ..errors import UserError
from ..metrics import accuracy, obfuscation_scores, upload_accuracies
from ..runs import load_classifier, load_codec, run_dataset, run_weights
from ..runtime import frozen
from .loop import Context, Task, check_input, fit


def published(run: str, ctx: Context) -> tuple[nn.Module, nn.Module]:
    """A published obfuscator O and the classifier it was trained against (its run's `classifier`), both frozen on
    this run's device; a one-line error for a run that is not an obfuscator, or one made for other images."""
    obf = load_codec(run)
    dataset, _ = run_dataset(run)
    if dataset != ctx.data.name:
        raise UserError(f"obfuscator {run} was trained on the data set {dataset!r}; this classifier trains on "
                        f"{ctx.data.name!r}: it can only keep obfuscators of its own images compatible")
    check_input(obf, ctx.data, f"obfuscator {run}")
    old = tomllib.loads((Path(run) / "config.toml").read_text()).get("classifier")
    if not old:
        raise UserError(f"{run}/config.toml names no classifier: is it an obfuscator run?")
    old_c = check_input(load_classifier(old), ctx.data, f"classifier {old} (that obfuscator {run} was trained against)")
    return frozen(ctx.place(obf)), frozen(ctx.place(old_c))


class Compatibility:
    """The compatibility term of a compatible update (BCT, Shen et al. 2020; positive-congruent training, Yan et al.
    2021), on obfuscated inputs. For each published obfuscator O_k and the classifier C_k it was trained against,
    on the 8-bit uploads u = O_k(x) of the step's own images:

        kl:    mean over the images of KL(C_k(u) || C(u))
        focal: the same, counted only on the images C_k classified right (focal distillation with alpha 0,
               beta 1: the new C is free where the obfuscator already failed)

    and the mean over the obfuscators. The uploads and C_k's answers take no gradient; C reads the uploads in eval
    mode, with the BatchNorm statistics it serves with (and without moving them: they stay the clean images')."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]], loss: str):
        self.pairs, self.focal = pairs, loss == "focal"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        total = x.new_zeros(())
        for obf, old in self.pairs:
            with torch.no_grad():
                upload = quantize8(obf(x).float())
                target = F.log_softmax(old(upload).float(), 1)
            per_image = F.kl_div(F.log_softmax(model(upload).float(), 1), target, log_target=True,
                                 reduction="none").sum(1)
            if self.focal:
                per_image = per_image * (target.argmax(1) == y)
            total = total + per_image.mean()
        model.train(was_training)
        return total / len(self.pairs)


class ClassifierTask(Task):
    stage = "classifier"

    def __init__(self, ctx: Context, probes: dict[str, nn.Module] | None = None):
        self.ctx, cfg = ctx, ctx.cfg
        model = nets.resnet18(cfg.width, **ctx.data.classifier_args())
        if cfg.init:  # the cloud trains on from an earlier classifier
            path = run_weights(cfg.init, "classifier.safetensors", "classifier")
            check_input(nets.load(path), ctx.data, f"classifier {cfg.init}")
            nets.load_into(model, path)
        self.model = ctx.place(model)
        self.net = ctx.ddp(self.model)
        self.opt, self.sched = ctx.optimizer(self.model.parameters(), cfg.optim)
        self.probes = {k: check_input(v, ctx.data, f"probe {k}").to(ctx.device).eval() for k, v in (probes or {}).items()}
        self.published = {run: published(run, ctx) for run in cfg.compat.obfuscators}
        self.compat = (Compatibility(list(self.published.values()), cfg.compat.loss)
                       if self.published and cfg.compat.weight > 0 else None)  # weight 0: scored (val_compat), not trained
        self.arch = nets.arch_of(self.model)
        self.parts = {"model": self.model, "optim": self.opt, "sched": self.sched}

    def begin_epoch(self, epoch: int) -> None:
        self.net.train()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        with self.ctx.autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
            if self.compat is not None:  # through the module itself: one DDP forward per step, one backward
                out["train_compat_loss"] = self.compat(self.model, x, y)
                loss = loss + self.ctx.cfg.compat.weight * out["train_compat_loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.compat is not None:  # the eval-mode path can run away from the running statistics: bound the step
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.ctx.cfg.compat.max_grad_norm)
        self.opt.step()
        self.sched.step()
        return {"train_loss": loss.detach(), "train_accuracy": (logits.argmax(1) == y).float().mean(),
                **{k: v.detach() for k, v in out.items()}}

    def end_epoch(self, epoch: int) -> dict:
        """With a validation split (compat.val_split): the clean accuracy there, and for each published obfuscator
        its uploads' accuracy on the new C and the share of them it turned from right (on the old C) to wrong."""
        ctx = self.ctx
        if ctx.val is None:
            return {}
        record = {"val_accuracy": accuracy(self.model, ctx.val, bf16=ctx.bf16, dist=ctx.dist)}
        if self.published:
            record["val_compat"] = {run: upload_accuracies({"old": old, "new": self.model}, obf, ctx.val, bf16=ctx.bf16,
                                                           dist=ctx.dist, reference="old")
                                    for run, (obf, old) in self.published.items()}
        return record

    def evaluate(self) -> dict:
        ctx = self.ctx
        record = {"test_accuracy": accuracy(self.model, ctx.test, bf16=ctx.bf16, dist=ctx.dist)}
        if self.probes:
            record["probes"] = {name: obfuscation_scores(self.model, obf, ctx.test, unquantized=False, bf16=ctx.bf16,
                                                         dist=ctx.dist)  # the 8-bit upload's accuracy, what counts
                                for name, obf in self.probes.items()}
        return record

    def save(self, folder: Path, epoch: int) -> None:
        nets.save(self.model, folder / "classifier.safetensors", epoch=str(epoch), dataset=self.ctx.data.name,
                  classes=json.dumps(list(self.ctx.data.classes)))

    def describe(self, r: dict) -> str:
        text = f"loss {r['train_loss']:.3f} train {r['train_accuracy']:.3f}"
        return text + (f" test {r['test_accuracy']:.4f}" if "test_accuracy" in r else "")


def train_classifier(cfg: ClassifierConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                     device: str = "auto", probes: dict[str, nn.Module] | None = None,
                     data_root: str | Path | None = None) -> Path:
    """Train (or resume) a classifier run in `out`; returns the path of its weights."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root, val_split=cfg.compat.val_split)
    return fit(ctx, ClassifierTask(ctx, probes), resume=resume) / "classifier.safetensors"
