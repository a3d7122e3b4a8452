"""Your own images: `folder:PATH` in the ImageFolder layout, read with Pillow.

    PATH/train/CLASS/*.png|jpg|jpeg|bmp|pgm|ppm|tif|tiff|webp     PATH/test/CLASS/...

Class names are the training split's folder names, sorted (label i = the i-th name); the test split uses the
same names (a subset of them is fine). Every image must have one size; grey images (every file in mode L/1/I/F)
give one channel, anything else three (RGB). The images are resized to `image_size` when the run sets one, else
kept at their size, which must then be a multiple of 8 on each side (the codec halves it three times).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .base import Dataset, check_size, resize

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
GREY = {"1", "L", "I", "F", "I;16", "LA"}


def scan(root: Path, split: str, classes: tuple[str, ...] | None = None) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """The image files of one split, their labels and the class names, or a one-line error naming what is wrong."""
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"{root} is not an image folder: it needs {split}/CLASS/*.png (and train/ and test/ alike)")
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    strays = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if strays:
        raise UserError(f"{folder} holds images outside class folders (e.g. {strays[0]}); put each in {split}/CLASS/")
    if not names:
        raise UserError(f"{folder} has no class folders; the layout is {split}/CLASS/*.png")
    if classes is None:
        if len(names) < 2:
            raise UserError(f"{folder} has one class folder ({names[0]}); a classifier needs at least two")
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise UserError(f"{folder}/{unknown[0]} is not a class of the training split ({', '.join(classes[:5])}...)")
    files, labels = [], []
    for name in names:
        found = sorted(p for p in (folder / name).iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not found:
            raise UserError(f"{folder / name} holds no images ({', '.join(sorted(SUFFIXES))})")
        files += found
        labels += [classes.index(name)] * len(found)
    return files, labels, classes


def read(files: list[Path]) -> tuple[list[Image.Image], bool]:
    images, grey = [], True
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{p} is not a readable image ({type(e).__name__})") from None
        grey &= images[-1].mode in GREY
    return images, grey


def load(spec: str, size: tuple[int, int] | None = None) -> Dataset:
    root = Path(spec.split(":", 1)[1]).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset {spec!r}: {root} is not a folder")
    train_files, y_train, classes = scan(root, "train")
    test_files, y_test, _ = scan(root, "test", classes)
    images, grey = read(train_files + test_files)
    first = images[0].size
    for p, im in zip(train_files + test_files, images):
        if im.size != first:
            raise UserError(f"mixed sizes in {root}: {train_files[0].name} is {first[0]}x{first[1]} (width x height), "
                            f"{p.relative_to(root)} is {im.size[0]}x{im.size[1]}; give images of one size")
    mode = "L" if grey else "RGB"
    x = np.stack([np.asarray(im.convert(mode), dtype=np.uint8).reshape(first[1], first[0], -1) for im in images])
    x = x.transpose(0, 3, 1, 2)
    if size is None:
        check_size(spec, x.shape)
    x = resize(x, size)
    n = len(train_files)
    return Dataset(x[:n], np.array(y_train, np.int64), x[n:], np.array(y_test, np.int64), str(root), classes, spec)
