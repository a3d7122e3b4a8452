"""Figures and report.md of a protocol folder, from its logs alone (`privoffload plot RUN`).

Only Fig. 4 runs networks (the final O, D and attacker on a few test images); nothing trains.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .. import nets
from ..data import load_cifar10
from ..errors import UserError
from ..train.common import atomic_write_bytes, read_metrics
from . import figures

PAPER = {  # the paper's figures, in %
    "c0": 70.82, "o0": 40.68, "drift_final": 81.53, "o0_drift10": 20.52, "recovery_final": 73.0,
}


def last(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The last record that carries `key`."""
    return next((r for r in reversed(records) if key in r), None)


def collect(out: Path) -> dict[str, Any]:
    """The numbers the report and the figures need, read from the stages' metrics.jsonl."""
    m = {stage: read_metrics(out / stage) for stage in ("c0", "o0", "drift", "recovery", "attack")}
    if not m["c0"] or last(m["c0"], "test_accuracy") is None:
        raise UserError(f"{out} has no finished baseline classifier yet; run `privoffload reproduce` first")
    drift_points = [(r["epoch"], r["test_accuracy"], r["probes"]["O0"]["obfuscated_accuracy"])
                    for r in m["drift"] if "probes" in r]
    recovery_points = [(r["epoch"], r["obfuscated_accuracy"]) for r in m["recovery"] if "obfuscated_accuracy" in r]
    o0_last = last(m["o0"], "obfuscated_accuracy")
    if o0_last and m["recovery"] and recovery_points and recovery_points[0][0] != 0:
        recovery_points.insert(0, (0, drift_points[-1][2] if drift_points else o0_last["obfuscated_accuracy"]))
    return {"metrics": m, "drift": drift_points, "recovery": recovery_points}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def draw_figures(out: Path, numbers: dict[str, Any], data_root: str | None = None) -> list[Path]:
    m = numbers["metrics"]
    paths = []
    if (out / "recovery" / "obfuscator.safetensors").exists():
        data = load_cifar10(data_root)
        x = torch.from_numpy(data.x_test[::1000][:8]).float() / 255  # one image of each of 8 classes
        rows = {"original": x}
        with torch.no_grad():
            obf = nets.load(out / "recovery" / "obfuscator.safetensors", expect="codec").eval()
            rows["obfuscated"] = obf(x)
            rows["reconstructed (co-trained D)"] = nets.load(out / "recovery" / "deobfuscator.safetensors").eval()(rows["obfuscated"])
            if (out / "attack" / "attacker.safetensors").exists():
                rows["reconstructed (fresh attacker)"] = nets.load(out / "attack" / "attacker.safetensors").eval()(rows["obfuscated"])
        paths.append(figures.sample_grid(rows, out / "fig4_samples.png"))
    bars = {
        "classifier C0": (last(m["c0"], "test_accuracy") or {}).get("test_accuracy"),
        "obfuscator O0": (last(m["o0"], "obfuscated_accuracy") or {}).get("obfuscated_accuracy"),
        "final classifier": (last(m["drift"], "test_accuracy") or {}).get("test_accuracy"),
        "final obfuscator": (last(m["recovery"], "obfuscated_accuracy") or {}).get("obfuscated_accuracy"),
    }
    paths.append(figures.accuracy_bars(bars, out / "fig5_accuracy.png"))
    if numbers["drift"]:
        paths.append(figures.drift_curves(numbers["drift"], out / "fig6_drift.png"))
    if numbers["recovery"]:
        paths.append(figures.recovery_curve(numbers["recovery"], out / "fig7_recovery.png"))
    return paths


def write_report(out: str | Path, data_root: str | None = None) -> Path:
    out = Path(out)
    numbers = collect(out)
    draw_figures(out, numbers, data_root)
    m = numbers["metrics"]
    drift = numbers["drift"]
    after10 = next(((e, o) for e, _, o in drift if e >= 10), drift[-1][::2] if drift else None)
    o0 = last(m["o0"], "obfuscated_accuracy") or {}
    rec = last(m["recovery"], "obfuscated_accuracy") or {}
    att = last(m["attack"], "attacker_psnr_db") or {}
    rows = [
        ("C0 test accuracy", PAPER["c0"], (last(m["c0"], "test_accuracy") or {}).get("test_accuracy"), ""),
        ("O0 obfuscated accuracy", PAPER["o0"], o0.get("obfuscated_accuracy"), ""),
        ("C after drift", PAPER["drift_final"], (last(m["drift"], "test_accuracy") or {}).get("test_accuracy"),
         f"after {drift[-1][0]} epochs" if drift else ""),
        ("O0 on drifted C, after 10 epochs of drift", PAPER["o0_drift10"], after10[1] if after10 else None,
         f"measured after {after10[0]} epochs" if after10 else ""),
        ("O after recovery", PAPER["recovery_final"], rec.get("obfuscated_accuracy"),
         f"after {rec.get('epoch')} epochs" if rec else ""),
    ]
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    cfg_text = (out / "config.toml").read_text() if (out / "config.toml").exists() else ""
    profile = next((line.split("=", 1)[1].strip().strip('"') for line in cfg_text.splitlines()
                    if line.startswith("profile")), "?")
    source = (out / "data.txt").read_text().strip() if (out / "data.txt").exists() else "unknown"

    lines = [f"# Reproduction report (profile `{profile}`)", "",
             "Hoefer & Salinas Monroy's protocol: baseline classifier C0 and obfuscator O0, experiment 1 (C keeps "
             "training; O0 is measured on the current C), experiment 2 (O retrains against the final C). Accuracies "
             "are on the CIFAR-10 test set (or the profile's test subset), in %.", "",
             "| figure | paper | ours | note |", "|---|---|---|---|"]
    lines += [f"| {name} | {p:.2f} | {pct(v)} | {note} |" for name, p, v, note in rows]
    lines += ["", "## Privacy (test set; lower PSNR/SSIM = more private)", "",
              "| obfuscator | attacker | PSNR dB | SSIM | obfuscated acc. | 8-bit obfuscated acc. |", "|---|---|---|---|---|---|"]
    for label, rec_ in (("O0 (baseline)", o0), ("O (after recovery)", rec)):
        if rec_:
            lines.append(f"| {label} | co-trained D | {rec_.get('deobfuscator_psnr_db', float('nan')):.2f} | "
                         f"{rec_.get('deobfuscator_ssim', float('nan')):.3f} | {pct(rec_.get('obfuscated_accuracy'))} | "
                         f"{pct(rec_.get('quantized_obfuscated_accuracy'))} |")
    if att:
        lines.append(f"| O (after recovery) | fresh attacker ({att.get('arch', 'codec')}, trained after O froze) | "
                     f"{att['attacker_psnr_db']:.2f} | {att['attacker_ssim']:.3f} | | |")
    lines += ["", "The obfuscation is not differential privacy in the formal sense: no noise is calibrated to a "
              "privacy budget. Privacy is measured by the attacks above, nothing more.", "",
              "## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| total | {sum(timings.values()):.0f} |", "", f"Machine: {machine()}.", "", f"Data: {source}."]
    if "lossy" in source:
        lines += ["", "This CIFAR-10 copy is lossy (JPEG quality 75, 4:2:0 chroma; median PSNR 30.5 dB against the "
                  "originals): accuracies are a few points off what the real data set gives."]
    lines += ["", "Figures: fig4_samples.png, fig5_accuracy.png, fig6_drift.png, fig7_recovery.png."]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
