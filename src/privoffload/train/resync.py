"""Re-syncing an obfuscator to a classifier that changed, within budgets (docs/drift-robustness.md).

White-box (`white_box`): the new weights are known; O and D go on playing the game (train/game.py)
against them on the client's own labelled images for `steps` steps.

Black-box (`black_box`): only the API's probabilities are known. Each of `rounds` rounds uploads
obfuscated images of the client's own (never the images themselves: the API sees what it always
sees), distils a local surrogate S of the new classifier from every answer so far (KL divergence
to the API's probabilities; S starts from the classifier O was synced to, which the client has),
then plays the game against S. Every image sent is one query; `Budget` refuses to go past the cap.
Re-querying each round matters: O moves, and S is only right where it was shown answers.

These are algorithms on networks and tensors: the client (client/resync.py) runs them against a live
service, the protocol (experiments/protocol.py) against a local copy of the cloud's classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import nets
from ..config import ResyncConfig
from ..data import DeviceData, to_pixels
from ..errors import UserError
from ..runtime import autocast, epoch_seed, frozen, use_bf16
from .game import Readability, game_step, reconstruction_loss
from .loop import make_optimizer, schedule_factor

Api = Callable[[np.ndarray], np.ndarray]  # uint8 uploads [N, C, H, W] -> probabilities [N, classes]
OnEval = Callable[[int, int], None]  # (steps done, queries spent) -> None; the caller scores O as it likes


class Budget:
    """An API that counts the images sent to it and refuses to send more than `cap`."""

    def __init__(self, api: Api, cap: int):
        self.api, self.cap, self.used = api, cap, 0

    @property
    def left(self) -> int:
        return self.cap - self.used

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) > self.left:
            raise UserError(f"{len(pixels)} more queries would exceed the budget of {self.cap} ({self.used} spent)")
        self.used += len(pixels)
        return np.asarray(self.api(pixels), dtype=np.float32)


def local_api(classifier: nn.Module, device: torch.device | str = "cpu") -> Api:
    """The cloud's answer computed here, exactly as the service computes it: softmax of C(pixels / 255)."""
    classifier = frozen(classifier)

    @torch.no_grad()
    def api(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device).float() / 255
        return torch.cat([torch.softmax(classifier(x[i:i + 500]).float(), 1) for i in range(0, len(x), 500)]).cpu().numpy()

    return api


def _batches(data: DeviceData, cfg: ResyncConfig):
    """Shuffled (flipped) batches of the client's images, epoch after epoch, for as long as asked."""
    size, epoch = min(cfg.batch_size, len(data)), 0
    while True:
        yield from data.batches(size, shuffle=True, flip_images=cfg.flip, seed=epoch_seed(cfg.seed, epoch), drop_last=True)
        epoch += 1


class _Game:
    """O and D, their optimisers and a stream of batches: `play(readability, n)` takes n steps of the game."""

    def __init__(self, obf: nn.Module, deobf: nn.Module, data: DeviceData, cfg: ResyncConfig):
        if cfg.lam < 0:
            raise ValueError("resolve the game's lambda first (game_lambda)")
        self.obf, self.deobf, self.cfg, self.device = obf, deobf, cfg, data.device
        self.bf16 = use_bf16(cfg.precision, data.device)
        self.opt_o, self.opt_d = make_optimizer(obf.parameters(), cfg.optim_o), make_optimizer(deobf.parameters(), cfg.optim_d)
        per_epoch = max(1, len(data) // min(cfg.batch_size, len(data)))  # warm-up is given in epochs of the client's images
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(o, cfg.steps, min(
            int(o.warmup_epochs * per_epoch), cfg.steps - 1))) for opt, o in ((self.opt_o, cfg.optim_o), (self.opt_d, cfg.optim_d))]
        self.recon = reconstruction_loss("mse")
        self.stream = _batches(data, cfg)
        self.steps = 0

    def play(self, readability: Callable, n: int, on_eval: OnEval | None, queries: int = 0) -> None:
        for _ in range(n):
            self.obf.train()
            self.deobf.train()
            xb, yb = next(self.stream)
            game_step(self.obf, self.deobf, readability, xb, yb, self.opt_o, self.opt_d, lam=self.cfg.lam,
                      recon=self.recon, device=self.device, bf16=self.bf16)
            for schedule in self.schedules:
                schedule.step()
            self.steps += 1
            if on_eval and self.steps % self.cfg.eval_every == 0:
                on_eval(self.steps, queries)


