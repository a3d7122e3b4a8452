"""Figures and report.md of a protocol folder, from its logs alone (`privoffload plot RUN`).

Only Fig. 4 runs networks (the final O, D and the suite's attacks on a few test images); nothing trains.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..data import Cifar10
from ..errors import UserError
from ..privacy.samples import sample_rows
from ..runs import last_record as last
from ..runs import is_done, read_metrics
from ..runtime import atomic_write_text
from . import figures
from .privacy_table import privacy_lines

STAGES = ("c0", "o0", "drift", "recovery", "robust", "attack-o0", "attack-robust", "whitebox", "blackbox")
PAPER = {  # the paper's figures, in %
    "c0": 70.82, "o0": 40.68, "drift_final": 81.53, "o0_drift10": 20.52, "recovery_final": 73.0,
}


def collect(out: Path) -> dict[str, Any]:
    """The numbers the report and the figures need, read from the stages' metrics.jsonl."""
    m = {stage: read_metrics(out / stage) for stage in STAGES}
    if not m["c0"] or last(m["c0"], "test_accuracy") is None:
        raise UserError(f"{out} has no finished baseline classifier yet; run `privoffload reproduce` first")
    drift_points = [(r["epoch"], r["test_accuracy"], r["probes"]["O0"]["obfuscated_accuracy"])
                    for r in m["drift"] if "probes" in r]
    recovery_points = [(r["epoch"], r["obfuscated_accuracy"]) for r in m["recovery"] if "obfuscated_accuracy" in r]
    o0_last = last(m["o0"], "obfuscated_accuracy")
    if o0_last and m["recovery"] and recovery_points and recovery_points[0][0] != 0:
        recovery_points.insert(0, (0, drift_points[-1][2] if drift_points else o0_last["obfuscated_accuracy"]))
    robust_points = [(r["epoch"], r["probes"]["robust"]["obfuscated_accuracy"]) for r in m["drift"]
                     if "robust" in r.get("probes", {})]
    resync = {stage: [(r["step"], r["queries"], r["obfuscated_accuracy"]) for r in m[stage]]
              for stage in ("whitebox", "blackbox")}
    return {"metrics": m, "drift": drift_points, "recovery": recovery_points, "robust": robust_points,
            "resync": resync}


def drop(series: list[tuple[int, float]]) -> dict[str, float]:
    """Obfuscated accuracy on C0 (drift epoch 0), after the drift, and the relative drops: after the drift, on
    average over the drift's evaluations (less noisy than one point) and at its worst."""
    start, later = series[0][1], [a for _, a in series[1:]] or [series[0][1]]
    rel = (lambda a: (start - a) / start) if start else (lambda a: float("nan"))
    return {"start": start, "end": later[-1], "drop": rel(later[-1]), "mean_drop": rel(sum(later) / len(later)),
            "worst_drop": rel(min(later))}


def robustness(numbers: dict[str, Any]) -> dict[str, Any] | None:
    """Experiment 1 with the robust obfuscator beside O0: drops, their ratio (target <= 1/3), privacy (target: 0.5 dB)."""
    drift, robust, m = numbers["drift"], numbers["robust"], numbers["metrics"]
    if not robust or robust[0][0] != 0 or drift[0][0] != 0:
        return None
    plain, rob = drop([(e, o) for e, _, o in drift]), drop(robust)
    out = {"plain": plain, "robust": rob, "epochs": drift[-1][0]}
    for key in ("drop", "mean_drop", "worst_drop"):
        out[f"{key}_ratio"] = rob[key] / plain[key] if plain[key] > 0 else float("nan")
    psnr = [(last(m[s], "attacker_psnr_db") or {}).get("attacker_psnr_db") for s in ("attack-o0", "attack-robust")]
    if None not in psnr:
        out["psnr"] = psnr
        out["psnr_gap"] = abs(psnr[1] - psnr[0])
    return out


def resync_summary(numbers: dict[str, Any]) -> dict[str, Any] | None:
    """Experiment 2 with black-box beside white-box re-sync: accuracy regained (target: black >= 90 % of white)."""
    if not (numbers["resync"]["whitebox"] and numbers["resync"]["blackbox"]):
        return None
    out: dict[str, Any] = {}
    for name, series in numbers["resync"].items():
        out[name] = {"before": series[0][2], "after": series[-1][2], "gain": series[-1][2] - series[0][2],
                     "steps": series[-1][0], "queries": series[-1][1],
                     "psnr": numbers["metrics"][name][-1]["deobfuscator_psnr_db"]}
    white, black = out["whitebox"], out["blackbox"]
    out["gain_ratio"] = black["gain"] / white["gain"] if white["gain"] > 0 else float("nan")
    out["final_ratio"] = black["after"] / white["after"] if white["after"] > 0 else float("nan")
    return out


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


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def draw_figures(out: Path, numbers: dict[str, Any], data: Cifar10 | None = None,
                 data_root: str | Path | None = None) -> list[Path]:
    m = numbers["metrics"]
    paths = []
    if (out / "recovery" / "obfuscator.safetensors").exists():
        suite = out / "privacy" if is_done(out / "privacy") else None  # one row per attack of the suite
        rows = sample_rows(out / "recovery", suite=suite, data=data, data_root=data_root, device="cpu")
        paths.append(figures.sample_grid(rows, out / "fig4_samples.png"))
    bars = {
        "classifier C0": (last(m["c0"], "test_accuracy") or {}).get("test_accuracy"),
        "obfuscator O0": (last(m["o0"], "obfuscated_accuracy") or {}).get("obfuscated_accuracy"),
        "final classifier": (last(m["drift"], "test_accuracy") or {}).get("test_accuracy"),
        "final obfuscator": (last(m["recovery"], "obfuscated_accuracy") or {}).get("obfuscated_accuracy"),
    }
    paths.append(figures.accuracy_bars(bars, out / "fig5_accuracy.png"))
    if numbers["drift"]:
        extra = {"robust obfuscator (C0 + extras)": numbers["robust"]} if numbers["robust"] else None
        paths.append(figures.drift_curves(numbers["drift"], out / "fig6_drift.png", extra=extra))
    if numbers["recovery"]:
        paths.append(figures.recovery_curve(numbers["recovery"], out / "fig7_recovery.png"))
    if numbers["resync"]["whitebox"] and numbers["resync"]["blackbox"]:
        paths.append(figures.resync_curves(numbers["resync"]["whitebox"], numbers["resync"]["blackbox"],
                                           out / "fig8_resync.png"))
    return paths


