"""The model repository on disk: one folder per model name, one numbered folder per version.

    REPO/cifar10-resnet18/1/model.safetensors
    REPO/cifar10-resnet18/1/manifest.json   {name, version, architecture, width, classes, created, sha256, source, shape}
    REPO/cifar10-resnet18/1/manifest.sig    base64 Ed25519 signature of manifest.json (with `publish --signing-key`)
    REPO/cifar10-resnet18/served.json       {"version": 1, "recorded": ...}: the version every replica serves
    REPO/cifar10-resnet18/obfuscators/1/obfuscator.safetensors   a published obfuscator, registered (`register`)
    REPO/cifar10-resnet18/obfuscators/1/obfuscator.json          {version, sha256, source, works_with, registered, shape}

A manifest's `obfuscators` holds what the swap gate (cloud/gate.py) measured when the version was published: for
each obfuscator version registered then, its accuracy and negative-flip rate on the new classifier and whether the
version supports it. An obfuscator is supported by the version it was registered with (`works_with`) and by every
version whose manifest says so; a version published before it was registered does not support it.

Publishing adds a version; it does not serve it. Which version is served is recorded in `served.json`
(atomically: a temporary file renamed into place) when an admin loads one, and read by every server that
starts, so that replicas on one repository agree and a rollback outlives restarts. A repository without a
record serves its newest version that verifies, and records it.

A version is published by building it in a hidden temporary folder and renaming that folder to the
next number, so a version folder is either complete or absent; files and folders are readable by
all (0644, 0755: the server may run as another user) and synced to disk before and after the
rename; folders publish creates are 0755 whatever the umask, and the folder above a new one is synced too.
Hidden `.publish-*` folders left by a killed publish are removed by a later publish once they are an hour
old (a publish in progress is younger). Model names are checked wherever they reach the disk: `..` is no
model. Loading a version reads its file once, then checks those bytes: their sha256 against the
manifest, the architecture they hold against the manifest, and that the weights fit; only then is
the model handed out. A version that cannot be read is refused with the reason, like a damaged one.
Messages name versions (`cifar10-resnet18 version 3`), never paths on the server. The input shape
(channels, height, width) and the class names come from the classifier file's metadata (`nets`); files
and manifests from before they were recorded are CIFAR-10's: 3x32x32 and its ten classes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import nets
from ..data import CLASSES
from ..errors import UserError
from ..runtime import fsync_dir

CIFAR_SHAPE = (3, 32, 32)

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SERVED = "served.json"
OBFUSCATORS = "obfuscators"  # a model's registered obfuscators, one numbered folder each
OBFUSCATOR_WEIGHTS = "obfuscator.safetensors"
OBFUSCATOR_RECORD = "obfuscator.json"
STALE_PUBLISH_S = 3600  # a .publish-* folder this old was left by a publish that died
ARCHITECTURE = "resnet18"  # the only architecture the cloud serves: the classifier
CODEC = "codec"  # the architecture of the obfuscators it registers (it never runs them while serving)
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
VERSION = re.compile(r"[1-9][0-9]{0,8}")


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
    obfuscators: dict[str, dict] = field(default_factory=dict)  # the swap gate's measurements, by obfuscator version

    def supports(self, obfuscator: "Registration") -> bool:
        """Whether this version answers that obfuscator's clients: it is the version the obfuscator was registered
        with, or the gate found it within the flip-rate bound when this version was published."""
        return self.version == obfuscator.works_with or \
            self.obfuscators.get(str(obfuscator.version), {}).get("supported") is True

    @property
    def signature(self) -> tuple:
        """What clients see of a model (its tensors): versions of one name must agree on it."""
        return (self.architecture, self.width, self.classes, self.shape)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "classes": list(self.classes), "shape": list(self.shape)}, indent=1)


@dataclass(frozen=True)
class Registration:
    """A published obfuscator registered with a model: `works_with` is the classifier version serving when it was
    registered (the one its uploads are known to work with, and the swap gate's reference for it)."""

    version: int
    sha256: str
    source: str
    works_with: int
    registered: str
    shape: tuple[int, int, int]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "shape": list(self.shape)}, indent=1)


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
    """'3' -> 3; anything else (including '03', '-1', '²', '2\\n') -> None."""
    return int(text) if VERSION.fullmatch(text) else None


