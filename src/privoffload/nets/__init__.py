"""The networks (the cloud's classifier; the Table I codec as obfuscator and deobfuscator; a U-Net
decoder as a stronger attacker), and their files: safetensors whose metadata says how to rebuild the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..errors import UserError
from ..runtime import atomic_path
from .classifier import ResNet18, resnet18
from .codec import Codec, codec
from .unet import UNet, unet

# name -> class; each class is built as cls(width) and keeps `.width`
ARCHS: dict[str, type[nn.Module]] = {"resnet18": ResNet18, "codec": Codec, "unet": UNet}

__all__ = ["ResNet18", "resnet18", "Codec", "codec", "UNet", "unet", "ARCHS", "build", "arch_of", "save", "load", "read_metadata"]


def build(arch: str, width: int) -> nn.Module:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch](width)


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
        save_file(tensors, str(tmp), metadata={"arch": a["arch"], "width": str(a["width"]), **meta})


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; train or publish that network first") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-create it") from None


def load(path: str | Path, expect: str | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the network a weights file describes; refuse files for another architecture."""
    meta = read_metadata(path)
    if "arch" not in meta or "width" not in meta:
        raise UserError(f"{path} has no architecture metadata; it was not written by privoffload")
    if expect and meta["arch"] != expect:
        raise UserError(f"{path} holds a {meta['arch']}, expected a {expect}")
    model = build(meta["arch"], int(meta["width"]))
    load_into(model, path)
    return model.to(device)


def load_into(model: nn.Module, path: str | Path) -> None:
    """Copy weights into an existing network; shapes must match exactly."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-create it") from None
    inner = getattr(model, "module", model)
    try:
        inner.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} does not fit this {arch_of(inner)}: {first[:200]}") from None
