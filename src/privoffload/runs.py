"""Run folders, the unit of work: writing one (config, metrics log, checkpoints, DONE) and loading what it holds.

    config.toml          the resolved settings the run was made with
    metrics.jsonl        one JSON record per epoch (or evaluation), appended and fsynced
    *.safetensors        weights whose metadata names the architecture
    checkpoint.pt        networks, optimisers, schedules and RNG after the last finished epoch
    DONE                 written once the run is complete

Stages compose through run folders (`train-obfuscator --classifier RUN`), so everything that
opens another stage's weights goes through the loaders at the end of this module.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config as config_mod
from . import nets
from .errors import UserError
from .runtime import Dist, atomic_path, atomic_write_bytes, atomic_write_text, rng_state, set_rng_state


class RunDir:
    """A run folder being written. Under DDP only rank 0 writes; every rank reads."""

    def __init__(self, path: str | Path, dist: Dist = Dist()):
        self.path = Path(path)
        self.dist = dist
        if dist.main:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def start(self, cfg: Any, resume: bool) -> None:
        """Write the resolved config; refuse to overwrite a run, or to resume with another config."""
        cfg_path = self.path / "config.toml"
        new = config_mod.to_toml(cfg)
        if cfg_path.exists() or self.checkpoint_path.exists():
            if not resume:
                raise UserError(f"{self.path} already holds a run; pass --resume to continue it, or choose a new --out")
            if cfg_path.exists() and cfg_path.read_text() != new:
                raise UserError(f"{self.path}/config.toml differs from this config; resume with the same settings, or use a new --out")
        self.dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if self.dist.main:
            atomic_write_text(cfg_path, new)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (fsynced, so a kill loses at most this line)."""
        if not self.dist.main:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def restore(self, arch: dict[str, Any], parts: dict[str, Any], resume: bool) -> int:
        """On resume: load the last checkpoint into `parts` (name -> anything with load_state_dict),
        restore the RNG and drop metrics logged after it. Returns the number of finished epochs."""
        if not resume:
            return 0
        state = self._load_checkpoint(arch)
        start = 0
        if state is not None:
            for key, part in parts.items():
                part.load_state_dict(state[key])
            set_rng_state(state["rng"])
            start = state["epoch"]
        if self.dist.main:  # the epoch after the checkpoint is done again: drop what it logged
            kept = [r for r in self.metrics() if r.get("epoch", 0) <= start]
            if len(kept) < len(self.metrics()):
                atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        return start

    def checkpoint(self, arch: dict[str, Any], epoch: int, parts: dict[str, Any]) -> None:
        """Save `parts` (the names `restore` takes), the RNG and the number of finished epochs, atomically."""
        if self.dist.main:
            state = {"arch": arch, "epoch": epoch, "rng": rng_state(), **{k: p.state_dict() for k, p in parts.items()}}
            with atomic_path(self.checkpoint_path) as tmp:
                torch.save(state, tmp)
        self.dist.barrier()

    def _load_checkpoint(self, arch: dict[str, Any]) -> dict[str, Any] | None:
        """The last checkpoint, if any; an error if it was written for other networks."""
        if not self.checkpoint_path.exists():
            return None
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{self.checkpoint_path} is unreadable ({type(e).__name__}); delete it to start the run over") from None
        if state.get("arch") != arch:
            raise UserError(
                f"{self.checkpoint_path} is for {state.get('arch')}, this config builds {arch}; use the same settings or a new --out"
            )
        return state

    def finish(self) -> None:
        """Mark the run complete; the checkpoint stays so that a finished run can be extended."""
        if self.dist.main and not is_done(self.path):  # a reused run stays as it was
            atomic_write_bytes(self.path / "DONE", b"")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    f = Path(path) / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def last_record(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The last record that carries `key` (the last evaluation of that metric)."""
    return next((r for r in reversed(records) if key in r), None)


def is_done(path: str | Path) -> bool:
    return (Path(path) / "DONE").exists()


# ---------------------------------------------------------------- loading what a run holds

def run_weights(run: str | Path, filename: str, what: str) -> Path:
    """`run/filename`, or a one-line error that says which run is missing what."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{what} run {run} does not exist")
    path = run / filename
    if not path.exists():
        raise UserError(f"{run} has no {filename}; is it a {what} run that finished an epoch?")
    return path


def run_dataset(run: str | Path) -> tuple[str, str]:
    """(dataset, image_size) a run folder's config.toml names; CIFAR-10 for runs from before data sets were a setting."""
    path = Path(run) / "config.toml"
    try:
        saved = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run} has no config.toml; is it a run folder?") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    return str(saved.get("dataset", "cifar10")), str(saved.get("image_size", ""))


def load_classifier(run: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """C of a classifier run folder, or of a classifier .safetensors file."""
    path = Path(run) if Path(run).is_file() else run_weights(run, "classifier.safetensors", "classifier")
    return nets.load(path, expect="resnet18", device=device)


def load_codec(run: str | Path, name: str = "obfuscator", device: torch.device | str = "cpu") -> nn.Module:
    """O (name="obfuscator", a codec) or its co-trained D (name="deobfuscator", a codec or a U-Net) of an obfuscator run."""
    return nets.load(run_weights(run, f"{name}.safetensors", "obfuscator"),
                     expect="codec" if name == "obfuscator" else nets.DECODERS, device=device)


def load_attacker(run: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The decoder of an attack run."""
    return nets.load(run_weights(run, "attacker.safetensors", "attack"), device=device)
