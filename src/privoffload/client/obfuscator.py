"""The one way the client gets its obfuscator: `load_obfuscator(path)` -> a function on image batches.

Everything that obfuscates on the device goes through this function, so a faster inference path
(another runtime, another precision) plugs in here and nowhere else. The function's `shape` is the
(channels, height, width) of the images the obfuscator was trained on, from its file's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import nets
from ..data import to_pixels
from ..errors import UserError
from ..runs import run_dataset

Obfuscate = Callable[[np.ndarray], np.ndarray]
WEIGHTS = "obfuscator.safetensors"
CIFAR_SHAPE = (3, 32, 32)  # what an obfuscator function without a `shape` takes


def obfuscator_path(path: str | Path) -> Path:
    """A run folder means its obfuscator.safetensors; a file means itself."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass an obfuscator run folder or its {WEIGHTS}")
    return path


def dataset_of(path: str | Path) -> str:
    """The data set an obfuscator was trained for: its file's `dataset` metadata, else its run folder's
    config.toml; CIFAR-10 for a lone file from before data sets were recorded."""
    path = obfuscator_path(path)
    meta = nets.read_metadata(path)
    if meta.get("dataset"):
        return meta["dataset"]
    return run_dataset(path.parent)[0] if (path.parent / "config.toml").is_file() else "cifar10"


def shape_of(obfuscate: Obfuscate) -> tuple[int, int, int]:
    """(channels, height, width) an obfuscator function takes."""
    return tuple(getattr(obfuscate, "shape", CIFAR_SHAPE))


def as_float_images(images: np.ndarray, shape: tuple[int, int, int] = CIFAR_SHAPE) -> np.ndarray:
    """uint8 pixels 0..255 or floats in [0, 1], [N, *shape] (or one image) -> float32 in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != tuple(shape) or len(arr) == 0:
        raise UserError(f"images must be [N, {', '.join(map(str, shape))}] (channels first) for this obfuscator, "
                        f"got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255
    if arr.dtype.kind != "f":
        raise UserError(f"images must be uint8 pixels or floats in [0, 1], got {arr.dtype}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise UserError("float images must be finite and lie in [0, 1]")
    return arr.astype(np.float32, copy=False)


def load_obfuscator(path: str | Path, device: str = "cpu", batch_size: int = 256, backend: str = "auto") -> Obfuscate:
    """Load O from safetensors; the result maps images (uint8 or float) to O(x), float32 in [0, 1].

    On a CPU it runs through `client.fast` (BatchNorm folded, ONNX Runtime where installed: about
    3x faster for one image and 16x for batches than eager PyTorch, see BENCHMARKS.md);
    `backend="eager"` keeps plain PyTorch. A file written by `privoffload export` (.onnx, .pte, .tflite) runs in
    its own runtime, as on the phone (`client.export.load`).
    """
    from .export import EXPORTED, load

    if Path(path).suffix in EXPORTED:
        return load(path)
    net = nets.load(obfuscator_path(path), expect="codec", device=device).eval()
    shape = nets.image_shape(net)
    run = net
    if torch.device(device).type == "cpu" and backend != "eager":
        from .fast import fast_obfuscator

        run = fast_obfuscator(net, backend=backend)

    @torch.inference_mode()
    def obfuscate(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(as_float_images(images, shape))
        out = [run(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy()

    obfuscate.shape = shape
    return obfuscate


def quantize(obfuscated: np.ndarray) -> np.ndarray:
    """O(x) as the 8-bit pixels that are uploaded (`data.to_pixels`, the rounding every score uses)."""
    return to_pixels(torch.from_numpy(np.asarray(obfuscated, dtype=np.float32))).numpy()
