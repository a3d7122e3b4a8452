"""Training of the cloud's classifier C: the baseline C0, and the cloud's later updates (experiment 1, `init` = C0).

`probes` are obfuscators whose accuracy on the current C is measured at every evaluation: that is how
experiment 1 watches O0 degrade while C keeps training.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import nets
from ..config import ClassifierConfig
from ..data import Cifar10
from ..metrics import accuracy, obfuscation_scores
from ..runs import run_weights
from .loop import Context, Task, fit


class ClassifierTask(Task):
    stage = "classifier"

    def __init__(self, ctx: Context, probes: dict[str, nn.Module] | None = None):
        self.ctx, cfg = ctx, ctx.cfg
        model = nets.resnet18(cfg.width)
        if cfg.init:  # the cloud trains on from an earlier classifier
            nets.load_into(model, run_weights(cfg.init, "classifier.safetensors", "classifier"))
        self.model = ctx.place(model)
        self.net = ctx.ddp(self.model)
        self.opt, self.sched = ctx.optimizer(self.model.parameters(), cfg.optim)
        self.probes = {k: v.to(ctx.device).eval() for k, v in (probes or {}).items()}
        self.arch = nets.arch_of(self.model)
        self.parts = {"model": self.model, "optim": self.opt, "sched": self.sched}

    def begin_epoch(self, epoch: int) -> None:
        self.net.train()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.ctx.autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"train_loss": loss.detach(), "train_accuracy": (logits.argmax(1) == y).float().mean()}

    def evaluate(self) -> dict:
        ctx = self.ctx
        record = {"test_accuracy": accuracy(self.model, ctx.test, bf16=ctx.bf16, dist=ctx.dist)}
        if self.probes:
            record["probes"] = {name: obfuscation_scores(self.model, obf, ctx.test, unquantized=False, bf16=ctx.bf16,
                                                         dist=ctx.dist)  # the 8-bit upload's accuracy, what counts
                                for name, obf in self.probes.items()}
        return record

    def save(self, folder: Path, epoch: int) -> None:
        nets.save(self.model, folder / "classifier.safetensors", epoch=str(epoch))

    def describe(self, r: dict) -> str:
        text = f"loss {r['train_loss']:.3f} train {r['train_accuracy']:.3f}"
        return text + (f" test {r['test_accuracy']:.4f}" if "test_accuracy" in r else "")


def train_classifier(cfg: ClassifierConfig, out: str | Path, *, resume: bool = False, data: Cifar10 | None = None,
                     device: str = "auto", probes: dict[str, nn.Module] | None = None,
                     data_root: str | Path | None = None) -> Path:
    """Train (or resume) a classifier run in `out`; returns the path of its weights."""
    ctx = Context.open(cfg, out, data=data, device=device, data_root=data_root)
    return fit(ctx, ClassifierTask(ctx, probes), resume=resume) / "classifier.safetensors"
