"""The client's side of re-syncing: its folder (`ClientState`) and `resync`, which picks white-box or
black-box, runs the algorithm of train/resync.py against the live service and writes the new networks back.

White-box needs the publisher's key on the client: weights the obfuscator is trained against must be the ones
the publisher signed. Black-box counts every upload against the budget, retries included.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import config as config_mod
from .. import nets
from ..config import ObfuscatorConfig, ResyncConfig
from ..data import DeviceData
from ..errors import UserError
from ..runs import load_classifier
from ..runtime import atomic_path
from ..train.resync import Budget, black_box, game_lambda, white_box
from .client import Client, WeightsUnavailable
from .obfuscator import dataset_of

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
        nets.save(load_classifier(cfg.classifier), path / "classifier.safetensors")
        nets.save(nets.load(run / "deobfuscator.safetensors", expect=nets.DECODERS), path / "deobfuscator.safetensors")
        nets.save(nets.load(run / "obfuscator.safetensors", expect="codec"), path / "obfuscator.safetensors",
                  model_version=model_version, lam=repr(cfg.lam), dataset=dataset_of(run))
        return cls(path)

    @property
    def model_version(self) -> str | None:
        return nets.read_metadata(self.path / "obfuscator.safetensors").get("model_version") or None

    def networks(self, device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module, nn.Module | None]:
        classifier = self.path / "classifier.safetensors"
        return (nets.load(self.path / "obfuscator.safetensors", expect="codec", device=device),
                nets.load(self.path / "deobfuscator.safetensors", expect=nets.DECODERS, device=device),
                nets.load(classifier, expect="resnet18", device=device) if classifier.exists() else None)

    def save(self, obf: nn.Module, deobf: nn.Module, classifier: nn.Module, model_version: str, mode: str,
             lam: float) -> None:
        """Each file atomically and durably; O last, so its model_version is only claimed once the rest is written.
        The O it replaces stays as obfuscator.previous.safetensors (to go back by hand if the new one disappoints)."""
        with atomic_path(self.path / "obfuscator.previous.safetensors") as tmp:
            shutil.copyfile(self.path / "obfuscator.safetensors", tmp)
        nets.save(classifier, self.path / "classifier.safetensors", model_version=model_version, mode=mode)
        nets.save(deobf, self.path / "deobfuscator.safetensors", model_version=model_version)
        nets.save(obf, self.path / "obfuscator.safetensors", model_version=model_version, mode=mode, lam=repr(lam),
                  dataset=dataset_of(self.path))


def resync(state: ClientState, client: Client, images: np.ndarray, labels: np.ndarray, cfg: ResyncConfig,
           device: str = "cpu") -> dict:
    """Re-sync the client's O and D to the model the cloud serves now; returns what was done.

    White-box where the cloud publishes the weights (mode auto or white-box), else black-box over `client`.
    """
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, lam=game_lambda(cfg, state.path / "obfuscator.safetensors"))
    obf, deobf, known = state.networks(device)
    data = DeviceData(images, labels, device)
    version = client.last_version
    if version is None:  # nothing classified yet: one upload tells which version serves
        version = client.send(np.zeros((1, *nets.image_shape(obf)), np.uint8)).model_version
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
        new = black_box(obf, deobf, api, data, cfg, [known])
        mode, queries, version = "black-box", api.used, client.last_version
    state.save(obf, deobf, new, version, mode, cfg.lam)
    (state.path / ".downloaded.safetensors").unlink(missing_ok=True)
    return {"mode": mode, "model_version": version, "steps": cfg.steps, "queries": queries,
            "seconds": round(time.perf_counter() - t0, 2)}
