"""ORL / AT&T Database of Faces: 40 people x 10 grey 112x92 images; the class is who it is.

Split (the database has no official one; this is the shared copy's): images 1-7 of every person train (280),
images 8-10 test (120). Read from the AT&T archive unpacked under the data root (`s1/1.pgm` ... `s40/10.pgm`,
at any depth), else from ../shared/data/faces/orl_faces.npz. Resized to 64x56 by default: the codec needs sides
that are multiples of 8 and 112x92 is not; 64x56 keeps the aspect ratio within 7 % and costs about as much as a
32x32 image once the classifier's stem has halved it.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .base import Dataset, default_root, fetch, resize, shared_data

PEOPLE, PER_PERSON, TRAIN_PER_PERSON = 40, 10, 7
CLASSES = tuple(f"s{i}" for i in range(1, PEOPLE + 1))
URL = "https://www.cl.cam.ac.uk/research/dtg/attarchive/pub/data/att_faces.zip"  # no checksum is published
SHARED = Path("faces") / "orl_faces.npz"
SIZE = (64, 56)
PGM = re.compile(r"s([0-9]+)/([0-9]+)\.pgm$")


def find_pgms(base: Path) -> dict[tuple[int, int], Path]:
    """(person 1..40, image 1..10) -> file, for every sN/M.pgm under `base`."""
    found = {}
    for p in base.rglob("*.pgm"):
        m = PGM.search(p.as_posix())
        if m and 1 <= int(m[1]) <= PEOPLE and 1 <= int(m[2]) <= PER_PERSON:
            found[int(m[1]), int(m[2])] = p
    return found


def load(root: str | Path | None = None, size: tuple[int, int] | None = None) -> Dataset:
    base = Path(root) if root else default_root()
    pgms = find_pgms(base) if base.is_dir() else {}
    shared = shared_data()
    if pgms:
        x, y, number = _read_pgms(base, pgms)
        source = str(base)
    elif root is None and shared is not None and (shared / SHARED).is_file():
        x, y, number, source = *_read_npz(shared / SHARED), str(shared / SHARED)
    else:
        raise UserError(f"no ORL faces (s1/1.pgm ... s40/10.pgm) under {base}; run `privoffload download-data "
                        f"--dataset orl --root {base}` where there is internet, or pass --data DIR")
    train = number <= TRAIN_PER_PERSON
    x = resize(x, size or SIZE)
    return Dataset(x[train], y[train], x[~train], y[~train], source, CLASSES, "orl")


def _read_pgms(base: Path, pgms: dict[tuple[int, int], Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [f"s{p}/{i}.pgm" for p in range(1, PEOPLE + 1) for i in range(1, PER_PERSON + 1) if (p, i) not in pgms]
    if missing:
        raise UserError(f"the ORL faces under {base} lack {len(missing)} of 400 images (first: {missing[0]}); unpack "
                        "the whole archive again")
    keys = sorted(pgms)  # person-major, then image number
    images = []
    for k in keys:
        try:
            with Image.open(pgms[k]) as im:
                a = np.asarray(im.convert("L"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{pgms[k]} is not a readable image ({type(e).__name__})") from None
        if a.shape != (112, 92):
            raise UserError(f"{pgms[k]} is {a.shape[0]}x{a.shape[1]}, ORL images are 112x92")
        images.append(a)
    person, number = np.array(keys).T
    return np.stack(images)[:, None], person.astype(np.int64) - 1, number


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            x = np.concatenate([z["x_train"], z["x_test"]])
            y = np.concatenate([z["y_train"], z["y_test"]]).astype(np.int64)
            number = np.concatenate([z["image_number_train"], z["image_number_test"]])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not the ORL faces file ({type(e).__name__}: {str(e)[:80]})") from None
    if x.shape[1:] != (112, 92, 1) or x.dtype != np.uint8 or len(x) != PEOPLE * PER_PERSON:
        raise UserError(f"{path} does not hold 400 grey 112x92 faces")
    return x.transpose(0, 3, 1, 2), y, number


def download(root: str | Path) -> Path:
    """The AT&T archive, unpacked under root/att_faces (no checksum is published; the reader checks all 400 files)."""
    root = Path(root)
    archive = fetch(URL, None, root / "att_faces.zip", f"unpack the AT&T archive (s1/ ... s40/) into {root} by hand")
    try:
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(".pgm") or n.endswith("/") or n.upper().startswith("README")]
            if any(n.startswith("/") or ".." in Path(n).parts for n in names):
                raise UserError(f"{archive} holds paths outside its folder; refusing to unpack it")
            z.extractall(root / "att_faces", members=names)
    except zipfile.BadZipFile:
        raise UserError(f"{archive} is not a zip archive; delete it and download again") from None
    return root / "att_faces"
