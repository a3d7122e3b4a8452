"""Training throughput: privoffload's trainer against a naive reference loop, side by side.

The reference is how a CIFAR-10 loop is often written: a torch DataLoader over a Dataset whose
__getitem__ converts one HWC uint8 image to a CHW float tensor (like torchvision's ToTensor) and
flips it at random, fp32, NCHW, `loss.item()` every step. Ours: `train_classifier` itself (images
resident as uint8, whole-batch flips, channels_last, bf16 where the device has it). Each number
is the second of two epochs (the first warms up), in images/s; every configuration is run in
this one process, round-robin.

The obfuscator step (frozen ResNet18 + codec O + codec D, the adversarial game of
docs/method.md) is built here: the same step fed by either pipeline, in either precision.

    python bench/train_throughput.py [--widths 16,64] [--steps 4] [--threads 1] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import tempfile
import time
from pathlib import Path

from _common import cifar10_or_random, median, print_machine, save_json

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from privoffload import nets
from privoffload.config import ClassifierConfig
from privoffload.data import DeviceData
from privoffload.train.classifier import train_classifier
from privoffload.runs import read_metrics
from privoffload.runtime import autocast, cpu_has_bf16, frozen


# ---------------------------------------------------------------- the naive reference

class NaiveCifar(Dataset):
    """Per-sample work, as in a torchvision-style pipeline: HWC uint8 -> CHW float, random flip."""

    def __init__(self, x: np.ndarray, y: np.ndarray, flip: bool = True):
        self.x, self.y, self.flip = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y, flip  # stored HWC, as PIL would

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.x[i]).permute(2, 0, 1).float().div(255)  # ToTensor
        if self.flip and random.random() < 0.5:  # RandomHorizontalFlip
            img = img.flip(-1)
        return img, int(self.y[i])


def naive_loader(x, y, batch: int) -> DataLoader:
    return DataLoader(NaiveCifar(x, y), batch_size=batch, shuffle=True, drop_last=True, num_workers=0)


def naive_classifier(x, y, width: int, batch: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = nets.resnet18(width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = naive_loader(x, y, batch)
    rate = 0.0
    for _ in range(2):  # the second pass is timed
        sync(device)
        t0, seen, running = time.perf_counter(), 0, 0.0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item()
            seen += len(yb)
        sync(device)
        rate = seen / (time.perf_counter() - t0)
    return rate


# ---------------------------------------------------------------- ours: the trainer itself

def trainer_classifier(data, n: int, width: int, batch: int, device: torch.device, bf16: bool, channels_last: bool) -> float:
    cfg = ClassifierConfig(width=width, epochs=2, batch_size=batch, subset=f"first:{n}", flip=True, test_subset="first:10",
                           eval_every=100, precision="bf16" if bf16 else "fp32", channels_last=channels_last)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        train_classifier(cfg, Path(tmp) / "run", data=data, device=str(device))
        return read_metrics(Path(tmp) / "run")[-1]["images_per_s"]


# ---------------------------------------------------------------- the obfuscator step, either pipeline

def obfuscator_step(C, O, D, device: torch.device, bf16: bool, lam: float = 1.0):
    """One step of the O/D game: D learns to reconstruct x from O(x); O keeps C right and D wrong.
    C is frozen: it adds a forward and a backward to its input, no weight gradients."""
    opt_o, opt_d = torch.optim.Adam(O.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)

    def step(xb, yb):
        with autocast(device, bf16):
            o = O(xb)
            loss_d = F.mse_loss(D(o.detach()).float(), xb)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)  # O's step needs gradients through D, not D's weight gradients
        with autocast(device, bf16):
            loss_o = F.cross_entropy(C(o).float(), yb) - lam * F.mse_loss(D(o).float(), xb)
        opt_o.zero_grad(set_to_none=True)
        loss_o.backward()
        opt_o.step()
        D.requires_grad_(True)
        return loss_o.detach()

    return step


def obfuscator_rate(x, y, width: int, batch: int, device: torch.device, ours: bool, bf16: bool) -> float:
    """images/s of the obfuscator step, fed by the naive loader (fp32 NCHW) or by device data."""
    torch.manual_seed(0)
    memory = torch.channels_last if ours else torch.contiguous_format
    C = frozen(nets.resnet18(width).to(device, memory_format=memory))
    O, D = (nets.codec(32).to(device, memory_format=memory) for _ in range(2))
    step = obfuscator_step(C, O, D, device, bf16)
    data = DeviceData(x, y, device) if ours else None
    rate = 0.0
    for epoch in range(2):
        sync(device)
        t0, seen, total = time.perf_counter(), 0, torch.zeros((), device=device)
        if ours:
            for xb, yb in data.batches(batch, shuffle=True, flip_images=True, seed=epoch, drop_last=True, channels_last=True):
                total += step(xb, yb)
                seen += len(yb)
        else:
            for xb, yb in naive_loader(x, y, batch):
                xb, yb = xb.to(device), yb.to(device)
                step(xb, yb).item()
                seen += len(yb)
        sync(device)
        rate = seen / (time.perf_counter() - t0)
    return rate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- main

def compare(title: str, configs: dict, rounds: int) -> dict:
    """Run every configuration `rounds` times, round-robin; print medians and ratios to the first."""
    rates = {k: [] for k in configs}
    for _ in range(rounds):
        for k, fn in configs.items():
            rates[k].append(fn())
    base = median(next(iter(rates.values())))
    print(f"\n{title}:")
    out = {}
    for k, rs in rates.items():
        r = median(rs)
        out[k] = {"images_per_s": r, "vs_naive": r / base, "runs": rs}
        print(f"  {k:<32} {r:9.1f} images/s  x{r / base:5.2f} vs naive")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="16", help="ResNet18 widths, e.g. 16,64 (64 = the real one)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed epoch (on a CPU, scaled down for wider nets)")
    ap.add_argument("--obf-width", type=int, default=16, help="the frozen ResNet18's width in the obfuscator step (0: skip)")
    ap.add_argument("--obf-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="run every configuration this many times (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    info = print_machine(f"training throughput on {device}")
    fast_bf16 = device.type == "cuda" or cpu_has_bf16()
    print(f"# torch threads {torch.get_num_threads()}, bf16 {'native' if fast_bf16 else 'emulated (slow)'} on this device")
    data = cifar10_or_random()
    results = {"machine": info, "device": str(device), "threads": torch.get_num_threads(), "classifier": {}}

    for width in (int(w) for w in args.widths.split(",")):
        steps = max(2, args.steps * 16 // max(16, width)) if device.type == "cpu" else args.steps
        n = steps * args.batch
        x, y = data.x_train[:n], data.y_train[:n]
        results["classifier"][width] = compare(f"classifier ResNet18 width {width}, batch {args.batch}, {steps} steps per timed epoch", {
            "naive DataLoader fp32 NCHW": lambda: naive_classifier(x, y, width, args.batch, device),
            "trainer fp32 NCHW": lambda: trainer_classifier(data, n, width, args.batch, device, False, False),
            "trainer fp32 channels_last": lambda: trainer_classifier(data, n, width, args.batch, device, False, True),
            "trainer bf16 channels_last": lambda: trainer_classifier(data, n, width, args.batch, device, True, True),
        }, args.rounds)

    if args.obf_width:
        steps, batch = args.steps, args.obf_batch
        x, y = data.x_train[:steps * batch], data.y_train[:steps * batch]
        results["obfuscator"] = compare(
            f"obfuscator step (codec O + codec D + frozen ResNet18 width {args.obf_width}), batch {batch}, {steps} steps", {
                "naive DataLoader fp32 NCHW": lambda: obfuscator_rate(x, y, args.obf_width, batch, device, False, False),
                "device data fp32 channels_last": lambda: obfuscator_rate(x, y, args.obf_width, batch, device, True, False),
                "device data bf16 channels_last": lambda: obfuscator_rate(x, y, args.obf_width, batch, device, True, True),
            }, args.rounds)
    save_json(args.json, results)


if __name__ == "__main__":
    main()
