"""The networks (the cloud's classifier; the Table I codec as obfuscator and deobfuscator; a U-Net
decoder as a stronger attacker), and their files: safetensors whose metadata says how to rebuild the network.

Metadata: `arch`, `width`, and the images the network takes: `image` ("CxHxW"); a classifier also
`num_classes`, `mean`, `std` (its input normalisation) and, from its trainer, `classes` (a JSON list of names)
and `dataset`. Files written before the metadata had images are CIFAR-10's: 3x32x32, 10 classes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import safe_open, save_file
from torch import nn

from ..errors import UserError
from ..runtime import atomic_path
from .classifier import ResNet18, resnet18
from .codec import Codec, codec
from .unet import AnswerDecoder, UNet, answer_features, unet

# name -> class; each class is built as cls(width) and keeps `.width`
ARCHS: dict[str, type[nn.Module]] = {"resnet18": ResNet18, "codec": Codec, "unet": UNet, "answer": AnswerDecoder}
READS_ANSWER = ("unet", "answer")  # built with num_classes when given: they (may) read C's answer
DECODERS = ("codec", "unet")  # what a deobfuscator (co-trained D, attacker) may be: images in, images out
MAX_WIDTH = 512  # a ResNet18 this wide has 700M parameters; a file claiming more is refused before anything is built
WIDTH = re.compile(r"[1-9][0-9]{0,3}")

__all__ = ["ResNet18", "resnet18", "Codec", "codec", "UNet", "unet", "AnswerDecoder", "answer_features", "decode", "ARCHS", "DECODERS", "build", "arch_of", "image_of", "image_shape",
           "image_args", "save", "load", "load_bytes", "load_into", "read_file", "read_header", "read_metadata"]
MAX_SIDE, MAX_CLASSES = 1024, 10_000  # bounds on what a file's metadata may ask to build
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # safetensors' dtypes, bytes per element


def build(arch: str, width: int, **image) -> nn.Module:
    """A network of `arch` and `width` for the images `image` describes (channels, size; a classifier also
    num_classes, mean, std: `Dataset.classifier_args()`); without them, CIFAR-10's."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {str(arch)[:40]!r}; known: {', '.join(ARCHS)}")
    if not 1 <= width <= MAX_WIDTH:
        raise UserError(f"width {width} is out of range (1 to {MAX_WIDTH})")
    if arch != "resnet18":
        image = {k: v for k, v in image.items() if k in ("channels", "size") or (k == "num_classes" and arch in READS_ANSWER)}
    try:
        return ARCHS[arch](width, **image)
    except ValueError as e:
        raise UserError(f"cannot build a {arch} for these images: {e}") from None


def decode(net: nn.Module, upload: torch.Tensor, answer: torch.Tensor | None) -> torch.Tensor:
    """What a decoder rebuilds from what the cloud has: the upload, and C's answer for the decoders that read it.
    The label-only decoder is handed the answer alone: it never sees a pixel of the upload."""
    inner = getattr(net, "module", net)
    if isinstance(inner, AnswerDecoder):
        return net(answer)
    if "num_classes" in image_of(inner):
        return net(upload, answer)
    return net(upload)


def image_of(model: nn.Module) -> dict:
    """What a network takes: channels, size (height, width); a classifier also num_classes, mean, std."""
    return dict(getattr(model, "module", model).image)


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a network takes."""
    i = image_of(model)
    return (i["channels"], *i["size"])


def image_meta(model: nn.Module) -> dict[str, str]:
    i = image_of(model)
    meta = {"image": "x".join(map(str, image_shape(model)))}
    if "num_classes" in i:
        meta["num_classes"] = str(i["num_classes"])
    if "mean" in i:
        meta.update(mean=",".join(map(repr, i["mean"])), std=",".join(map(repr, i["std"])))
    return meta


def image_args(meta: dict[str, str], name: str | Path) -> dict:
    """The build arguments a file's metadata gives, checked and bounded; {} for a file without them (CIFAR-10)."""
    args: dict = {}
    try:
        if "image" in meta:
            c, h, w = (int(v) for v in meta["image"].split("x"))
            if c not in (1, 3) or not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
                raise ValueError(f"image {meta['image'][:20]!r} is out of range")
            args.update(channels=c, size=(h, w))
        if "num_classes" in meta:
            args["num_classes"] = int(meta["num_classes"])
            if not 1 <= args["num_classes"] <= MAX_CLASSES:
                raise ValueError(f"{args['num_classes']} classes is out of range")
        for key in ("mean", "std"):
            if key in meta:
                values = tuple(float(v) for v in meta[key].split(","))
                if len(values) != args.get("channels", 3) or not all(math.isfinite(v) and (key == "mean" or v > 0)
                                                                     for v in values):
                    raise ValueError(f"{key} {meta[key][:40]!r} does not fit the channels")
                args[key] = values
    except ValueError as e:
        raise UserError(f"{name} has unreadable image metadata ({str(e)[:100]}); re-create it") from None
    return args


