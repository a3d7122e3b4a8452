"""The paper's figures as plain plotting functions: data in, PNG out (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def accuracy_bars(bars: dict[str, float | None], path: Path) -> Path:
    """Fig. 5: accuracy of the models before and after further training."""
    names = [k for k, v in bars.items() if v is not None]
    values = [100 * bars[k] for k in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rects = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#4c72b0", "#dd8452"][: len(names)])
    ax.bar_label(rects, fmt="%.1f")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy before and after further training")
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def drift_curves(points: list[tuple[int, float, float]], path: Path, extra: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """Fig. 6: C's clean accuracy and O0's obfuscated accuracy while C keeps training."""
    epochs = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [100 * p[1] for p in points], "o-", label="classifier (clean)")
    ax.plot(epochs, [100 * p[2] for p in points], "s-", label="baseline obfuscator O0")
    for name, series in (extra or {}).items():
        ax.plot([e for e, _ in series], [100 * a for _, a in series], "^-", label=name)
    ax.set_xlabel("epochs of further classifier training")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Experiment 1: obfuscator accuracy while the classifier trains")
    return _save(fig, path)


def recovery_curve(points: list[tuple[int, float]], path: Path, extra: dict[str, list[tuple[float, float]]] | None = None,
                   xlabel: str = "epochs of obfuscator retraining") -> Path:
    """Fig. 7: obfuscated accuracy while O retrains against the final classifier."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e for e, _ in points], [100 * a for _, a in points], "o-", label="obfuscator")
    for name, series in (extra or {}).items():
        ax.plot([e for e, _ in series], [100 * a for _, a in series], "^-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("obfuscated accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if extra:
        ax.legend()
    ax.set_title("Experiment 2: obfuscator recovery")
    return _save(fig, path)
