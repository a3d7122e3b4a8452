"""CIFAR-10: find it, read either official layout, cut subsets, and serve batches from the device.

Images stay uint8 [N, 3, 32, 32] from disk to the device; a batch becomes float in [0, 1] only
when it is cut. Flips are one `torch.where` over the batch. No DataLoader, no per-sample Python.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .runtime import atomic_path

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
URLS = {
    "bin": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
    "py": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
}
LAYOUTS = {"bin": "cifar-10-batches-bin", "py": "cifar-10-batches-py"}


@dataclass
class Cifar10:
    """The whole data set as uint8 arrays, channel-first; training images in the official order."""

    x_train: np.ndarray  # uint8 [50000, 3, 32, 32]
    y_train: np.ndarray  # int64 [50000]
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where it came from, for reports


def project_root() -> Path:
    """The checkout this package lives in (src layout), else the working directory."""
    here = Path(__file__).resolve()
    root = here.parents[2]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def default_root() -> Path:
    return Path(os.environ.get("PRIVOFFLOAD_DATA", project_root() / ".cache" / "data"))


def shared_prepare_script() -> Path | None:
    """The read-only JPEG copy's converter beside the checkout (see ../shared/data/README.md)."""
    shared = os.environ.get("PRIVOFFLOAD_SHARED")
    candidates = [Path(shared)] if shared else [project_root().parent / "shared", Path.cwd().parent / "shared"]
    for c in candidates:
        script = c / "data" / "prepare_cifar10.py"
        if script.exists():
            return script
    return None


def is_lossy_copy(root: Path) -> bool:
    return (root / ".from-shared-jpeg").exists()


def locate(root: str | Path | None = None, prepare: bool = True) -> tuple[Path, str]:
    """Find a CIFAR-10 layout under `root`; with the default root, build it from the shared copy."""
    root = Path(root) if root else default_root()
    for layout, name in LAYOUTS.items():
        if (root / name).is_dir():
            return root / name, layout
    if prepare and root == default_root():
        script = shared_prepare_script()
        if script is not None:
            root.mkdir(parents=True, exist_ok=True)
            print(f"preparing CIFAR-10 from {script.parent} into {root} (once)", file=sys.stderr)
            done = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True)
            if done.returncode != 0 or not (root / LAYOUTS["bin"]).is_dir():
                raise UserError(f"could not prepare CIFAR-10 with {script}: {done.stderr.strip()[-300:]}")
            (root / ".from-shared-jpeg").write_text(str(script) + "\n")
            return root / LAYOUTS["bin"], "bin"
    raise UserError(
        f"no CIFAR-10 under {root} (looked for {' or '.join(LAYOUTS.values())}); "
        f"run `privoffload download-data --root {root}` where there is internet, or pass --data DIR"
    )


def load_cifar10(root: str | Path | None = None) -> Cifar10:
    folder, layout = locate(root)
    reader = _read_bin if layout == "bin" else _read_py
    xs, ys = zip(*(reader(folder, name) for name in TRAIN_FILES))
    x_test, y_test = reader(folder, "test_batch")
    source = f"{folder}{' (lossy JPEG copy)' if is_lossy_copy(folder.parent) else ''}"
    return Cifar10(np.concatenate(xs), np.concatenate(ys), x_test, y_test, source)


