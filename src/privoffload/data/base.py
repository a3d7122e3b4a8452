"""What every data set shares: the `Dataset` arrays, where data lives, downloads, resizing, subsets, and batches
served from the device.

Images stay uint8 [N, C, H, W] from disk to the device; a batch becomes float in [0, 1] only when it is cut.
Flips are one `torch.where` over the batch. No DataLoader, no per-sample Python.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config.values import MULTIPLE, parse_size, parse_subset
from ..errors import UserError
from ..runtime import atomic_path

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """A whole data set as uint8 arrays, channel-first [N, C, H, W] (C = 1 grey, 3 colour), with int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where it came from, for reports
    classes: tuple[str, ...] = CIFAR10_CLASSES
    name: str = "cifar10"  # the `dataset` setting that loads it (cifar10, pneumoniamnist, orl, folder:PATH)
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.source = portable(self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of the training images in [0, 1] (CIFAR-10's published
        constants for CIFAR-10): what the classifier normalises its input with."""
        if self.stats is None:
            if self.name == "cifar10" and self.shape[0] == 3:
                self.stats = CIFAR10_MEAN, CIFAR10_STD
            else:
                x = self.x_train.astype(np.float64) / 255
                axes = (0, 2, 3)
                self.stats = (tuple(round(float(v), 4) for v in x.mean(axes)),
                              tuple(round(max(float(v), 1e-3), 4) for v in x.std(axes)))
        return self.stats

    def image_args(self) -> dict:
        """What a codec or decoder is built for: `nets.build(arch, width, **data.image_args())`."""
        c, h, w = self.shape
        return {"channels": c, "size": (h, w)}

    def classifier_args(self) -> dict:
        """What the classifier is built for: the images, the number of classes and the normalisation."""
        mean, std = self.mean_std()
        return {**self.image_args(), "num_classes": len(self.classes), "mean": mean, "std": std}


def project_root() -> Path:
    """The checkout this package lives in (src layout), else the working directory."""
    here = Path(__file__).resolve()
    root = here.parents[3]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def default_root() -> Path:
    return Path(os.environ.get("PRIVOFFLOAD_DATA", project_root() / ".cache" / "data"))


def shared_data() -> Path | None:
    """The read-only data folder beside the checkout (../shared/data, see its README), if there is one."""
    shared = os.environ.get("PRIVOFFLOAD_SHARED")
    candidates = [Path(shared)] if shared else [project_root().parent / "shared", Path.cwd().parent / "shared"]
    return next((c / "data" for c in candidates if (c / "data").is_dir()), None)


def portable(text: str) -> str:
    """A data source as reports show it: paths in the checkout relative to it, the shared folder as `shared/`, the
    home folder as `~`, so that a report does not carry one machine's absolute paths."""
    shared = shared_data()
    for prefix, short in ((project_root(), ""), (shared.parent if shared else None, "shared/"), (Path.home(), "~/")):
        if prefix is not None:
            text = text.replace(f"{prefix}/", short)
    return text


def fetch(url: str, md5: str | None, dest: Path, hint: str) -> Path:
    """Download `url` to `dest` (atomically; kept if already there) and check its md5 where one is published."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            with atomic_path(dest) as tmp:
                urllib.request.urlretrieve(url, tmp)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot download {url} ({e}); on an offline machine {hint}") from None
    if md5 is not None:
        digest = hashlib.md5(dest.read_bytes()).hexdigest()
        if digest != md5:
            raise UserError(f"{dest} has md5 {digest}, expected {md5}: delete it and download again")
    return dest


def resize(x: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 images [N, C, H, W] resized to `size` (height, width) with Pillow's antialiased bicubic filter."""
    if size is None or tuple(x.shape[2:]) == tuple(size):
        return x
    h, w = size
    out = np.empty((len(x), x.shape[1], h, w), np.uint8)
    for i, img in enumerate(x):
        for c in range(x.shape[1]):  # one grey plane at a time: the same filter for 1 and 3 channels
            out[i, c] = np.asarray(Image.fromarray(img[c]).resize((w, h), Image.Resampling.BICUBIC))
    return out


def check_size(name: str, shape: tuple[int, ...]) -> None:
    """The codec needs sides that are multiples of 8: a data set whose own size is not must be resized."""
    h, w = shape[-2:]
    if h % MULTIPLE or w % MULTIPLE:
        raise UserError(f"{name} images are {h}x{w}; the codec needs sides that are multiples of {MULTIPLE}: "
                        f"set image_size, e.g. {-(-h // MULTIPLE) * MULTIPLE}x{-(-w // MULTIPLE) * MULTIPLE}")


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


def on_device(a, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    """An array or tensor as a tensor on `device` (numpy arrays made contiguous first)."""
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a)
    return torch.as_tensor(a, dtype=dtype, device=device)


class DeviceData:
    """Images and labels resident on one device; `batches` cuts shuffled, optionally flipped batches.

    With `world > 1` (DDP) every rank draws the same permutation and flips and takes its own stride
    of them, so that N ranks see exactly the images (and flips) of one process's batches.
    """

    def __init__(self, x, y, device: torch.device | str = "cpu"):
        self.x = on_device(x, None, device)
        self.y = on_device(y, torch.int64, device)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.y)

    def steps(self, batch_size: int, drop_last: bool, world: int = 1) -> int:
        per_rank = len(self) // world
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, flip_images: bool = False, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world: int = 1, channels_last: bool = False,
                indices: bool = False):
        """Yield `cut` batches: (float images in [0, 1], labels); with `indices` also each image's position in this
        data and whether it was mirrored (for values cached per image). `seed` fixes both the order and the flips."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        order = torch.randperm(len(self), generator=gen) if shuffle else torch.arange(len(self))
        flips = torch.rand(len(self), generator=gen) < 0.5  # one draw per position of the epoch
        mine = slice(rank, len(self) // world * world, world)
        order, flips = order[mine].to(self.device), flips[mine].to(self.device)
        for i in range(self.steps(batch_size, drop_last, world)):
            part = slice(i * batch_size, (i + 1) * batch_size)
            batch = self.cut(order[part], flips[part] if flip_images else None, channels_last)
            yield (*batch, order[part], flips[part] & flip_images) if indices else batch

    def cut(self, idx: torch.Tensor, flips: torch.Tensor | None, channels_last: bool) -> tuple:
        """One batch: the images at `idx` (mirrored where `flips` is set) as floats, and their labels."""
        return as_float(self.x[idx], flips, channels_last), self.y[idx]

    def paired(self, upload, answer=None) -> "PairedData":
        """These images with what the cloud received for each: `upload` (uint8, same index), C's `answer`."""
        return PairedData(self.x, self.y, upload, answer, self.device)