def write_report(out: str | Path, data_root: str | Path | None = None, data: Cifar10 | None = None) -> Path:
    """Draw the figures and write report.md of a protocol folder from its logs (and, for Fig. 4, its final networks)."""
    out = Path(out)
    numbers = collect(out)
    draw_figures(out, numbers, data, data_root)
    m = numbers["metrics"]
    drift = numbers["drift"]
    after10 = next(((e, o) for e, _, o in drift if e >= 10), drift[-1][::2] if drift else None)
    o0 = last(m["o0"], "obfuscated_accuracy") or {}
    rec = last(m["recovery"], "obfuscated_accuracy") or {}
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
    lines += privacy_lines(out)
    lines += ["", "The obfuscation is not differential privacy in the formal sense: no noise is calibrated to a "
              "privacy budget. Privacy is measured by the attacks above, nothing more."]
    lines += beyond_lines(numbers)
    lines += ["", "## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| total | {sum(timings.values()):.0f} |", "", f"Machine: {machine()}.", "", f"Data: {source}."]
    if "lossy" in source:
        lines += ["", "This CIFAR-10 copy is lossy (JPEG quality 75, 4:2:0 chroma; median PSNR 30.5 dB against the "
                  "originals): accuracies are a few points off what the real data set gives."]
    lines += ["", "Figures: fig4_samples.png, fig5_accuracy.png, fig6_drift.png, fig7_recovery.png"
              + (", fig8_resync.png." if numbers["resync"]["whitebox"] else ".")]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def beyond_lines(numbers: dict[str, Any]) -> list[str]:
    """The report's rows for the two comparisons beyond the paper (docs/drift-robustness.md), with their targets."""
    lines = []
    r = robustness(numbers)
    if r:
        lines += ["", "## Beyond the paper: a drift-robust obfuscator (experiment 1)", "",
                  f"Both obfuscators measured on the same classifiers: C0, then every evaluation of experiment 1's "
                  f"drift ({r['epochs']} epochs). Relative drop = (accuracy on C0 - accuracy during the drift) / "
                  f"accuracy on C0: after the drift, averaged over its evaluations, and at its lowest point.", "",
                  "| obfuscator | on C0 | after drift | drop after | mean drop | worst drop | fresh-attacker PSNR dB |",
                  "|---|---|---|---|---|---|---|"]
        for label, key, i in (("O0 (plain)", "plain", 0), ("robust (C0 + extras)", "robust", 1)):
            d = r[key]
            psnr = f"{r['psnr'][i]:.2f}" if "psnr" in r else "–"
            lines.append(f"| {label} | {pct(d['start'])} | {pct(d['end'])} | {100 * d['drop']:.1f} % | "
                         f"{100 * d['mean_drop']:.1f} % | {100 * d['worst_drop']:.1f} % | {psnr} |")
        met = {k: verdict(r[f"{k}_ratio"] <= 1 / 3) for k in ("drop", "mean_drop", "worst_drop")}
        lines += ["", f"- Robust drop / plain drop (target at most 0.33): after the drift {r['drop_ratio']:.2f} "
                  f"({met['drop']}), mean over the drift {r['mean_drop_ratio']:.2f} ({met['mean_drop']}), "
                  f"worst {r['worst_drop_ratio']:.2f} ({met['worst_drop']})."]
        if "psnr_gap" in r:
            lines.append(f"- Privacy: fresh-attacker PSNR {r['psnr'][0]:.2f} dB (O0) vs {r['psnr'][1]:.2f} dB (robust), "
                         f"gap {r['psnr_gap']:.2f} dB (target at most 0.5 dB: {verdict(r['psnr_gap'] <= 0.5)}).")
    s = resync_summary(numbers)
    if s:
        wb, bb = s["whitebox"], s["blackbox"]
        lines += ["", "## Beyond the paper: re-sync after the update (experiment 2)", "",
                  "O0 and D0 re-synced to the drifted classifier on the client's own images, with the same budget of "
                  "steps: white-box from its published weights, black-box from its API's probabilities alone "
                  "(a surrogate distilled from the answers, started from C0). Accuracy: the real drifted classifier "
                  "on the test images.", "",
                  "| re-sync | steps | API queries (images) | before | after | regained | co-trained D PSNR dB |",
                  "|---|---|---|---|---|---|---|"]
        for label, d in (("white-box", wb), ("black-box", bb)):
            lines.append(f"| {label} | {d['steps']} | {d['queries']} | {pct(d['before'])} | {pct(d['after'])} | "
                         f"{100 * d['gain']:+.2f} | {d['psnr']:.2f} |")
        lines += ["", f"- Black-box regained {100 * s['gain_ratio']:.0f} % of what white-box regained, with "
                  f"{bb['queries']} queries (target at least 90 %: {verdict(s['gain_ratio'] >= 0.9)}); its final accuracy is "
                  f"{100 * s['final_ratio']:.0f} % of white-box's."]
    return lines
