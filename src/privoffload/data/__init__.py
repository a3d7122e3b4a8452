"""The data sets, behind one interface: `load_dataset(name, root, image_size)` -> `Dataset`.

    cifar10          CIFAR-10, 32x32 colour, 10 classes (data/cifar10.py)
    pneumoniamnist   chest X-rays, grey, normal / pneumonia; 28x28 resized to 32x32 (data/pneumoniamnist.py)
    orl              ORL faces, grey, 40 people; 112x92 resized to 64x56 (data/orl.py)
    folder:PATH      your own images in the ImageFolder layout (data/folder.py)

Every `Dataset` holds uint8 images [N, C, H, W] (C = 1 grey, 3 colour), int64 labels, the class names and where
it came from. Data is looked for offline first: the data root (`--data`, else PRIVOFFLOAD_DATA, else the
checkout's .cache/data), then the shared read-only copies in ../shared/data; `privoffload download-data`
fetches the official files elsewhere. `image_size` ("HxW", multiples of 8) resizes any of them.
"""

from __future__ import annotations

from pathlib import Path

from ..config.values import DATASETS as NAMES, check_dataset
from ..errors import UserError
from . import cifar10, folder, orl, pneumoniamnist
from .base import (CIFAR10_CLASSES, MULTIPLE, Dataset, DeviceData, PairedData, default_root, mirror, parse_size,
                   parse_subset, project_root, quantize8, resize, select, shared_data, subset_indices, to_pixels)
from .cifar10 import LAYOUTS, URLS, download, locate

LOADERS = {"cifar10": cifar10.load, "pneumoniamnist": pneumoniamnist.load, "orl": orl.load}
DOWNLOADS = {"cifar10": cifar10.download, "pneumoniamnist": pneumoniamnist.download, "orl": orl.download}
CLASSES = CIFAR10_CLASSES  # the classes of networks whose files predate per-data-set metadata
Cifar10 = Dataset  # the name this type had when CIFAR-10 was the only data set

__all__ = ["Dataset", "Cifar10", "DeviceData", "PairedData", "load_dataset", "load_cifar10", "check_dataset", "download_dataset",
           "select", "subset_indices", "parse_subset", "parse_size", "to_pixels", "quantize8", "mirror", "resize",
           "CLASSES", "CIFAR10_CLASSES", "MULTIPLE", "NAMES", "URLS", "LAYOUTS", "download", "locate", "default_root",
           "project_root", "shared_data"]


def load_dataset(name: str = "cifar10", root: str | Path | None = None, image_size: str = "") -> Dataset:
    """The data set `name` (see the module docstring), its images resized to `image_size` ("" = its default size)."""
    size = parse_size(image_size)
    if check_dataset(name).startswith("folder:"):
        return folder.load(name, size)
    return LOADERS[name](root, size)


def load_cifar10(root: str | Path | None = None) -> Dataset:
    return cifar10.load(root)


def download_dataset(name: str, root: str | Path, layout: str = "bin") -> Path:
    """Fetch a data set's official files into `root` (needs internet); returns what was written."""
    if check_dataset(name) not in DOWNLOADS:
        raise UserError(f"{name} is a folder of your own images; there is nothing to download")
    if name == "cifar10":
        if layout not in URLS:
            raise UserError(f"--layout {layout!r} is not bin or py")
        return cifar10.download(root, layout)
    return DOWNLOADS[name](root)
