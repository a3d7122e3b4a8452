"""The cloud's view of a set of images, computed once: an obfuscator's 8-bit uploads and C's answers on them.

Every attacker learns from (upload, original) pairs and every row is scored on the test images' uploads, so the
uploads are computed once per obfuscator and image set and kept on disk, then served from the device as uint8
(`data.PairedData`): a decoder's step costs the decoder alone, never O. The cloud also sees C's answer for each
upload (its softmax), which the label-aware and label-only decoders and the predicted-class references read; it
is computed from the cached uploads when first asked for.

    FOLDER/<obfuscator sha>-<split>-<subset>-s<seed>.upload.npy   uint8 [N, C, H, W]: quantize8(O(x)), O in eval
                                                                    mode and fp32, as the client computes it
    FOLDER/<obfuscator sha>-<split>-<subset>-s<seed>.answer-<classifier sha>.npy   float32 [N, K]: softmax of C

The names hold the weights' digests, so a retrained obfuscator never reads another's uploads; files are written
atomically, so a killed run leaves none or a whole one, and a rerun reads it instead of computing it again.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from ..config import ObfuscatorConfig
from ..data import Dataset, select, to_pixels
from ..errors import UserError
from ..runs import load_classifier, load_codec, run_weights
from ..runtime import atomic_path, autocast, frozen

CHUNK = 500  # images per forward pass


def digest(path: Path) -> str:
    """The first 12 hex digits of a weights file's sha256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def recipe_classifier(obfuscator: str | Path) -> str:
    """The classifier an obfuscator was trained for (its config.toml): the cloud's C, whose answers it sees."""
    path = Path(obfuscator) / "config.toml"
    if not path.exists():
        raise UserError(f"{obfuscator} has no config.toml: C's answers need the classifier O was trained for")
    return config_mod.load(ObfuscatorConfig, path).classifier


def classifier_weights(run: str | Path) -> Path:
    return Path(run) if Path(run).is_file() else run_weights(run, "classifier.safetensors", "classifier")


def save_npy(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return array


def cache_stem(folder: str | Path, obfuscator: str | Path, subset: str, seed: int, split: str) -> Path:
    obf_path = run_weights(obfuscator, "obfuscator.safetensors", "obfuscator")
    return Path(folder) / "-".join([digest(obf_path), split, re.sub(r"[^A-Za-z0-9]+", "", subset), f"s{seed}"])


def cached_uploads(folder: str | Path, obfuscator: str | Path, data: Dataset, subset: str, *, seed: int = 0,
                   split: str = "train", device: torch.device | str = "cpu") -> np.ndarray:
    """The 8-bit uploads (uint8 [N, C, H, W]) of the images `select(data, subset, seed, split)`, from the cache
    in `folder`, or computed and cached there."""
    path = cache_stem(folder, obfuscator, subset, seed, split).with_suffix(".upload.npy")
    if path.exists():
        return np.load(path)
    x, _ = select(data, subset, seed, split)
    obf = frozen(load_codec(obfuscator, device=device))
    with torch.no_grad():
        uploads = [to_pixels(obf(torch.from_numpy(part).to(device).float() / 255)).cpu().numpy()
                   for part in np.array_split(x, max(1, -(-len(x) // CHUNK)))]
    return save_npy(path, np.concatenate(uploads))


def cached_answers(folder: str | Path, obfuscator: str | Path, data: Dataset, subset: str, *, seed: int = 0,
                   split: str = "train", bf16: bool = False, device: torch.device | str = "cpu") -> np.ndarray:
    """C's answers (softmax, float32 [N, K]) on the cached uploads of those images; C is the classifier O was
    trained for (its config.toml), run under bf16 autocast where `bf16`."""
    clf_path = classifier_weights(recipe_classifier(obfuscator))
    path = Path(f"{cache_stem(folder, obfuscator, subset, seed, split)}.answer-{digest(clf_path)}.npy")
    if path.exists():
        return np.load(path)
    uploads = cached_uploads(folder, obfuscator, data, subset, seed=seed, split=split, device=device)
    clf = frozen(load_classifier(clf_path, device=device))
    answers = []
    with torch.no_grad():
        for part in np.array_split(uploads, max(1, -(-len(uploads) // CHUNK))):
            u = torch.from_numpy(part).to(device).float() / 255
            with autocast(u.device, bf16):
                answers.append(torch.softmax(clf(u).float(), 1).cpu().numpy())
    return save_npy(path, np.concatenate(answers).astype(np.float32))


def cloud_view(folder: str | Path, obfuscator: str | Path, data: Dataset, subset: str, *, answers: bool,
               seed: int = 0, split: str = "train", bf16: bool = False,
               device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """(uploads, C's answers or None): what the cloud holds for those images."""
    kw = dict(seed=seed, split=split, device=device)
    return (cached_uploads(folder, obfuscator, data, subset, **kw),
            cached_answers(folder, obfuscator, data, subset, bf16=bf16, **kw) if answers else None)