def _read_bin(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    path = folder / f"{name}.bin"
    try:
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the CIFAR-10 binary layout needs {name}.bin; re-download or re-prepare it") from None
    if raw.size == 0 or raw.size % RECORD:
        raise UserError(f"{path} is truncated or corrupt ({raw.size} bytes, not a multiple of {RECORD}); delete it and prepare the data again")
    rec = raw.reshape(-1, RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise UserError(f"{path} has label {labels.max()} > 9: not a CIFAR-10 binary file")
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def _read_py(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    path = folder / name
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official python layout is pickled; local files only
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the CIFAR-10 python layout needs {name}; re-download it") from None
    except Exception as e:  # truncated pickles raise several kinds of error
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}); delete it and download the data again") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"{path} does not hold CIFAR-10 records (data shape {data.shape}); re-download it")
    return data.reshape(-1, 3, 32, 32), labels


def download(root: str | Path, layout: str = "bin") -> Path:
    """Fetch the official tarball, check its md5, and unpack it under `root`."""
    url, md5 = URLS[layout]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / url.rsplit("/", 1)[1]
    if not tarball.exists():
        try:
            with atomic_path(tarball) as tmp:
                urllib.request.urlretrieve(url, tmp)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(
                f"cannot download {url} ({e}); on an offline machine copy {tarball.name} or an unpacked "
                f"{LAYOUTS[layout]}/ into {root} by hand"
            ) from None
    digest = hashlib.md5(tarball.read_bytes()).hexdigest()
    if digest != md5:
        raise UserError(f"{tarball} has md5 {digest}, expected {md5}: delete it and download again")
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")
    return root / LAYOUTS[layout]


def parse_subset(spec: str) -> tuple[str, int, int]:
    """`all`, `first:N`, `random:N`, `range:A:B` -> (kind, a, b); checked before any data is read."""
    parts = spec.split(":")
    try:
        if parts == ["all"]:
            return "all", 0, 0
        if parts[0] in ("first", "random") and len(parts) == 2 and int(parts[1]) > 0:
            return parts[0], int(parts[1]), 0
        if parts[0] == "range" and len(parts) == 3 and 0 <= int(parts[1]) < int(parts[2]):
            return "range", int(parts[1]), int(parts[2])
    except ValueError:
        pass
    raise UserError(f"subset {spec!r} is not one of all, first:N, random:N, range:A:B")


def subset_indices(spec: str, n: int, seed: int = 0) -> np.ndarray:
    """Indices into an array of length n. `random:N` is a seeded draw without replacement."""
    kind, a, b = parse_subset(spec)
    if kind == "all":
        return np.arange(n)
    if (kind in ("first", "random") and a > n) or (kind == "range" and b > n):
        raise UserError(f"subset {spec!r} asks for more than the {n} images there are")
    if kind == "first":
        return np.arange(a)
    if kind == "range":
        return np.arange(a, b)
    return np.sort(np.random.default_rng(seed).choice(n, size=a, replace=False))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the uint8 pixels that are uploaded (rounded, clipped): the wire format of O(x)."""
    return torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """What the cloud really receives, back as floats in [0, 1]: the image rounded to 8-bit pixels.

    Where gradients flow it is the identity's gradient (straight-through), so that attacks and training can
    optimise through the rounding; the values are the rounded ones either way.
    """
    x = x.clamp(0, 1)
    q = torch.round(x * 255) / 255
    return x + (q - x).detach() if x.requires_grad else q


def mirror(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of a batch where `mask` (bool [N]) is set."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


class DeviceData:
    """Images and labels resident on one device; `batches` cuts shuffled, optionally flipped batches.

    With `world > 1` (DDP) every rank draws the same permutation and flips and takes its own stride
    of them, so that N ranks see exactly the images (and flips) of one process's batches.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device | str = "cpu"):
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.y)

    def steps(self, batch_size: int, drop_last: bool, world: int = 1) -> int:
        per_rank = len(self) // world
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, flip_images: bool = False, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world: int = 1, channels_last: bool = False):
        """Yield (float images in [0, 1], labels). `seed` fixes both the order and the flips."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        order = torch.randperm(len(self), generator=gen) if shuffle else torch.arange(len(self))
        flips = torch.rand(len(self), generator=gen) < 0.5  # one draw per position of the epoch
        mine = slice(rank, len(self) // world * world, world)
        order, flips = order[mine].to(self.device), flips[mine].to(self.device)
        for i in range(self.steps(batch_size, drop_last, world)):
            part = slice(i * batch_size, (i + 1) * batch_size)
            idx = order[part]
            xb = self.x[idx]  # flips and layout in uint8, a quarter of the bytes; then float once
            if flip_images:
                xb = mirror(xb, flips[part])
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb.float().div_(255), self.y[idx]


def select(data: Cifar10, spec: str, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a subset of one split. Test subsets are drawn with seed 0 by every caller that
    compares runs, so that every seed, stage and obfuscator is scored on the same test images."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    idx = subset_indices(spec, len(y), seed)
    return x[idx], y[idx]
