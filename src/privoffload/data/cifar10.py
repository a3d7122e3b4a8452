"""CIFAR-10: find it, read either official layout (binary or python), or download the official tarball.

Training images come in the official order, so "the first 20,000" means what it means in the paper.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import CIFAR10_CLASSES, Dataset, default_root, fetch, resize, shared_data

RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
URLS = {
    "bin": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
    "py": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
}
LAYOUTS = {"bin": "cifar-10-batches-bin", "py": "cifar-10-batches-py"}


def shared_prepare_script() -> Path | None:
    """The read-only JPEG copy's converter beside the checkout (see ../shared/data/README.md)."""
    shared = shared_data()
    script = shared / "prepare_cifar10.py" if shared else None
    return script if script and script.exists() else None


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


def load(root: str | Path | None = None, size: tuple[int, int] | None = None) -> Dataset:
    folder, layout = locate(root)
    reader = _read_bin if layout == "bin" else _read_py
    xs, ys = zip(*(reader(folder, name) for name in TRAIN_FILES))
    x_test, y_test = reader(folder, "test_batch")
    source = f"{folder}{' (lossy JPEG copy)' if is_lossy_copy(folder.parent) else ''}"
    return Dataset(resize(np.concatenate(xs), size), np.concatenate(ys), resize(x_test, size), y_test, source,
                   CIFAR10_CLASSES, "cifar10")


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
    tarball = fetch(url, md5, root / url.rsplit("/", 1)[1],
                    f"copy {url.rsplit('/', 1)[1]} or an unpacked {LAYOUTS[layout]}/ into {root} by hand")
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")
    return root / LAYOUTS[layout]