def white_box(obf: nn.Module, deobf: nn.Module, classifier: nn.Module, data: DeviceData, cfg: ResyncConfig, *,
              on_eval: OnEval | None = None) -> None:
    """Fine-tune O and D (in place) against the new classifier's weights for cfg.steps steps."""
    game = _Game(obf, deobf, data, cfg)
    if on_eval:
        on_eval(0, 0)
    game.play(Readability(frozen(classifier)), cfg.steps, on_eval)
    if on_eval and game.steps % cfg.eval_every:
        on_eval(game.steps, 0)


def black_box(obf: nn.Module, deobf: nn.Module, api: Budget, data: DeviceData, cfg: ResyncConfig,
              surrogate: nn.Module, *, on_eval: OnEval | None = None) -> nn.Module:
    """Fine-tune O and D (in place) against a surrogate distilled from the API's answers; returns the surrogate.

    `surrogate` is changed in place too: pass a copy of the classifier O was synced to.
    """
    device, bf16 = data.device, use_bf16(cfg.precision, data.device)
    game = _Game(obf, deobf, data, cfg)
    opt_s = make_optimizer(surrogate.parameters(), cfg.optim_surrogate)
    uploads, answers = [], []
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    sent = 0
    if on_eval:
        on_eval(0, api.used)
    for r in range(cfg.rounds):
        # 1. upload O(x) of the next images of our own (8-bit, as always), read the new classifier's probabilities
        n = api.left // (cfg.rounds - r)
        idx = order[torch.arange(sent, sent + n, device=device) % len(data)]
        sent += n
        x = data.x[idx].float() / 255
        obf.eval()
        with torch.no_grad(), autocast(device, bf16):
            pixels = to_pixels(obf(x))
        uploads.append(pixels)
        answers.append(torch.from_numpy(api(pixels.cpu().numpy())).to(device))
        # 2. distil: the surrogate learns to answer like the API on every upload so far (BatchNorm statistics kept)
        distil(surrogate, torch.cat(uploads), torch.cat(answers), opt_s, cfg, bf16, seed=cfg.seed * 1000 + r)
        # 3. the game against the surrogate, for this round's share of the steps
        n_steps = cfg.steps * (r + 1) // cfg.rounds - cfg.steps * r // cfg.rounds
        game.play(Readability(frozen(surrogate)), n_steps, on_eval, api.used)
        if on_eval and game.steps % cfg.eval_every:
            on_eval(game.steps, api.used)
    return surrogate


def distil(surrogate: nn.Module, pixels: torch.Tensor, probs: torch.Tensor, opt: torch.optim.Optimizer,
           cfg: ResyncConfig, bf16: bool, seed: int) -> None:
    """cfg.surrogate_steps steps of KL(API || surrogate) on random batches of (upload, answer) pairs."""
    surrogate.eval()  # BatchNorm keeps its statistics: uploads are not the clean images they were measured on
    surrogate.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.surrogate_steps):
        idx = torch.randint(len(pixels), (min(cfg.batch_size, len(pixels)),), generator=gen).to(pixels.device)
        with autocast(pixels.device, bf16):
            logits = surrogate(pixels[idx].float() / 255).float()
        loss = F.kl_div(F.log_softmax(logits, 1), probs[idx], reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    frozen(surrogate)


def game_lambda(cfg: ResyncConfig, obfuscator_file: str | Path) -> float:
    """The lambda to re-sync with: the config's, or (lam < 0) the one O was trained with, from its weights' metadata."""
    if cfg.lam >= 0:
        return cfg.lam
    lam = nets.read_metadata(obfuscator_file).get("lam")
    if lam is None:
        raise UserError(f"{obfuscator_file} does not say which lambda it was trained with; set the re-sync's lam")
    return float(lam)
