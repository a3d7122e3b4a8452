"""The model repository on disk: one folder per model name, one numbered folder per version.

    REPO/cifar10-resnet18/1/model.safetensors
    REPO/cifar10-resnet18/1/manifest.json   {name, version, architecture, width, classes, created, sha256, source, shape}

A version is published by building it in a hidden temporary folder and renaming that folder to the
next number, so a version folder is either complete or absent. Loading a version checks the
file's sha256 against the manifest, the architecture in the file against the manifest, and that
the weights fit; only then is the model handed out. The input shape (channels, height, width) and the
class names come from the classifier file's metadata (`nets`); files and manifests from before they
were recorded are CIFAR-10's: 3x32x32 and its ten classes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import nets
from ..data import CLASSES
from ..errors import UserError

CIFAR_SHAPE = (3, 32, 32)

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
ARCHITECTURE = "resnet18"  # the only architecture the cloud serves: the classifier
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    architecture: str
    width: int
    classes: tuple[str, ...]
    created: str
    sha256: str
    source: str = ""
    shape: tuple[int, int, int] = CIFAR_SHAPE  # the images it takes: channels, height, width

    @property
    def signature(self) -> tuple:
        """What clients see of a model (its tensors): versions of one name must agree on it."""
        return (self.architecture, self.width, self.classes, self.shape)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "classes": list(self.classes), "shape": list(self.shape)}, indent=1)


@dataclass
class LoadedModel:
    """One verified version, on its device, in eval mode; `predict` is all the service calls."""

    manifest: Manifest
    model: nn.Module
    device: torch.device

    @property
    def version(self) -> int:
        return self.manifest.version

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Float images [N, *shape] in [0, 1] -> class probabilities [N, classes] (float32)."""
        logits = self.model(x.to(self.device, non_blocking=True))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_version(text: str) -> int | None:
    """'3' -> 3; anything else (including '03', '-1', '²') -> None."""
    return int(text) if VERSION.match(text) else None


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UserError(f"model name {name!r} must be letters, digits, '_', '.', '-' (at most 64, not starting with '.' or '-')")
    return name