def arch_of(model: nn.Module) -> dict:
    model = getattr(model, "module", model)  # unwrap DDP
    name = next((k for k, cls in ARCHS.items() if type(model) is cls), None)
    if name is None:
        raise TypeError(f"{type(model).__name__} is not one of the networks in nets.ARCHS")
    return {"arch": name, "width": model.width}


def save(model: nn.Module, path: str | Path, **meta: str) -> None:
    """Write weights atomically and durably, with the architecture in the file's metadata."""
    path = Path(path)
    inner = getattr(model, "module", model)
    a = arch_of(inner)
    tensors = {k: v.detach().contiguous().cpu() for k, v in inner.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"arch": a["arch"], "width": str(a["width"]), **image_meta(inner), **meta})


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; train or publish that network first") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-create it") from None


def read_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; train or publish that network first") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None


def read_header(data: bytes, name: str) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) of safetensors bytes, from the header alone: nothing is allocated. Every
    tensor's bytes must lie within the file, so a file cannot ask for a network larger than itself."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("the metadata is not a table of strings")
        shapes, room = {}, len(data) - 8 - n
        for key, info in header.items():
            shape = info.get("shape") if isinstance(info, dict) else None
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"tensor {key[:60]!r} has no valid shape")
            offsets, itemsize = info.get("data_offsets"), DTYPE_BYTES.get(info.get("dtype"))
            if itemsize is None or not (isinstance(offsets, list) and len(offsets) == 2
                                        and all(type(o) is int for o in offsets)):
                raise ValueError(f"tensor {key[:60]!r} has no valid dtype and data offsets")
            if not 0 <= offsets[0] <= offsets[1] <= room or offsets[1] - offsets[0] != math.prod(shape) * itemsize:
                raise ValueError(f"tensor {key[:60]!r} of shape {shape[:6]} does not fit the file's {room} bytes of data")
            shapes[key] = shape
    except (ValueError, RecursionError) as e:
        raise UserError(f"{name} is not a readable safetensors file ({str(e)[:100]}); re-create it") from None
    return meta, shapes


def load(path: str | Path, expect: str | tuple[str, ...] | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the network a weights file describes; refuse files for another architecture (`expect`: one or several)."""
    return load_bytes(read_file(path), str(path), expect, device)


def load_bytes(data: bytes, name: str, expect: str | tuple[str, ...] | None = None,
               device: torch.device | str = "cpu") -> nn.Module:
    """`load` for a file already read (`name` says which, in messages). The metadata, tensor names and shapes
    are checked against the architecture before the network is built: a hostile file costs no memory."""
    meta, shapes = read_header(data, name)
    if "arch" not in meta or "width" not in meta:
        raise UserError(f"{name} has no architecture metadata; it was not written by privoffload")
    allowed = (expect,) if isinstance(expect, str) else tuple(expect or ARCHS)
    if meta["arch"] not in ARCHS or meta["arch"] not in allowed:
        raise UserError(f"{name} holds a {meta['arch'][:20]}, expected a {' or '.join(allowed)}")
    if not WIDTH.fullmatch(meta["width"]) or int(meta["width"]) > MAX_WIDTH:
        raise UserError(f"{name} gives the width {meta['width'][:20]!r}, not a number from 1 to {MAX_WIDTH}")
    arch, width, image = meta["arch"], int(meta["width"]), image_args(meta, name)
    with torch.device("meta"):  # shapes without memory
        expected = build(arch, width, **image)
    _check_shapes(expected, shapes, name)
    model = build(arch, width, **image)
    _copy_into(model, data, name)
    return model.to(device)


def load_into(model: nn.Module, path: str | Path) -> None:
    """Copy weights into an existing network; names and shapes must match exactly."""
    data = read_file(path)
    _check_shapes(getattr(model, "module", model), read_header(data, str(path))[1], str(path))
    _copy_into(model, data, str(path))


def _check_shapes(model: nn.Module, shapes: dict[str, list[int]], name: str) -> None:
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    wrong = [k for k in want if k in shapes and shapes[k] != want[k]]
    if missing or unexpected or wrong:
        first = (f"{missing[0]} is missing" if missing else f"{unexpected[0][:60]!r} is unexpected" if unexpected
                 else f"{wrong[0]} has shape {shapes[wrong[0]][:6]}, expected {want[wrong[0]]}")
        raise UserError(f"{name} does not fit {_described(model)}: {first}")


def _copy_into(model: nn.Module, data: bytes, name: str) -> None:
    try:
        state = load_tensors(data)
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{name} is not a readable safetensors file ({str(e)[:100]}); re-create it") from None
    inner = getattr(model, "module", model)
    try:
        inner.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{name} does not fit {_described(inner)}: {first[:200]}") from None


def _described(model: nn.Module) -> str:
    a = arch_of(model)
    return f"a {a['arch']} of width {a['width']}"
