"""Re-syncing an obfuscator to a classifier that changed, within budgets (docs/drift-robustness.md).

White-box (`white_box`): the new weights are known; O and D go on playing the game (train/game.py)
against them on the client's own labelled images for `steps` steps.

Black-box (`black_box`): only the API's probabilities are known. Each of `rounds` rounds uploads
obfuscated images of the client's own (never the images themselves: the API sees what it always
sees), distils a local surrogate S of the new classifier from every answer so far (KL divergence
to the API's probabilities; S starts from the classifier O was synced to, which the client has),
then plays the game against S. Every image sent is one query; `Budget` refuses to go past the cap.
Re-querying each round matters: O moves, and S is only right where it was shown answers.

Output remapping (`fit_remap`, `Remapped`) can come first in either: a classes x classes map from the API's
log-probabilities on O's uploads of labelled images to the labels, fitted once, undoes a systematic confusion of
classes without a game step; the game then plays against the remapped classifier (or surrogate), and the client reads
the API's answers through the same map. What the game adds is its gain over the remap.

These are algorithms on networks and tensors: the client (client/resync.py) runs them against a live
service, the protocol (experiments/protocol.py) against a local copy of the cloud's classifier.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
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


def local_api(classifier: nn.Module, device: torch.device | str = "cpu", top_k: int = 0) -> Api:
    """The cloud's answer computed here, exactly as the service computes it: softmax of C(pixels / 255); with
    `top_k`, only the k most likely classes keep their probability (the others read 0), as some APIs answer."""
    classifier = frozen(classifier)

    @torch.no_grad()
    def api(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device).float() / 255
        probs = torch.cat([torch.softmax(classifier(x[i:i + 128]).float(), 1) for i in range(0, len(x), 128)])
        if top_k:
            kept = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, 1).indices, 1.0)
            probs = probs * kept
        return probs.cpu().numpy()

    return api


def complete(probs: torch.Tensor) -> torch.Tensor:
    """A full distribution from a partial answer: classes an API did not report (0) share the mass it left over."""
    missing = probs <= 0
    left = (1 - probs.sum(1, keepdim=True)).clamp(min=0)
    return torch.where(missing, left / missing.sum(1, keepdim=True).clamp(min=1), probs)


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
              candidates: list[nn.Module], *, on_eval: OnEval | None = None,
              on_round: Callable[[dict], None] | None = None, remap: nn.Linear | None = None) -> nn.Module:
    """Fine-tune O and D (in place) against a surrogate distilled from the API's answers; returns the surrogate.

    Round r sends query_growth ** r parts of the budget (growing rounds trace the query-budget curve in one run:
    after each round O is scored with the queries spent so far).

    `candidates` are classifiers the surrogate may start from (the one O was synced to, any stand-ins for the
    update): a copy of the one whose answers agree best with the API's first round is distilled; none is changed.
    After each round `on_round` gets the round, the queries spent and the surrogate's agreement with the API on
    that round's held-out queries, so that a failure can be blamed on the surrogate or on the game. With `remap`
    (fitted on the API's answers), the game plays against the remapped surrogate; the surrogate itself learns the API.
    """
    device, bf16 = data.device, use_bf16(cfg.precision, data.device)
    game = _Game(obf, deobf, data, cfg)
    draw = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data), generator=draw).to(device)
    uploads, answers, surrogate, opt_s, sent = [], [], None, None, 0
    if on_eval:
        on_eval(0, api.used)
    for r in range(cfg.rounds):
        # 1. upload this round's queries (8-bit, as always) and read the new classifier's (partial) probabilities
        later = [cfg.query_growth ** k for k in range(r, cfg.rounds)]  # this round's share of what is left
        n = max(1, int(api.left * later[0] / sum(later)))
        idx = order[torch.arange(sent, sent + n, device=device) % len(data)]
        sent += n
        guide = remapped(surrogate if surrogate is not None else candidates[0], remap)
        pixels = make_queries(obf, deobf, data.x[idx].float() / 255, data.y[idx], cfg, guide, draw, bf16)
        probs = complete(torch.from_numpy(api(pixels.cpu().numpy())).to(device))
        held = torch.rand(len(pixels), generator=draw).to(device) < cfg.held_out
        if surrogate is None:
            surrogate = copy.deepcopy(pick_start(candidates, pixels, probs, bf16))
            opt_s = make_optimizer(surrogate.parameters(), cfg.optim_surrogate)
        uploads.append(pixels[~held])
        answers.append(probs[~held])
        # 2. distil: the surrogate learns to answer like the API on every upload so far
        distil(surrogate, torch.cat(uploads), torch.cat(answers), opt_s, cfg, bf16, seed=cfg.seed * 1000 + r)
        if on_round:
            on_round({"round": r + 1, "queries": api.used, "held_out": int(held.sum()),
                      "agreement": top1_agreement(surrogate, pixels[held], probs[held], bf16) if held.any() else None})
        # 3. the game against the surrogate, for this round's share of the steps
        n_steps = cfg.steps * (r + 1) // cfg.rounds - cfg.steps * r // cfg.rounds
        game.play(Readability(frozen(remapped(surrogate, remap))), n_steps, on_eval, api.used)
        if on_eval and game.steps % cfg.eval_every:
            on_eval(game.steps, api.used)
    return surrogate


def pick_start(candidates: list[nn.Module], pixels: torch.Tensor, probs: torch.Tensor, bf16: bool) -> nn.Module:
    """The candidate that already answers most like the API (top-1 agreement on these uploads); the first on a tie."""
    agree = [top1_agreement(c, pixels, probs, bf16) for c in candidates]
    return candidates[max(range(len(candidates)), key=lambda i: (agree[i], -i))]


@torch.no_grad()
def top1_agreement(classifier: nn.Module, pixels: torch.Tensor, probs: torch.Tensor, bf16: bool) -> float:
    """How often `classifier` names the class the API named most likely, on these uploads."""
    classifier.eval()
    with autocast(pixels.device, bf16):
        named = torch.cat([classifier(pixels[i:i + 128].float() / 255).argmax(1) for i in range(0, len(pixels), 128)])
    return (named == probs.argmax(1)).float().mean().item()


def make_queries(obf: nn.Module, deobf: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ResyncConfig,
                 surrogate: nn.Module, draw: torch.Generator, bf16: bool) -> torch.Tensor:
    """One round's uploads, uint8, in equal shares of the kinds in `cfg.queries` (one image each):

    plain: O(x); flip: O(mirrored x); mixup: a random blend of two uploads; noise: O(x) plus Gaussian noise (sd 0.05);
    lookahead: O'(x), O' a copy of O advanced `lookahead_steps` steps of the game against the surrogate, so that the
    surrogate learns where O is going, not only where it is.
    """
    device, kinds = x.device, cfg.queries
    share = torch.arange(len(x)) % len(kinds)
    out = torch.empty_like(x)
    obf.eval()
    with torch.no_grad(), autocast(device, bf16):
        z = obf(x).float()
        for k, kind in enumerate(kinds):
            sel = (share == k).to(device)
            if kind == "plain":
                out[sel] = z[sel]
            elif kind == "flip":
                out[sel] = obf(x[sel].flip(-1)).float()
            elif kind == "mixup":
                partner = z[torch.randperm(len(z), generator=draw).to(device)][sel]
                a = torch.rand(int(sel.sum()), 1, 1, 1, generator=draw).to(device)
                out[sel] = a * z[sel] + (1 - a) * partner
            elif kind == "noise":
                out[sel] = z[sel] + 0.05 * torch.randn(z[sel].shape, generator=draw).to(device)
    if "lookahead" in kinds:
        sel = (share == kinds.index("lookahead")).to(device)
        ahead, ahead_d = copy.deepcopy(obf), copy.deepcopy(deobf)
        game = _Game(ahead, ahead_d, DeviceData(to_pixels(x).cpu().numpy(), y.cpu().numpy(), device),
                     replace(cfg, steps=max(1, cfg.lookahead_steps)))
        game.play(Readability(frozen(copy.deepcopy(surrogate))), cfg.lookahead_steps, None)
        ahead.eval()
        with torch.no_grad(), autocast(device, bf16):
            out[sel] = ahead(x[sel]).float()
    return to_pixels(out)


def distil(surrogate: nn.Module, pixels: torch.Tensor, probs: torch.Tensor, opt: torch.optim.Optimizer,
           cfg: ResyncConfig, bf16: bool, seed: int) -> None:
    """cfg.surrogate_steps steps of KL(API || surrogate) + CE(surrogate, the API's top answer) on random batches of
    (upload, answer) pairs, BatchNorm in training mode: uploads are not the clean images its statistics came from."""
    surrogate.train()
    surrogate.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.surrogate_steps):
        idx = torch.randint(len(pixels), (min(cfg.batch_size, len(pixels)),), generator=gen).to(pixels.device)
        with autocast(pixels.device, bf16):
            logits = surrogate(pixels[idx].float() / 255).float()
        target = probs[idx]
        loss = F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean") + F.cross_entropy(logits, target.argmax(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    frozen(surrogate)


def fit_remap(probs: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> nn.Linear:
    """The output-mapping baseline (after BAR's output mapping): a classes x classes logistic regression from the API's
    log-probabilities on O's uploads of labelled images to the labels. No game step: it shows how much of a drop is
    systematic class confusion that relabelling alone undoes."""
    classes = probs.shape[1]
    remap = nn.Linear(classes, classes)
    with torch.no_grad():  # start at the identity: the API's own answer
        remap.weight.copy_(torch.eye(classes))
        remap.bias.zero_()
    features = probs.clamp(min=1e-6).log()
    opt = torch.optim.LBFGS(remap.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(remap(features), labels) + 1e-4 * remap.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return remap.requires_grad_(False)


class Remapped(nn.Module):
    """A classifier whose answers are read through an output map: remap(log softmax(C(x))), the features
    `fit_remap` was fitted on."""

    def __init__(self, classifier: nn.Module, remap: nn.Linear):
        super().__init__()
        self.classifier, self.remap = classifier, remap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remap(F.log_softmax(self.classifier(x).float(), 1).clamp(min=math.log(1e-6)))


def remapped(classifier: nn.Module, remap: nn.Linear | None) -> nn.Module:
    """`classifier` read through `remap`; itself where there is no map."""
    return classifier if remap is None else Remapped(classifier, remap)


def remap_state(remap: nn.Linear) -> dict[str, list]:
    """A fitted map as plain lists (it is classes x classes + classes numbers): a JSON record, read by `remap_from`."""
    return {"weight": remap.weight.tolist(), "bias": remap.bias.tolist()}


def remap_from(state: dict[str, list], device: torch.device | str = "cpu") -> nn.Linear:
    weight = torch.tensor(state["weight"], dtype=torch.float32)
    remap = nn.Linear(weight.shape[1], weight.shape[0]).requires_grad_(False)
    remap.weight.copy_(weight)
    remap.bias.copy_(torch.tensor(state["bias"], dtype=torch.float32))
    return remap.to(device)


def game_lambda(cfg: ResyncConfig, obfuscator_file: str | Path) -> float:
    """The lambda to re-sync with: the config's, or (lam < 0) the one O was trained with, from its weights' metadata."""
    if cfg.lam >= 0:
        return cfg.lam
    lam = nets.read_metadata(obfuscator_file).get("lam")
    if lam is None:
        raise UserError(f"{obfuscator_file} does not say which lambda it was trained with; set the re-sync's lam")
    return float(lam)