class Repository:
    """The folder of models; every method reads the disk afresh (publishing may happen at any time)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name))

    def versions(self, name: str) -> list[int]:
        """Complete versions of a model, oldest first (a folder without a manifest is not one)."""
        folder = self.root / name
        if not NAME.match(name) or not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if parse_version(p.name) and (p / MANIFEST).is_file())

    def manifest(self, name: str, version: int) -> Manifest:
        path = self.root / name / str(version) / MANIFEST
        try:
            raw = json.loads(path.read_text())
            m = Manifest(name=raw["name"], version=int(raw["version"]), architecture=raw["architecture"],
                         width=int(raw["width"]), classes=tuple(raw["classes"]), created=raw["created"],
                         sha256=raw["sha256"], source=raw.get("source", ""),
                         shape=tuple(int(v) for v in raw.get("shape", CIFAR_SHAPE)))
            if len(m.shape) != 3:
                raise ValueError(f"shape {list(m.shape)[:5]} is not [channels, height, width]")
        except FileNotFoundError:
            raise UserError(f"{name} has no version {version} in {self.root}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a valid manifest ({type(e).__name__}: {str(e)[:100]})") from None
        if (m.name, m.version) != (name, version):
            raise UserError(f"{path} describes {m.name} version {m.version}, not {name} version {version}")
        return m

    def weights_path(self, name: str, version: int) -> Path:
        return self.root / name / str(version) / WEIGHTS

    def load(self, name: str, version: int | None = None, device: torch.device | str = "cpu",
             like: Manifest | None = None) -> LoadedModel:
        """Read, verify and warm up a version (the newest if None). `like`: the signature it must keep.

        Any problem is a UserError naming the file and what is wrong; nothing is half-loaded.
        """
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise UserError(f"no versions of {name!r} in {self.root}; publish one with `privoffload publish RUN --repo {self.root}`")
            version = versions[-1]
        m = self.manifest(name, version)
        path = self.weights_path(name, version)
        if m.architecture != ARCHITECTURE:
            raise UserError(f"{name} version {version} is a {m.architecture}; this service serves only {ARCHITECTURE} classifiers")
        if like is not None and m.signature != like.signature:
            raise UserError(f"{name} version {version} is {_sig(m)}, but {name} serves {_sig(like)}; "
                            f"publish another architecture under another name")
        if not path.is_file():
            raise UserError(f"{path} is missing")
        digest = sha256_of(path)
        if digest != m.sha256:
            raise UserError(f"{path} has sha256 {digest[:12]}..., its manifest says {m.sha256[:12]}...: the file is damaged")
        meta = nets.read_metadata(path)
        if meta.get("arch") != m.architecture or meta.get("width") != str(m.width):
            raise UserError(f"{path} holds a {meta.get('arch')} of width {meta.get('width')}, its manifest says {_sig(m)}")
        model = nets.build(m.architecture, m.width, **nets.image_args(meta, path))
        if model.fc.out_features != len(m.classes):
            raise UserError(f"{path}: the network has {model.fc.out_features} outputs, the manifest lists {len(m.classes)} classes")
        if nets.image_shape(model) != m.shape:
            raise UserError(f"{path} takes {nets.image_shape(model)} images, its manifest says {m.shape}")
        nets.load_into(model, path)
        loaded = LoadedModel(m, model.to(device).eval(), torch.device(device))
        probs = loaded.predict(torch.full((2, *m.shape), 0.5))  # a forward pass proves it runs here
        if probs.shape != (2, len(m.classes)) or not np.isfinite(probs).all():
            raise UserError(f"{path} gives non-finite or misshapen outputs; refusing it")
        return loaded

    def publish(self, weights: str | Path, name: str, source: str = "") -> Manifest:
        """Add a classifier's weights as the next version of `name`, atomically (folder rename)."""
        check_name(name)
        weights = Path(weights)
        meta = nets.read_metadata(weights)
        if meta.get("arch") != ARCHITECTURE:
            raise UserError(f"{weights} holds a {meta.get('arch')}, not a {ARCHITECTURE} classifier; only classifiers are published")
        model = nets.load(weights, expect=ARCHITECTURE)  # proves the weights fit the architecture
        width, classes, shape = int(meta["width"]), class_names(meta, weights), nets.image_shape(model)
        versions = self.versions(name)
        if versions:
            last = self.manifest(name, versions[-1])
            if (ARCHITECTURE, width, classes, shape) != last.signature:
                raise UserError(f"{name} holds {_sig(last)} models, {weights} is a {ARCHITECTURE} of width {width}; "
                                f"publish it under another --name")
        del model
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=folder))
        try:
            shutil.copyfile(weights, tmp / WEIGHTS)
            digest = sha256_of(tmp / WEIGHTS)
            created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            version = (versions[-1] if versions else 0) + 1
            while True:  # another publisher may take a number first: rename refuses, try the next one
                m = Manifest(name, version, ARCHITECTURE, width, classes, created, digest, source or str(weights), shape)
                (tmp / MANIFEST).write_text(m.to_json())
                for f in (tmp / WEIGHTS, tmp / MANIFEST):
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                try:
                    os.rename(tmp, folder / str(version))
                    return m
                except OSError:
                    if not (folder / str(version)).exists():
                        raise
                    version += 1
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def class_names(meta: dict[str, str], name: str | Path) -> tuple[str, ...]:
    """A classifier file's class names: its `classes` metadata, else CIFAR-10's for a 10-class file without them."""
    count = int(meta.get("num_classes", "10"))
    if "classes" not in meta:
        if count != len(CLASSES):
            raise UserError(f"{name} names none of its {count} classes; train it again to record them")
        return CLASSES
    try:
        names = json.loads(meta["classes"])
    except ValueError:
        names = None
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) and 0 < len(n) <= 200 for n in names):
        raise UserError(f"{name}: its class names do not match its {count} classes; train it again")
    return tuple(names)


def _sig(m: Manifest) -> str:
    return f"{m.architecture} of width {m.width} with {len(m.classes)} classes on {'x'.join(map(str, m.shape))} images"
