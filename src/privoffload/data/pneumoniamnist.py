"""PneumoniaMNIST (MedMNIST v2): 28x28 grey chest X-rays, normal or pneumonia; 4,708 training and 624 test images.

Read from the official `pneumoniamnist.npz` (arrays train_images [N, 28, 28], train_labels [N, 1], val_*, test_*)
under the data root, else from the reconstructed copy in ../shared/data/medical (x_train [N, 28, 28, 1], ...;
the same split sizes, its training images class-sorted). The validation split is not used: utility is scored on
the official test split. The images are resized to 32x32 by default (the codec needs multiples of 8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import Dataset, default_root, fetch, resize, shared_data

CLASSES = ("normal", "pneumonia")
FILE = "pneumoniamnist.npz"
URL, MD5 = "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1", "28209eda62fecd6e6a2d98b1501bb15f"
SHARED = Path("medical") / "pneumoniamnist_reconstructed.npz"
SIZE = (32, 32)


def locate(root: str | Path | None = None) -> Path:
    """The official file under `root`; with the default root, else the shared reconstructed copy."""
    base = Path(root) if root else default_root()
    if (base / FILE).is_file():
        return base / FILE
    shared = shared_data()
    if root is None and shared is not None and (shared / SHARED).is_file():
        return shared / SHARED
    raise UserError(f"no {FILE} under {base}; run `privoffload download-data --dataset pneumoniamnist --root {base}` "
                    "where there is internet, or pass --data DIR")


def load(root: str | Path | None = None, size: tuple[int, int] | None = None) -> Dataset:
    path = locate(root)
    try:
        with np.load(path) as z:
            if "train_images" in z:  # the official layout
                split = {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in ("train", "test")}
            else:
                split = {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in ("train", "test")}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a PneumoniaMNIST file ({type(e).__name__}: {str(e)[:80]}); download it again") from None
    arrays = []
    for s, (x, y) in split.items():
        x, y = np.asarray(x), np.asarray(y).reshape(-1).astype(np.int64)
        x = x.reshape(len(x), 28, 28) if x.ndim in (3, 4) and x.shape[1:3] == (28, 28) and x.size == len(x) * 784 else None
        if x is None or x.dtype != np.uint8 or len(x) != len(y) or not set(np.unique(y)) <= {0, 1}:
            raise UserError(f"{path}: the {s} split is not 28x28 grey images with labels 0/1; download it again")
        arrays += [resize(x[:, None], size or SIZE), y]
    x_train, y_train, x_test, y_test = arrays
    note = ""
    if path.name != FILE:  # the reconstructed copy is class-sorted: a fixed shuffle makes first:N a fair sample
        order = np.random.default_rng(0).permutation(len(y_train))
        x_train, y_train = x_train[order], y_train[order]
        note = " (reconstructed copy, training images in a fixed shuffled order)"
    return Dataset(x_train, y_train, x_test, y_test, f"{path}{note}", CLASSES, "pneumoniamnist")


def download(root: str | Path) -> Path:
    root = Path(root)
    return fetch(URL, MD5, root / FILE, f"copy the official {FILE} into {root} by hand")