def as_float(xb: torch.Tensor, flips: torch.Tensor | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> floats in [0, 1]; flips and layout are done in uint8, a quarter of the bytes."""
    if flips is not None:
        xb = mirror(xb, flips)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb.float().div_(255)


class PairedData(DeviceData):
    """Images beside their 8-bit uploads (uint8 [N, C, H, W], the same index) and C's answers on the uploads
    (softmax [N, K], or None), resident on one device: an attacker's (upload, original) pairs. Batches are
    (images, labels, uploads, answers), cut from the tensors with one index. Pairs are never mirrored: the
    upload of a mirrored image is not the mirrored upload."""

    def __init__(self, x, y, upload, answer=None, device: torch.device | str = "cpu"):
        super().__init__(x, y, device)
        self.upload = on_device(upload, torch.uint8, device)
        self.answer = None if answer is None else on_device(answer, torch.float32, device)
        if self.upload.shape != self.x.shape or (self.answer is not None and len(self.answer) != len(self.y)):
            raise ValueError(f"uploads {tuple(self.upload.shape)} do not pair with images {tuple(self.x.shape)}")

    def cut(self, idx: torch.Tensor, flips: torch.Tensor | None, channels_last: bool) -> tuple:
        if flips is not None:
            raise UserError("pairs of (upload, image) cannot be mirrored: set flip = false")
        answer = None if self.answer is None else self.answer[idx]
        return (as_float(self.x[idx], None, channels_last), self.y[idx], as_float(self.upload[idx], None, channels_last),
                answer)

    def part(self, start: int, stop: int | None = None) -> "PairedData":
        """The pairs start:stop (a validation split), sharing memory."""
        s = slice(start, stop)
        return PairedData(self.x[s], self.y[s], self.upload[s], None if self.answer is None else self.answer[s], self.device)


def select(data: Dataset, spec: str, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of a subset of one split. Test subsets are drawn with seed 0 by every caller that
    compares runs, so that every seed, stage and obfuscator is scored on the same test images."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    idx = subset_indices(spec, len(y), seed)
    return x[idx], y[idx]
