"""Re-syncing the obfuscator to a classifier that changed, within budgets (docs/drift-robustness.md).

White-box (`white_box`): the cloud publishes the new weights; O and D go on playing the game
(`train.obfuscator.game_step`) against them on the client's own labelled images for `steps` steps.

Black-box (`black_box`): the cloud answers only with probabilities. Each of `rounds` rounds uploads
obfuscated images of the client's own (never the images themselves: the API sees what it always
sees), distils a local surrogate S of the new classifier from every answer so far (KL divergence
to the API's probabilities; S starts from the classifier O was synced to, which the client has),
then plays the game against S. Every image sent is one query; `Budget` refuses to go past the cap.
Re-querying each round matters: O moves, and S is only right where it was shown answers.

`ClientState` is the client's folder (O, D and the classifier O is synced to); `resync` picks the
mode, runs it against a live `Client` and writes the new networks back. White-box needs the
publisher's key on the client: weights the obfuscator is trained against must be the ones the
publisher signed. Black-box counts every upload against the budget, retries included.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import config as config_mod
from .. import nets
from ..config import ObfuscatorConfig, ResyncConfig
from ..data import DeviceData
from ..errors import UserError
from ..runtime import atomic_path
from ..train.common import autocast, frozen, make_optimizer, use_bf16
from ..train.obfuscator import Readability, game_step, load_classifier, reconstruction_loss
from .client import Client, WeightsUnavailable

Api = Callable[[np.ndarray], np.ndarray]  # uint8 uploads [N, 3, 32, 32] -> probabilities [N, classes]
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
        yield from data.batches(size, shuffle=True, flip_images=cfg.flip, seed=cfg.seed * 100_003 + epoch, drop_last=True)
        epoch += 1


class _Game:
    """O and D, their optimisers and a stream of batches: `play(readability, n)` takes n steps of the game."""

    def __init__(self, obf: nn.Module, deobf: nn.Module, data: DeviceData, cfg: ResyncConfig):
        self.obf, self.deobf, self.cfg, self.device = obf, deobf, cfg, data.device
        self.bf16 = use_bf16(cfg.precision, data.device)
        self.opt_o, self.opt_d = make_optimizer(obf.parameters(), cfg.optim_o), make_optimizer(deobf.parameters(), cfg.optim_d)
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
            pixels = torch.round(obf(x).float().clamp(0, 1) * 255).to(torch.uint8)
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


# ---------------------------------------------------------------- the client's folder and the whole re-sync

class ClientState:
    """The client's folder: obfuscator.safetensors and deobfuscator.safetensors, plus classifier.safetensors,
    the classifier O is synced to (known weights, or the last surrogate). O's metadata names the model version."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for name in ("obfuscator", "deobfuscator"):
            if not (self.path / f"{name}.safetensors").is_file():
                raise UserError(f"{self.path} has no {name}.safetensors; make it with ClientState.create(obfuscator run, folder)")

    @classmethod
    def create(cls, obfuscator_run: str | Path, path: str | Path, model_version: str = "") -> "ClientState":
        """A client folder from an obfuscator run: its O, D and the classifier it was trained against."""
        run, path = Path(obfuscator_run), Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = config_mod.load(ObfuscatorConfig, run / "config.toml")
        nets.save(load_classifier(cfg.classifier, torch.device("cpu")), path / "classifier.safetensors")
        nets.save(nets.load(run / "deobfuscator.safetensors", expect="codec"), path / "deobfuscator.safetensors")
        nets.save(nets.load(run / "obfuscator.safetensors", expect="codec"), path / "obfuscator.safetensors",
                  model_version=model_version)
        return cls(path)

    @property
    def model_version(self) -> str | None:
        return nets.read_metadata(self.path / "obfuscator.safetensors").get("model_version") or None

    def networks(self, device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module, nn.Module | None]:
        classifier = self.path / "classifier.safetensors"
        return (nets.load(self.path / "obfuscator.safetensors", expect="codec", device=device),
                nets.load(self.path / "deobfuscator.safetensors", expect="codec", device=device),
                nets.load(classifier, expect="resnet18", device=device) if classifier.exists() else None)

    def save(self, obf: nn.Module, deobf: nn.Module, classifier: nn.Module, model_version: str, mode: str) -> None:
        """Each file atomically and durably; O last, so its model_version is only claimed once the rest is written.
        The O it replaces stays as obfuscator.previous.safetensors (to go back by hand if the new one disappoints)."""
        with atomic_path(self.path / "obfuscator.previous.safetensors") as tmp:
            shutil.copyfile(self.path / "obfuscator.safetensors", tmp)
        nets.save(classifier, self.path / "classifier.safetensors", model_version=model_version, mode=mode)
        nets.save(deobf, self.path / "deobfuscator.safetensors", model_version=model_version)
        nets.save(obf, self.path / "obfuscator.safetensors", model_version=model_version, mode=mode)


def resync(state: ClientState, client: Client, images: np.ndarray, labels: np.ndarray, cfg: ResyncConfig,
           device: str = "cpu") -> dict:
    """Re-sync the client's O and D to the model the cloud serves now; returns what was done.

    White-box where the cloud publishes the weights (mode auto or white-box), else black-box over `client`.
    """
    t0 = time.perf_counter()
    obf, deobf, known = state.networks(device)
    data = DeviceData(images, labels, device)
    version = client.last_version
    if version is None:  # nothing classified yet: one upload tells which version serves
        version = client.send(np.zeros((1, 3, 32, 32), np.uint8)).model_version
    if cfg.mode == "white-box" and client.publisher_key is None:
        raise UserError("white-box re-sync needs the publisher's public key (publisher_key=...) to check the "
                        "downloaded weights; without it, use black-box")
    new = None
    if cfg.mode in ("auto", "white-box") and client.publisher_key is not None:
        try:
            new = nets.load(client.download_weights(version, state.path / ".downloaded.safetensors"), expect="resnet18",
                            device=device)
        except WeightsUnavailable:
            if cfg.mode == "white-box":
                raise
    if new is not None:
        white_box(obf, deobf, new, data, cfg)
        mode, queries = "white-box", 0
    else:
        if known is None:
            raise UserError(f"{state.path} has no classifier.safetensors to start a surrogate from; black-box re-sync needs it")

        def charge_retries(images: int, attempt: int) -> None:
            """Budget counts each call's images once; a retry uploads them again, and is charged too."""
            if attempt:
                if images > api.left:
                    raise UserError(f"retrying would upload {images} more images, past the query budget of {cfg.max_queries}")
                api.used += images

        api = Budget(lambda pixels: client.send(pixels, on_upload=charge_retries).probabilities, cfg.max_queries)
        new = black_box(obf, deobf, api, data, cfg, copy.deepcopy(known))
        mode, queries, version = "black-box", api.used, client.last_version
    state.save(obf, deobf, new, version, mode)
    (state.path / ".downloaded.safetensors").unlink(missing_ok=True)
    return {"mode": mode, "model_version": version, "steps": cfg.steps, "queries": queries,
            "seconds": round(time.perf_counter() - t0, 2)}
