"""Shared by the benchmark scripts: machine description, interleaved timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_machine(title: str) -> dict:
    info = machine_info()
    print(f"# {title}")
    print("# " + "  ".join(f"{k}={v}" for k, v in info.items()))
    if info["load_avg_1m"] and info["cores"] and info["load_avg_1m"] > 0.5 * info["cores"]:
        print("# note: the machine is busy (load average above half the cores): timings are noisy")
    return info


def interleaved(fns: dict, rounds: int, warmup: int = 2, sync=lambda: None) -> dict[str, list[float]]:
    """Time each function once per round, round-robin, so that background load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def save_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"# wrote {path}")


def cifar10_or_random():
    """CIFAR-10 when it can be found; else random pixels of the same shape (a throughput does not
    depend on pixel values), with a note."""
    import numpy as np

    from privoffload.data import Cifar10, load_cifar10

    try:
        return load_cifar10()
    except Exception as e:
        print(f"# no CIFAR-10 ({str(e)[:120]}): random pixels instead")
        rng = np.random.default_rng(0)
        img = lambda n: rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)  # noqa: E731
        return Cifar10(img(50_000), rng.integers(0, 10, 50_000), img(10_000), rng.integers(0, 10, 10_000), "random")
