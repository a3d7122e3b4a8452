"""The paper's figures (and the privacy frontier) as plain functions: each takes numbers or images (never run folders)
and writes one PNG. Figures over seeds draw the mean and its 95 % interval as a band or an error bar.

Matplotlib runs on the Agg backend (no display); every figure is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..runtime import atomic_path  # noqa: E402
from .stats import Estimate  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def _hwc(image) -> np.ndarray:
    """[C, H, W] floats in [0, 1] (tensor or array; C = 1 or 3) -> [H, W, 3] for imshow."""
    a = np.asarray(image.detach().cpu().float() if hasattr(image, "detach") else image, dtype=np.float32)
    return np.clip(np.repeat(a, 3, 0) if a.shape[0] == 1 else a, 0, 1).transpose(1, 2, 0)


def sample_grid(rows: Mapping[str, Sequence], path: str | Path, *, title: str = "",
                column_labels: Sequence[str] | None = None) -> Path:
    """Fig. 4: one row per label (original, obfuscated, reconstructed, ...), one column per image.

    `rows` maps a row label to images [N, C, H, W] in [0, 1] (C = 1 grey or 3); every row has the same N.
    """
    labels = list(rows)
    n = len(rows[labels[0]])
    fig, axes = plt.subplots(len(labels), n, figsize=(1.2 * n + 1.2, 1.3 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(_hwc(rows[label][c]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0 and column_labels is not None:
                ax.set_title(column_labels[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def frontier(points: Sequence[Mapping] | Mapping[str, Sequence[Mapping]], path: str | Path, *,
             target: Mapping[str, float] | None = None, title: str = "Privacy-utility frontier") -> Path:
    """Obfuscated accuracy as a share of clean (utility) against the strongest attack's PSNR (lower = more
    private), one point per lambda, with 95 % intervals over seeds as error bars.

    `points` is one frontier, or {label: frontier} to compare recipes. Each point needs `lam`, `psnr_db`,
    `relative_accuracy` and may have `psnr_db_ci`, `relative_accuracy_ci`. `target` shades the region where
    relative accuracy >= target["relative_accuracy"] and PSNR <= target["psnr_db"].
    """
    curves = dict(points) if isinstance(points, Mapping) else {"": points}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (label, pts) in enumerate(curves.items()):
        pts = sorted(pts, key=lambda p: p["lam"])  # the line follows lambda
        x = [p["psnr_db"] for p in pts]
        y = [100 * p["relative_accuracy"] for p in pts]
        xerr = [p.get("psnr_db_ci", 0.0) if p.get("psnr_db_ci") == p.get("psnr_db_ci") else 0.0 for p in pts]
        yerr = [100 * p.get("relative_accuracy_ci", 0.0) if p.get("relative_accuracy_ci") == p.get("relative_accuracy_ci")
                else 0.0 for p in pts]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o-", color=f"C{i}", capsize=3, ms=4, label=label or None)
        for p, xi, yi in zip(pts, x, y):
            ax.annotate(f"λ={p['lam']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
    if target:
        lo, hi = ax.get_xlim()
        ax.axvline(target["psnr_db"], color="grey", lw=0.8, ls=":")
        ax.axhline(100 * target["relative_accuracy"], color="grey", lw=0.8, ls=":")
        ax.fill_between([min(lo, target["psnr_db"] - 1), target["psnr_db"]], 100 * target["relative_accuracy"], 105,
                        color="green", alpha=0.08, label="target")
        ax.set_xlim(min(lo, target["psnr_db"] - 0.5), max(hi, target["psnr_db"] + 0.5))
    ax.set_xlabel("strongest attack's PSNR on test images (dB, lower = more private)")
    ax.set_ylabel("obfuscated accuracy, % of clean")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if any(curves) or target:
        ax.legend(fontsize=8)
    return _save(fig, path)


def utility_cost(points: Sequence[Mapping], path: str | Path, *, target: float = 0.9,
                 title: str = "What utility costs: O alone against a frozen C") -> Path:
    """Share of clean accuracy on the validation split against training seconds, one point per run: colour by width,
    marker by loss, filled where the run converged (hollow: budget spent first), labelled with its epochs."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    widths = sorted({p["width"] for p in points})
    markers = {"ce": "o", "distill": "s"}
    for p in points:
        color = f"C{widths.index(p['width'])}"
        ax.plot(p["seconds"], 100 * p["utility"], markers.get(p["loss"], "^"), color=color, ms=6,
                mfc=color if p["converged"] else "none")
        ax.annotate(f"{p['epochs']}", (p["seconds"], 100 * p["utility"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    handles = [plt.Line2D([], [], color=f"C{i}", marker="o", ls="", label=f"width {w}") for i, w in enumerate(widths)]
    handles += [plt.Line2D([], [], color="grey", marker=m, ls="", label=loss) for loss, m in markers.items()
                if any(p["loss"] == loss for p in points)]
    handles.append(plt.Line2D([], [], color="grey", marker="o", mfc="none", ls="", label="not converged"))
    ax.axhline(100 * target, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training seconds on this machine (log; labels: epochs run)")
    ax.set_ylabel("upload accuracy, % of clean (validation)")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def accuracy_bars(bars: Mapping[str, Estimate], path: Path) -> Path:
    """Fig. 5: accuracy of the models before and after further training, with 95 % intervals over seeds."""
    names = [k for k, e in bars.items() if e.n]
    values = [100 * bars[k].mean for k in names]
    errors = [100 * bars[k].half if bars[k].n > 1 else 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rects = ax.bar(names, values, yerr=errors, capsize=4, color=["#4c72b0", "#dd8452", "#4c72b0", "#dd8452"][: len(names)])
    ax.bar_label(rects, fmt="%.1f", padding=6)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy before and after further training")
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def _band(ax, points: Sequence[tuple[float, Estimate]], style: str, label: str, color=None, scale: float = 100.0):
    """A mean line with its 95 % interval as a shaded band (points with one seed have no band)."""
    xs = [x for x, _ in points]
    mean = [scale * e.mean for _, e in points]
    line, = ax.plot(xs, mean, style, label=label, color=color)
    if any(e.n > 1 for _, e in points):
        ax.fill_between(xs, [scale * (e.low if e.n > 1 else e.mean) for _, e in points],
                        [scale * (e.high if e.n > 1 else e.mean) for _, e in points], color=line.get_color(), alpha=0.2)
    return line


def curves(lines: Mapping[str, Sequence[tuple[float, Estimate]]], path: Path, *, xlabel: str, title: str,
           ylabel: str = "test accuracy (%)", scale: float = 100.0, ylim: tuple[float, float] | None = (0, 100),
           target: float | None = None, log_x: bool = False) -> Path:
    """Curves over epochs (Fig. 6, Fig. 7) or queries, each the mean over seeds with its 95 % band; `target` draws a line."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, points), style in zip(lines.items(), ("o-", "s-", "^-", "v-")):
        _band(ax, points, style, label, scale=scale)
    if target is not None:
        ax.axhline(scale * target, color="grey", ls=":", lw=1, label=f"target ({target:g})")
    ax.set_xlabel(xlabel)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def resync_curves(white: Sequence[tuple[float, Estimate]], black: Sequence[tuple[float, Estimate]],
                  queries: Sequence[float], path: Path) -> Path:
    """Re-sync accuracy against steps (both modes) and against API queries (black-box), with bands over seeds.

    The right panel marks white-box's final accuracy and the target, 90 % of what white-box regained.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    _band(left, white, "o-", "white-box (published weights)")
    _band(left, black, "^-", "black-box (API answers)")
    _band(right, [(q, e) for q, (_, e) in zip(queries, black)], "^-", "black-box", color="C1")
    start, end = white[0][1].mean, white[-1][1].mean
    right.axhline(100 * end, color="C0", ls="--", lw=1, label="white-box, end of its budget")
    right.axhline(100 * (start + 0.9 * (end - start)), color="grey", ls=":", lw=1, label="90 % of white-box's gain")
    left.set_xlabel("steps of O and D")
    right.set_xlabel("API queries (obfuscated images sent)")
    left.set_ylabel("obfuscated accuracy (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Re-syncing the obfuscator to the updated classifier", fontsize=10)
    return _save(fig, path)


def cost_curve(lines: Mapping[str, Sequence[tuple[float, Estimate]]], target: float, path: Path) -> Path:
    """Beyond the paper: the drift-robust obfuscator's drop / O0's drop against its extra epochs (the control beside
    it), with the target below which the robust obfuscator counts as surviving the update."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, points), style in zip(lines.items(), ("o-", "s--")):
        _band(ax, points, style, label, scale=1.0)
    ax.axhline(target, color="grey", ls=":", lw=1, label=f"target ({target:.2f})")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlabel("epochs of extra obfuscator training (the cost)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("relative drop / O0's relative drop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("How far the robust obfuscator is from surviving the update", fontsize=10)
    return _save(fig, path)


def epsilon_sweep(points: Sequence[Mapping], path: str | Path, *, title: str = "What local differential privacy costs") -> Path:
    """Accuracy on the noisy upload and the fresh attacker's PSNR / SSIM against epsilon (log axis; no noise drawn
    at the right as epsilon = inf). Each point needs `epsilon` (a number or "inf"), `quantized_obfuscated_accuracy`,
    `attacker_psnr_db`, `attacker_ssim`, and may have `clean_accuracy` and `chance`."""
    finite = sorted(float(p["epsilon"]) for p in points if p["epsilon"] != "inf")
    inf_x = (finite[-1] * 8) if finite else 1.0

    def x(p):
        return inf_x if p["epsilon"] == "inf" else float(p["epsilon"])

    pts = sorted(points, key=x)
    xs = [x(p) for p in pts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(xs, [100 * p["quantized_obfuscated_accuracy"] for p in pts], "o-", label="C on the noisy 8-bit upload")
    if "clean_accuracy" in pts[0]:
        left.axhline(100 * pts[0]["clean_accuracy"], color="grey", lw=0.8, ls=":", label="C on clean images")
    if "chance" in pts[0]:
        left.axhline(100 * pts[0]["chance"], color="black", lw=0.8, ls="--", label="chance")
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(0, 100)
    right.plot(xs, [p["attacker_psnr_db"] for p in pts], "s-", color="C3", label="PSNR (dB)")
    right.set_ylabel("fresh attacker's PSNR (dB, lower = more private)")
    twin = right.twinx()
    twin.plot(xs, [p["attacker_ssim"] for p in pts], "^--", color="C2", label="SSIM")
    twin.set_ylabel("SSIM")
    twin.set_ylim(0, 1)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(xs, [("∞" if p["epsilon"] == "inf" else f"{float(p['epsilon']):g}") for p in pts])
        ax.minorticks_off()
        ax.set_xlabel(f"ε per upload (δ = {pts[0].get('delta', '?')})")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.legend(handles=right.get_lines() + twin.get_lines(), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