def new_key_pair(folder: str | Path, name: str = "publisher") -> tuple[Path, Path]:
    """A fresh Ed25519 key pair as PEM files (what `openssl genpkey -algorithm ed25519` makes): (private, public).
    The publisher signs with the first; clients check downloaded weights with the second."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = Path(folder) / f"{name}.pem", Path(folder) / f"{name}.pub"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the private key is never readable by others
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write(public, key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def signer(key_file: str | Path):
    """The publisher's Ed25519 private key (PEM, e.g. `openssl genpkey -algorithm ed25519`): bytes -> signature."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except OSError as e:
        raise UserError(f"cannot read the signing key {key_file} ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{key_file} is not an unencrypted PEM private key ({str(e)[:80]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{key_file} is not an Ed25519 key; make one with `openssl genpkey -algorithm ed25519 -out {key_file}`")
    return key.sign


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} is missing") from None
    except OSError as e:
        raise UserError(f"cannot read {what} ({e.strerror or type(e).__name__})") from None


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UserError(f"model name {name!r} must be letters, digits, '_', '.', '-' (at most 64, not starting with '.' or '-')")
    return name


class Repository:
    """The folder of models; every method reads the disk afresh (publishing may happen at any time)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if NAME.fullmatch(p.name) and p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise UserError(f"cannot read the model repository ({e.strerror or type(e).__name__})") from None

    def folder(self, name: str) -> Path:
        """A model's folder; a name that is not a model name (`..`, `a/b`) is refused before it reaches the disk."""
        return self.root / check_name(name)

    def versions(self, name: str) -> list[int]:
        """Complete versions of a model, oldest first (a folder without a manifest is not one; a folder that
        cannot be read is listed, and refused with the reason when loaded)."""
        if not NAME.fullmatch(name):
            return []
        folder = self.root / name
        try:
            return sorted(int(p.name) for p in folder.iterdir() if parse_version(p.name) and _complete(p))
        except OSError:  # no such model, or its folder cannot be read
            return []

    def manifest(self, name: str, version: int) -> Manifest:
        raw = self.manifest_text(name, version)
        where = f"{name} version {version}"
        try:
            raw = json.loads(raw)
            m = Manifest(name=raw["name"], version=int(raw["version"]), architecture=raw["architecture"],
                         width=int(raw["width"]), classes=tuple(raw["classes"]), created=raw["created"],
                         sha256=raw["sha256"], source=raw.get("source", ""),
                         shape=tuple(int(v) for v in raw.get("shape", CIFAR_SHAPE)),
                         obfuscators=raw.get("obfuscators", {}))
            if not isinstance(m.obfuscators, dict) or not all(isinstance(v, dict) for v in m.obfuscators.values()):
                raise ValueError("obfuscators is not an object of objects")
            if len(m.shape) != 3:
                raise ValueError(f"shape {list(m.shape)[:5]} is not [channels, height, width]")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where} has no valid {MANIFEST} ({type(e).__name__}: {str(e)[:100]})") from None
        if (m.name, m.version) != (name, version):
            raise UserError(f"the {MANIFEST} of {where} describes {m.name} version {m.version}")
        return m

    def manifest_text(self, name: str, version: int) -> str:
        """manifest.json exactly as published (what a signature covers)."""
        data = _read(self.folder(name) / str(version) / MANIFEST, f"{name} version {version}'s {MANIFEST}")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise UserError(f"{name} version {version}'s {MANIFEST} is not UTF-8") from None

    def signature(self, name: str, version: int) -> str | None:
        path = self.folder(name) / str(version) / SIGNATURE
        return _read(path, f"{name} version {version}'s {SIGNATURE}").decode("ascii", "replace").strip() \
            if path.exists() else None

    def weights_path(self, name: str, version: int) -> Path:
        return self.folder(name) / str(version) / WEIGHTS

    # ---- the served-version record

    def served(self, name: str) -> int | None:
        """The version recorded as served, or None where none is recorded (or the record is unreadable)."""
        try:
            raw = json.loads((self.folder(name) / SERVED).read_text())
            version = raw["version"] if isinstance(raw, dict) else None
        except (OSError, ValueError, KeyError, UserError):
            return None
        return version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else None

    def record_served(self, name: str, version: int, replace: bool = True) -> int:
        """Record `version` as the one `name` serves, atomically and durably (readable by all); returns the
        recorded version. `replace=False` records it only where nothing is recorded yet, so that servers starting
        at once agree on the first writer's. A record the server cannot write is a UserError (the load is refused:
        a restart would otherwise undo it)."""
        path = self.folder(name) / SERVED
        tmp = path.with_name(f".{SERVED}.tmp{os.getpid()}")
        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        try:
            _write(tmp, json.dumps({"version": version, "recorded": when}).encode() + b"\n")
            if replace:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # refuses to replace a record
                except FileExistsError:
                    return self.served(name) or version
            fsync_dir(path.parent)
        except OSError as e:
            raise UserError(f"cannot record {name} version {version} as served ({e.strerror or type(e).__name__}); "
                            f"the server needs write access to {name}/{SERVED} in the repository") from None
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        return version

    def load(self, name: str, version: int | None = None, device: torch.device | str = "cpu",
             like: Manifest | None = None) -> LoadedModel:
        """Read, verify and warm up a version (the newest if None). `like`: the signature it must keep.

        The file is read once; the checks and the network use those bytes (no gap between check and use).
        Any problem is a UserError naming the version and what is wrong; nothing is half-loaded.
        """
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise UserError(f"no versions of {name!r} in the repository; publish one with `privoffload publish RUN --repo REPO`")
            version = versions[-1]
        m = self.manifest(name, version)
        where = f"{name} version {version}"
        if m.architecture != ARCHITECTURE:
            raise UserError(f"{where} is a {m.architecture}; this service serves only {ARCHITECTURE} classifiers")
        if like is not None and m.signature != like.signature:
            raise UserError(f"{where} is {_sig(m)}, but {name} serves {_sig(like)}; publish another architecture under another name")
        file = f"{where}'s {WEIGHTS}"
        data = _read(self.weights_path(name, version), file)
        digest = hashlib.sha256(data).hexdigest()
        if digest != m.sha256:
            raise UserError(f"{file} has sha256 {digest[:12]}..., its manifest says {m.sha256[:12]}...: the file is damaged")
        meta, _ = nets.read_header(data, file)
        if meta.get("arch") != m.architecture or meta.get("width") != str(m.width):
            raise UserError(f"{file} holds a {str(meta.get('arch'))[:20]} of width {str(meta.get('width'))[:8]}, "
                            f"its manifest says {_sig(m)}")
        model = nets.load_bytes(data, file, expect=ARCHITECTURE)
        if model.fc.out_features != len(m.classes):
            raise UserError(f"{where}: the network has {model.fc.out_features} outputs, the manifest lists {len(m.classes)} classes")
        if nets.image_shape(model) != m.shape:
            raise UserError(f"{where} takes {nets.image_shape(model)} images, its manifest says {m.shape}")
        loaded = LoadedModel(m, model.to(device).eval(), torch.device(device))
        probs = loaded.predict(torch.full((2, *m.shape), 0.5))  # a forward pass proves it runs here
        if probs.shape != (2, len(m.classes)) or not np.isfinite(probs).all():
            raise UserError(f"{where} gives non-finite or misshapen outputs; refusing it")
        return loaded

    def publish(self, weights: str | Path, name: str, source: str = "", signing_key: str | Path | None = None,
                gate: Callable[[nn.Module], dict[str, dict]] | None = None) -> Manifest:
        """Add a classifier's weights as the next version of `name`, atomically (folder rename) and durably;
        with `signing_key`, the manifest is signed (clients check downloaded weights against it). `gate` (the swap
        gate, cloud/gate.py) sees the network built from the very bytes published, before anything is written:
        what it returns goes into the manifest as `obfuscators`, and a UserError it raises refuses the version."""
        check_name(name)
        weights = Path(weights)
        sign = signer(signing_key) if signing_key else None
        data = nets.read_file(weights)  # read once: what is checked is what is published
        meta, _ = nets.read_header(data, str(weights))
        if meta.get("arch") != ARCHITECTURE:
            raise UserError(f"{weights} holds a {str(meta.get('arch'))[:20]}, not a {ARCHITECTURE} classifier; "
                            f"only classifiers are published")
        model = nets.load_bytes(data, str(weights), expect=ARCHITECTURE)  # proves the weights fit
        width, classes, shape = model.width, class_names(meta, weights), nets.image_shape(model)
        versions = self.versions(name)
        if versions:
            last = self.manifest(name, versions[-1])
            if (ARCHITECTURE, width, classes, shape) != last.signature:
                raise UserError(f"{name} holds {_sig(last)} models, {weights} is a {ARCHITECTURE} of width {width}; "
                                f"publish it under another --name")
        obfuscators = gate(model.eval()) if gate else {}
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        digest = hashlib.sha256(data).hexdigest()

        def files(version: int) -> dict[str, bytes]:
            m = Manifest(name, version, ARCHITECTURE, width, classes, created, digest, source or str(weights), shape,
                         obfuscators)
            out = {WEIGHTS: data, MANIFEST: m.to_json().encode()}
            if sign:
                out[SIGNATURE] = base64.b64encode(sign(out[MANIFEST])) + b"\n"
            return out

        version = _add_numbered(self.root / name, (versions[-1] if versions else 0) + 1, files)
        return self.manifest(name, version)

    # ---- registered obfuscators

    def obfuscators(self, name: str) -> list[int]:
        """The obfuscator versions registered with `name`, oldest first."""
        try:
            return sorted(int(p.name) for p in (self.folder(name) / OBFUSCATORS).iterdir()
                          if parse_version(p.name) and (p / OBFUSCATOR_RECORD).is_file())
        except OSError:
            return []

    def obfuscator(self, name: str, version: int) -> Registration:
        """A registered obfuscator's record; a UserError for an unknown version."""
        where = f"obfuscator version {version} of {name}"
        path = self.folder(name) / OBFUSCATORS / str(version) / OBFUSCATOR_RECORD
        if not path.is_file():
            raise UserError(f"{name[:64]!r} has no obfuscator version {version}; registered: "
                            f"{', '.join(map(str, self.obfuscators(name))) or 'none'}")
        try:
            raw = json.loads(_read(path, f"{where}'s {OBFUSCATOR_RECORD}"))
            r = Registration(int(raw["version"]), raw["sha256"], raw["source"], int(raw["works_with"]),
                             raw["registered"], tuple(int(v) for v in raw["shape"]))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where} has no valid {OBFUSCATOR_RECORD} ({type(e).__name__}: {str(e)[:100]})") from None
        if r.version != version:
            raise UserError(f"the {OBFUSCATOR_RECORD} of {where} describes version {r.version}")
        return r

    def load_obfuscator(self, name: str, version: int) -> nn.Module:
        """A registered obfuscator's network (eval mode), its file checked against the recorded sha256."""
        r = self.obfuscator(name, version)
        file = f"obfuscator version {version} of {name}'s {OBFUSCATOR_WEIGHTS}"
        data = _read(self.folder(name) / OBFUSCATORS / str(version) / OBFUSCATOR_WEIGHTS, file)
        if hashlib.sha256(data).hexdigest() != r.sha256:
            raise UserError(f"{file} does not match its recorded sha256: the file is damaged")
        return nets.load_bytes(data, file, expect=CODEC).eval()

    def register(self, weights: str | Path, name: str, source: str = "") -> Registration:
        """Register a published obfuscator with `name` as its next obfuscator version, atomically (folder rename),
        recording the classifier version serving now (the served record, else the newest) as the one it works
        with. Refused: anything but an obfuscator (a codec), one for other images or another data set."""
        check_name(name)
        weights = Path(weights)
        data = nets.read_file(weights)
        meta, _ = nets.read_header(data, str(weights))
        if meta.get("arch") != CODEC:
            raise UserError(f"{weights} holds a {str(meta.get('arch'))[:20]}, not an obfuscator")
        versions = self.versions(name)
        if not versions:
            raise UserError(f"no versions of {name!r} in the repository; publish its classifier first")
        served = self.served(name)
        works_with = served if served in versions else versions[-1]
        m = self.manifest(name, works_with)
        shape = nets.image_shape(nets.load_bytes(data, str(weights), expect=CODEC))
        if shape != m.shape:
            raise UserError(f"{weights} takes {'x'.join(map(str, shape))} images; {name} takes "
                            f"{'x'.join(map(str, m.shape))}")
        theirs = nets.read_metadata(self.weights_path(name, works_with)).get("dataset", "cifar10")
        if meta.get("dataset", "cifar10") != theirs:
            raise UserError(f"{weights} was trained on {meta.get('dataset', 'cifar10')[:40]!r}; {name} classifies "
                            f"{theirs[:40]!r}")
        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        digest = hashlib.sha256(data).hexdigest()
        folder = self.folder(name) / OBFUSCATORS

        def files(version: int) -> dict[str, bytes]:
            r = Registration(version, digest, source or str(weights), works_with, when, shape)
            return {OBFUSCATOR_WEIGHTS: data, OBFUSCATOR_RECORD: r.to_json().encode()}

        return self.obfuscator(name, _add_numbered(folder, (self.obfuscators(name) or [0])[-1] + 1, files))


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


