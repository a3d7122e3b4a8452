"""Image files to the arrays the obfuscator takes: uint8 [N, 3, 32, 32]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError


def read_images(paths: list[str | Path]) -> np.ndarray:
    """PNG/JPEG (anything Pillow reads) as RGB; other sizes are resized to 32x32."""
    if not paths:
        raise UserError("no image files given")
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (32, 32):
                    im = im.resize((32, 32), Image.Resampling.BICUBIC)
                out.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
        except FileNotFoundError:
            raise UserError(f"{p} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{p} is not a readable image ({type(e).__name__})") from None
    return np.stack(out)
