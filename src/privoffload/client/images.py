"""Image files to the arrays the obfuscator takes: uint8 [N, C, H, W] (its own shape)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError


def read_images(paths: list[str | Path], shape: tuple[int, int, int]) -> np.ndarray:
    """PNG/JPEG (anything Pillow reads) as RGB (3 channels) or grey (1) at `shape` (the obfuscator's: channels,
    height, width); other sizes are resized to (H, W)."""
    if not paths:
        raise UserError("no image files given")
    channels, h, w = shape
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BICUBIC)
                out.append(np.asarray(im, dtype=np.uint8).reshape(h, w, channels).transpose(2, 0, 1))
        except FileNotFoundError:
            raise UserError(f"{p} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{p} is not a readable image ({type(e).__name__})") from None
    return np.stack(out)