def _complete(version_folder: Path) -> bool:
    try:
        return (version_folder / MANIFEST).is_file()
    except OSError:  # unreadable: listed, so that loading it says why it is refused
        return True


def _add_numbered(folder: Path, version: int, files: Callable[[int], dict[str, bytes]]) -> int:
    """Write `files(version)` into a hidden temporary folder and rename it to `folder/version`, the next free number
    from `version` on (another writer may take one first: rename refuses, the next one is tried); synced before and
    after. A numbered folder is therefore complete or absent. Returns the number taken."""
    _make_dirs(folder)
    _remove_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=folder))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700: a server running as another user could not read the version
        while True:
            for old in tmp.iterdir():
                old.unlink()
            for file, data in files(version).items():
                _write(tmp / file, data)
            fsync_dir(tmp)
            try:
                os.rename(tmp, folder / str(version))
                fsync_dir(folder)
                return version
            except OSError:
                if not (folder / str(version)).exists():
                    raise
                version += 1
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_dirs(folder: Path) -> None:
    """Create `folder` and any missing parents as 0755 whatever the umask (the server may run as another user),
    each synced into the folder above it."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # another publisher made it meanwhile
            continue
        path.chmod(0o755)
        fsync_dir(path.parent)


def _remove_stale(folder: Path) -> None:
    """Remove the `.publish-*` folders of publishes that died (an hour old: a running publish takes seconds)."""
    for tmp in folder.glob(".publish-*"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_PUBLISH_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _write(path: Path, data: bytes) -> None:
    """A file of a version being published: readable by all, on disk before the folder is renamed into place."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    path.chmod(0o644)


def _sig(m: Manifest) -> str:
    return f"{m.architecture} of width {m.width} with {len(m.classes)} classes on {'x'.join(map(str, m.shape))} images"
