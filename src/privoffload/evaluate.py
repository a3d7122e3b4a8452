"""Scoring a run folder after the fact: whichever networks it holds, on the test set."""

from __future__ import annotations

from pathlib import Path

from . import nets
from .data import DeviceData, load_cifar10
from .errors import UserError
from .metrics import accuracy
from .train.common import pick_device, use_bf16


def evaluate_run(run: str | Path, data_root: str | None = None, device: str = "auto", precision: str = "auto") -> dict:
    run = Path(run)
    weights = run / "classifier.safetensors"
    if not run.is_dir():
        raise UserError(f"{run} is not a run folder")
    if not weights.exists():
        raise UserError(f"{run} has no classifier.safetensors; is it a classifier run that finished an epoch?")
    dev = pick_device(device)
    model = nets.load(weights, expect="resnet18", device=dev)
    data = load_cifar10(data_root)
    test = DeviceData(data.x_test, data.y_test, dev)
    return {"run": str(run), "test_accuracy": accuracy(model, test, bf16=use_bf16(precision, dev)), "images": len(test)}
