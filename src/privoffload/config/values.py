"""The grammar of the data settings, checked before any data is read: data set names, image sizes, subsets.

Here rather than in data/ so that settings can be validated (and `--help` printed) without importing torch.
"""

from __future__ import annotations

from ..errors import UserError

DATASETS = ("cifar10", "pneumoniamnist", "orl")  # and folder:PATH, your own images
MULTIPLE = 8  # the codec halves an image three times (nets/codec.py): every side must be a multiple of 8


def check_dataset(name: str) -> str:
    """A `dataset` setting: one of DATASETS or folder:PATH."""
    if name in DATASETS or (name.startswith("folder:") and len(name) > len("folder:")):
        return name
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or folder:PATH for your own images")


def model_name(dataset: str) -> str:
    """The name a classifier of `dataset` is published and served under, and the one a client asks for by
    default: `cifar10-resnet18`, `orl-resnet18`, `folder-resnet18` (folder:PATH without its path)."""
    return f"{dataset.split(':')[0]}-resnet18"


def parse_size(text: str) -> tuple[int, int] | None:
    """`64x56` -> (64, 56): height x width, each a multiple of 8; "" -> None (the data set's own size)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"image_size {text!r} is not HEIGHTxWIDTH, e.g. 64x56") from None
    if h <= 0 or w <= 0 or h % MULTIPLE or w % MULTIPLE or max(h, w) > 1024:
        raise UserError(f"image_size {text!r}: both sides must be multiples of {MULTIPLE} (the codec halves the image "
                        f"three times), at most 1024")
    return h, w


def parse_subset(spec: str) -> tuple[str, int, int]:
    """`all`, `first:N`, `random:N`, `range:A:B` -> (kind, a, b)."""
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
