"""report.md and the figures of a protocol folder, from its logs alone (`privoffload plot RUN`).

Each seed folder is read into the same numbers (`seed_numbers`); every figure of the report is then the
mean over the seeds with its 95 % t-interval (`stats.estimate`), ratios included: a ratio is computed per
seed, then averaged. The ends of every ratio come from the `scores` stage (all test images); curves come
from the per-epoch evaluations on the profile's test subset; the attack suites' tables from each seed's suite.json
(experiments/privacy_table.py). Only Fig. 4 runs networks (seed 0's final O, D and the suite's attacks on one
test image per class); nothing trains.
"""

from __future__ import annotations

import json
import os
import platform
import tomllib
from pathlib import Path
from typing import Any

import torch

from ..data import Dataset
from ..errors import UserError
from ..privacy.samples import sample_rows
from ..runs import is_done, last_record, read_metrics
from ..runtime import atomic_write_text
from . import figures
from .privacy_table import SUITES, privacy_lines
from .stats import Estimate, estimate, verdict

STAGES = ("c0", "o0", "robust", "control", "drift", "recovery", "attack-o0", "attack-robust", "identify", "whitebox",
          "blackbox", "remap", "scores")
PAPER = {"c0": 0.7082, "o0": 0.4068, "c_final": 0.8153, "o0_final": 0.2052, "recovery": 0.73}
PAPER["o0_ratio"] = PAPER["o0"] / PAPER["c0"]
PAPER["drop"] = (PAPER["o0"] - PAPER["o0_final"]) / PAPER["o0"]
PAPER["recovery_ratio"] = PAPER["recovery"] / PAPER["c_final"]
TARGETS = {"o0_ratio": 0.55, "drop": 0.35, "recovery_ratio": 0.60}  # at CPU scale, each at least this
ROBUST_RATIO, PRIVACY_GAP_DB, BLACKBOX_SHARE = 1 / 3, 0.5, 0.9  # the targets beyond the paper


# ---------------------------------------------------------------- one seed

def seed_folders(out: Path) -> list[Path]:
    folders = sorted((p for p in out.glob("seed-*") if (p / "c0" / "metrics.jsonl").exists()),
                     key=lambda p: int(p.name.split("-")[1]))
    if not folders:
        raise UserError(f"{out} has no seed folder with a baseline classifier yet; run `privoffload reproduce` first")
    return folders


def drop(start: float, later: list[float]) -> dict[str, float]:
    """Relative drops of an obfuscator's accuracy from `start` (on C0): after the drift (the last of `later`),
    on average over the drift's evaluations (less noisy than one point), and at its worst."""
    rel = (lambda a: (start - a) / start) if start else (lambda a: float("nan"))
    return {"drop": rel(later[-1]), "mean_drop": rel(sum(later) / len(later)), "worst_drop": rel(min(later))}


def _value(record: dict | None, key: str) -> float:
    return float(record[key]) if record and key in record else float("nan")


def seed_numbers(folder: Path) -> dict[str, Any]:
    """Every number and curve the report needs from one seed's folder (nan where a stage has not run)."""
    m = {stage: read_metrics(folder / stage) for stage in STAGES}
    scores = m["scores"][-1] if m["scores"] else {}

    def end(key: str, stage: str, log_key: str) -> float:  # a ratio's end: from `scores`, else the stage's last log
        return float(scores[key]) if key in scores else _value(last_record(m[stage], log_key), log_key)

    n: dict[str, Any] = {
        "c0": end("c0", "c0", "test_accuracy"), "o0": end("o0@c0", "o0", "quantized_obfuscated_accuracy"),
        "c_final": end("drift", "drift", "test_accuracy"), "recovery": end("recovery@drift", "recovery",
                                                                          "quantized_obfuscated_accuracy"),
        "scored_images": scores.get("images"),
    }
    drift = [(r["epoch"], r["test_accuracy"], r["probes"]) for r in m["drift"] if "probes" in r]
    n["drift_curve"] = {e: {"classifier": c, **{k: p[k]["quantized_obfuscated_accuracy"] for k in p}} for e, c, p in drift}
    n["drift_epochs"] = drift[-1][0] if drift else 0
    n["o0_final"] = float(scores["o0@drift"]) if "o0@drift" in scores else (
        drift[-1][2]["O0"]["quantized_obfuscated_accuracy"] if drift else float("nan"))
    n["o0_ratio"] = n["o0"] / n["c0"]
    n["drop"] = (n["o0"] - n["o0_final"]) / n["o0"]
    n["recovery_ratio"] = n["recovery"] / n["c_final"]
    n["recovery_curve"] = {r["epoch"]: r["quantized_obfuscated_accuracy"] for r in m["recovery"]
                           if "quantized_obfuscated_accuracy" in r}
    if n["recovery_curve"] and 0 not in n["recovery_curve"] and drift:  # recovery starts where the drift left O0
        n["recovery_curve"][0] = drift[-1][2]["O0"]["quantized_obfuscated_accuracy"]
    n["recovery_epochs"] = max(n["recovery_curve"], default=0)
    for name, stage in (("o0", "o0"), ("final", "recovery")):
        r = last_record(m[stage], "deobfuscator_psnr_db")
        n[f"d_psnr_{name}"], n[f"d_ssim_{name}"] = _value(r, "deobfuscator_psnr_db"), _value(r, "deobfuscator_ssim")
    for name, stage in (("o0", "attack-o0"), ("robust", "attack-robust")):
        r = last_record(m[stage], "attacker_psnr_db")
        n[f"attack_psnr_{name}"], n[f"attack_ssim_{name}"] = _value(r, "attacker_psnr_db"), _value(r, "attacker_ssim")
    identify = last_record(m["identify"], "test_accuracy")
    n["identify"], n["chance"] = _value(identify, "test_accuracy"), _value(identify, "chance")
    # the attack suites (privacy/suite.py): their summaries, as the suites wrote them
    n["suites"] = {stage: json.loads((folder / stage / "suite.json").read_text()) for stage, _ in SUITES
                   if (folder / stage / "suite.json").exists()}

    # beyond the paper: the robust obfuscator and its control beside O0, on the same classifiers
    if drift and "robust" in drift[0][2]:
        plain_curve = [p["O0"]["quantized_obfuscated_accuracy"] for _, _, p in drift]
        for name, probe in (("plain", "O0"), ("robust", "robust"), ("control", "control")):
            if probe not in drift[0][2]:
                continue
            curve = [p[probe]["quantized_obfuscated_accuracy"] for _, _, p in drift]
            n[f"{name}_start"] = float(scores.get(f"{probe.lower()}@c0", curve[0]))
            n[f"{name}_end"] = float(scores.get(f"{probe.lower()}@drift", curve[-1]))
            d = drop(curve[0], curve[1:] or curve)  # mean and worst: along the curve (test subset)
            n[f"{name}_drop"] = (n[f"{name}_start"] - n[f"{name}_end"]) / n[f"{name}_start"]
            n[f"{name}_mean_drop"], n[f"{name}_worst_drop"] = d["mean_drop"], d["worst_drop"]
        for name in ("robust", "control"):
            for key in ("drop", "mean_drop", "worst_drop"):
                if f"{name}_{key}" in n:
                    n[f"{name}_{key}_ratio"] = n[f"{name}_{key}"] / n[f"plain_{key}"] if n[f"plain_{key}"] > 0 else float("nan")
        n["privacy_gap_db"] = abs(n["attack_psnr_robust"] - n["attack_psnr_o0"])
        # the cost curve: drop ratio (on the test subset) of the robust O and its control after each of their epochs
        plain = drop(plain_curve[0], plain_curve[1:] or plain_curve)["drop"]
        for name in ("robust", "control"):
            n[f"{name}_cost_curve"] = {}
            epochs = max((r["epoch"] for r in m[name]), default=0)  # its last snapshot is the final probe itself
            for probe in drift[0][2]:
                if probe.startswith(f"{name}@epoch-") or (probe == name and epochs):
                    curve = [p[probe]["quantized_obfuscated_accuracy"] for _, _, p in drift]
                    ratio = drop(curve[0], curve[1:] or curve)["drop"] / plain if plain > 0 else float("nan")
                    n[f"{name}_cost_curve"][int(probe.rsplit("-", 1)[1]) if "@" in probe else epochs] = ratio

    # beyond the paper: re-sync; before = O0 on the drifted C (the same point as the drift's end)
    for stage in ("whitebox", "blackbox"):
        series = [(r["step"], r["queries"], r["quantized_obfuscated_accuracy"]) for r in m[stage]]
        n[f"{stage}_curve"] = {s: (q, a) for s, q, a in series}
        if series:
            n[f"{stage}_before"] = n["o0_final"] if "o0@drift" in scores else series[0][2]
            n[f"{stage}_after"] = float(scores.get(f"{stage}@drift", series[-1][2]))
            n[f"{stage}_gain"] = n[f"{stage}_after"] - n[f"{stage}_before"]
            n[f"{stage}_steps"], n[f"{stage}_queries"] = series[-1][0], series[-1][1]
            n[f"{stage}_psnr"] = _value(last_record(m[stage], "deobfuscator_psnr_db"), "deobfuscator_psnr_db")
    if "whitebox_gain" in n and "blackbox_gain" in n:
        n["blackbox_share"] = n["blackbox_gain"] / n["whitebox_gain"] if n["whitebox_gain"] > 0 else float("nan")
        # the query-budget curve: after each black-box round, the share of white-box's gain at the same number of steps
        # (both on the test subset), against the queries spent so far
        white = {r["step"]: r["quantized_obfuscated_accuracy"] for r in m["whitebox"]}
        n["budget_curve"] = {}
        for r in m["blackbox"]:
            if r["step"] > 0 and r["step"] in white and white[r["step"]] > white[0]:
                n["budget_curve"][r["queries"]] = ((r["quantized_obfuscated_accuracy"] - m["blackbox"][0]["quantized_obfuscated_accuracy"])
                                                   / (white[r["step"]] - white[0]))
        agreement = [r["agreement"] for r in m["blackbox"] if r.get("agreement") is not None]
        n["surrogate_agreement"] = agreement[-1] if agreement else float("nan")
    remap = m["remap"][-1] if m["remap"] else None
    if remap:
        n.update(remap_before=remap["before"], remap_after=remap["after"], remap_gain=remap["after"] - remap["before"],
                 remap_queries=remap["queries"])
    for r in read_metrics(folder / "live"):  # the live hot swap (live.py), through the real service and client
        for key in ("before_swap", "after_swap", "after_resync"):
            n[f"live_{r['obfuscator']}_{key}"] = r[key]
    timings = folder / "timings.json"
    n["timings"] = json.loads(timings.read_text()) if timings.exists() else {}
    return n


# ---------------------------------------------------------------- over seeds

def over_seeds(seeds: list[dict[str, Any]], key: str) -> Estimate:
    return estimate(s.get(key, float("nan")) for s in seeds)


def curve_over_seeds(seeds: list[dict[str, Any]], key: str, field: str | None = None) -> list[tuple[float, Estimate]]:
    """A curve's points, each the mean and interval over the seeds that have it."""
    xs = sorted({x for s in seeds for x in s.get(key, {})})
    return [(x, estimate(s[key][x] if field is None else s[key][x][field] for s in seeds if x in s.get(key, {})))
            for x in xs]


def pct(e: Estimate) -> str:
    return e.text(100)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu} (host {platform.node()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def draw_figures(out: Path, seeds: list[dict[str, Any]], folders: list[Path], data: Dataset | None = None,
                 data_root: str | Path | None = None) -> list[str]:
    paths = []
    first = folders[0]
    if (first / "recovery" / "obfuscator.safetensors").exists():
        suite = first / "privacy" if is_done(first / "privacy") else None  # one row per attack of the suite
        rows = sample_rows(first / "recovery", suite=suite, data=data, data_root=data_root, device="cpu")
        paths.append(figures.sample_grid(rows, out / "fig4_samples.png", title=f"{first.name}: final obfuscator"))
    bars = {"classifier C0": over_seeds(seeds, "c0"), "obfuscator O0": over_seeds(seeds, "o0"),
            "final classifier": over_seeds(seeds, "c_final"), "final obfuscator": over_seeds(seeds, "recovery")}
    paths.append(figures.accuracy_bars(bars, out / "fig5_accuracy.png"))
    if any(s["drift_curve"] for s in seeds):
        lines = {"classifier (clean)": curve_over_seeds(seeds, "drift_curve", "classifier"),
                 "baseline obfuscator O0": curve_over_seeds(seeds, "drift_curve", "O0")}
        if all("robust" in c for s in seeds for c in s["drift_curve"].values()):
            lines["robust obfuscator (C0 + stand-ins)"] = curve_over_seeds(seeds, "drift_curve", "robust")
        paths.append(figures.curves(lines, out / "fig6_drift.png", xlabel="epochs of further classifier training",
                                    title="Experiment 1: obfuscator accuracy while the classifier trains"))
    if any(s["recovery_curve"] for s in seeds):
        paths.append(figures.curves({"obfuscator": curve_over_seeds(seeds, "recovery_curve")}, out / "fig7_recovery.png",
                                    xlabel="epochs of obfuscator retraining", title="Experiment 2: obfuscator recovery"))
    cost = {"robust O": curve_over_seeds(seeds, "robust_cost_curve"), "control": curve_over_seeds(seeds, "control_cost_curve")}
    if cost["robust O"]:
        paths.append(figures.cost_curve({k: v for k, v in cost.items() if v}, ROBUST_RATIO, out / "fig9_robust_cost.png"))
    budget = curve_over_seeds(seeds, "budget_curve")
    if len(budget) > 1:
        paths.append(figures.curves({"black-box / white-box gain": budget}, out / "fig10_query_budget.png",
                                    xlabel="API queries (obfuscated images sent)", ylabel="share of white-box's gain",
                                    title="Black-box re-sync against its query budget", scale=1.0, ylim=None,
                                    target=BLACKBOX_SHARE, log_x=True))
    if all(s.get("whitebox_curve") and s.get("blackbox_curve") for s in seeds):
        white, black = (curve_over_seeds(seeds, f"{k}_curve", 1) for k in ("whitebox", "blackbox"))
        queries = [(x, over_seeds([{"q": s["blackbox_curve"][x][0]} for s in seeds if x in s["blackbox_curve"]], "q").mean)
                   for x, _ in black]
        paths.append(figures.resync_curves(white, black, [q for _, q in queries], out / "fig8_resync.png"))
    return [p.name for p in paths]


# ---------------------------------------------------------------- report.md

def write_report(out: str | Path, data_root: str | Path | None = None, data: Dataset | None = None) -> Path:
    """Draw the figures and write report.md of a protocol folder from its seeds' logs."""
    out = Path(out)
    folders = seed_folders(out)
    seeds = [seed_numbers(f) for f in folders]
    drawn = draw_figures(out, seeds, folders, data, data_root)
    e = {key: over_seeds(seeds, key) for key in ("c0", "o0", "c_final", "o0_final", "recovery", "o0_ratio", "drop",
                                                 "recovery_ratio")}
    cfg_text = (out / "config.toml").read_text() if (out / "config.toml").exists() else ""
    setting = tomllib.loads(cfg_text) if cfg_text else {}
    profile, dataset = setting.get("profile", "?"), setting.get("dataset", "cifar10")
    on_paper = dataset == "cifar10"  # the paper's numbers are CIFAR-10's: a column only for CIFAR-10

    def row(*cells: str) -> str:  # cells[1] is the paper's column
        kept = [c for i, c in enumerate(cells) if on_paper or i != 1]
        return "|" + "|".join(c if c == "---" else f" {c} " if c else " " for c in kept) + "|"
    source = (out / "data.txt").read_text().strip() if (out / "data.txt").exists() else "unknown"
    images = {s["scored_images"] for s in seeds}
    scored = f"all {images.pop():,} test images" if len(images) == 1 and None not in images else "the stages' test images"
    epochs = {s["drift_epochs"] for s in seeds}
    k = len(seeds)

    drift_after = "/".join(map(str, sorted(epochs)))
    lines = [f"# Reproduction report (data set `{dataset}`, profile `{profile}`, {k} seed{'s' if k > 1 else ''})", "",
             "Hoefer & Salinas Monroy's protocol: baseline classifier C0 and obfuscator O0, experiment 1 (C keeps "
             "training; O0 is measured on the current C), experiment 2 (O retrains against the final C).", "",
             f"Every figure is the mean over {k} seed{'s' if k > 1 else ''} ({', '.join(f.name for f in folders)}) "
             "± the half-width of its 95 % t-interval; a ratio is computed per seed, then averaged. A target is met "
             "only when the whole interval is on its side. The ends of every ratio are scored on "
             f"{scored}; curves on the profile's test subset. Obfuscated accuracy is the cloud classifier's accuracy "
             "on the 8-bit upload, the pixels it receives. Accuracies in %.", "",
             row("figure", "paper (CIFAR-10)", "ours", "note"), row("---", "---", "---", "---"),
             row("C0 test accuracy", f"{100 * PAPER['c0']:.2f}", pct(e["c0"]), ""),
             row("O0 obfuscated accuracy", f"{100 * PAPER['o0']:.2f}", pct(e["o0"]), ""),
             row("C after drift", f"{100 * PAPER['c_final']:.2f}", pct(e["c_final"]), f"after {drift_after} epochs"),
             row("O0 on the drifted C", f"{100 * PAPER['o0_final']:.2f}", pct(e["o0_final"]),
                 f"paper: after 10 epochs of drift; ours: after {drift_after}" if on_paper else f"after {drift_after} epochs"),
             row("O after recovery", f"{100 * PAPER['recovery']:.2f}", pct(e["recovery"]),
                 f"after {'/'.join(map(str, sorted({s['recovery_epochs'] for s in seeds})))} epochs"),
             "", "## The paper's ratios", "",
             row("ratio", "paper (CIFAR-10)", "ours", "target", "verdict"), row("---", "---", "---", "---", "---")]
    for key, label in (("o0_ratio", "O0 / C0"), ("drop", "relative drop of O0 after the drift"),
                       ("recovery_ratio", "O after recovery / C after drift")):
        lines.append(row(label, f"{PAPER[key]:.2f}", e[key].text(1), f"at least {TARGETS[key]:.2f}",
                         verdict(e[key], TARGETS[key])))

    lines += ["", "## Privacy (test images; lower PSNR and SSIM = more private)", "",
              "| obfuscator | attacker | PSNR dB | SSIM |", "|---|---|---|---|"]
    for label, name in (("O0", "o0"), ("O after recovery", "final")):
        lines.append(f"| {label} | co-trained D | {over_seeds(seeds, f'd_psnr_{name}').text()} | "
                     f"{over_seeds(seeds, f'd_ssim_{name}').text(digits=3)} |")
    if over_seeds(seeds, "identify").n:
        lines += ["", f"- A fresh classifier trained on the suite decoder's reconstructions of the training images "
                  f"tells the class of the test images' reconstructions (on {dataset}: "
                  f"{'who it is' if dataset == 'orl' else 'their label'}) with accuracy {pct(over_seeds(seeds, 'identify'))} % "
                  f"(chance {100 * over_seeds(seeds, 'chance').mean:.1f} %; C0 on the clean images {pct(e['c0'])} %)."]
    lines += privacy_lines(seeds, [f.name for f in folders])
    lines += ["", "The obfuscation is not differential privacy in the formal sense: no noise is calibrated to a "
              "privacy budget. Privacy is measured by the attacks above, nothing more."]
    lines += beyond_lines(seeds)

    stages = [s for s in dict.fromkeys(k for s in seeds for k in s["timings"])]
    lines += ["", "## Wall time (seconds per seed, mean over the seeds; seeds run side by side share the cores)", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {over_seeds([s['timings'] for s in seeds if name in s['timings']], name).mean:.0f} |"
              for name in stages]
    totals = [sum(s["timings"].values()) for s in seeds if s["timings"]]
    if totals:
        lines.append(f"| total | {sum(totals) / len(totals):.0f} |")
    lines += ["", f"Machine: {machine()}.", "", f"Data: {source}."]
    if "lossy" in source:
        lines += ["", "This CIFAR-10 copy is lossy (JPEG quality 75, 4:2:0 chroma; median PSNR 30.5 dB against the "
                  "originals): accuracies are a few points off what the real data set gives."]
    lines += ["", f"Figures: {', '.join(drawn)}."]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def beyond_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """The report's rows for the two comparisons beyond the paper (docs/drift-robustness.md), with their targets."""
    lines = []
    if all("robust_drop" in s for s in seeds):
        r = {key: over_seeds(seeds, key) for key in ("robust_drop_ratio", "robust_mean_drop_ratio",
                                                     "robust_worst_drop_ratio", "privacy_gap_db")}
        lines += ["", "## Beyond the paper: a drift-robust obfuscator (experiment 1)", "",
                  "The obfuscators measured on the same classifiers: C0, then every evaluation of experiment 1's drift. "
                  "Relative drop = (accuracy on C0 - accuracy during the drift) / accuracy on C0: after the drift "
                  "(both ends on all test images), averaged over its evaluations and at its lowest point (on the "
                  "test subset). The control is O0 trained for as many more steps as the robust O, against C0 alone: "
                  "what the extra training does without the stand-ins.", "",
                  "| obfuscator | on C0 | after drift | drop after | mean drop | worst drop | fresh-attacker PSNR dB |",
                  "|---|---|---|---|---|---|---|"]
        rows = [("O0 (plain)", "plain", "o0"), ("control (O0 + the same steps, C0 only)", "control", None),
                ("robust (C0 + stand-ins, mirrored uploads)", "robust", "robust")]
        for label, name, attack in rows:
            if not all(f"{name}_drop" in s for s in seeds):
                continue
            psnr = over_seeds(seeds, f"attack_psnr_{attack}").text() if attack else "–"
            lines.append(f"| {label} | {pct(over_seeds(seeds, f'{name}_start'))} | {pct(over_seeds(seeds, f'{name}_end'))} | "
                         f"{pct(over_seeds(seeds, f'{name}_drop'))} | {pct(over_seeds(seeds, f'{name}_mean_drop'))} | "
                         f"{pct(over_seeds(seeds, f'{name}_worst_drop'))} | {psnr} |")
        ratio = {k: f"{r[f'robust_{k}_ratio'].text()} ({verdict(r[f'robust_{k}_ratio'], ROBUST_RATIO, at_least=False)})"
                 for k in ("drop", "mean_drop", "worst_drop")}
        lines += ["", f"- Robust drop / plain drop (target at most {ROBUST_RATIO:.2f}): after the drift {ratio['drop']}, "
                  f"mean over the drift {ratio['mean_drop']}, worst {ratio['worst_drop']}."]
        if all("control_drop_ratio" in s for s in seeds):
            lines.append(f"- Control drop / plain drop: after the drift {over_seeds(seeds, 'control_drop_ratio').text()}; "
                         f"robust minus control: {over_seeds([{'d': s['robust_drop_ratio'] - s['control_drop_ratio']} for s in seeds], 'd').text()} "
                         "(below 0: the stand-ins, not the extra steps, made the difference).")
        if r["privacy_gap_db"].n:
            lines.append(f"- Privacy: fresh-attacker PSNR gap between the two, {r['privacy_gap_db'].text()} dB (target at "
                         f"most {PRIVACY_GAP_DB} dB: {verdict(r['privacy_gap_db'], PRIVACY_GAP_DB, at_least=False)}).")
        cost = curve_over_seeds(seeds, "robust_cost_curve")
        if cost:
            points = ", ".join(f"{x} epoch{'s' if x > 1 else ''}: {e.text()}" for x, e in cost)
            lines.append(f"- Drop ratio against the robust O's extra epochs (fig9_robust_cost.png, test subset): {points}.")
    if all("blackbox_share" in s for s in seeds):
        lines += ["", "## Beyond the paper: re-sync after the update (experiment 2)", "",
                  "O0 and D0 re-synced to the drifted classifier on the client's own images, with the same budget of "
                  "steps: white-box from its published weights, black-box from its API's probabilities alone "
                  "(a surrogate distilled from the answers, started from C0 or a stand-in for the update, whichever agreed best with its first answers). Before and after: the real drifted "
                  "classifier's accuracy on the 8-bit uploads of the test images.", "",
                  "| re-sync | steps | API queries (images) | before | after | regained | co-trained D PSNR dB |",
                  "|---|---|---|---|---|---|---|"]
        for label, name in (("white-box", "whitebox"), ("black-box", "blackbox")):
            lines.append(f"| {label} | {over_seeds(seeds, f'{name}_steps').mean:.0f} | "  # budgets, the same every seed
                         f"{over_seeds(seeds, f'{name}_queries').mean:.0f} | {pct(over_seeds(seeds, f'{name}_before'))} | "
                         f"{pct(over_seeds(seeds, f'{name}_after'))} | {pct(over_seeds(seeds, f'{name}_gain'))} | "
                         f"{over_seeds(seeds, f'{name}_psnr').text()} |")
        if all("remap_gain" in s for s in seeds):
            lines.append(f"| output remapping of O0's answers (no game) | 0 | {over_seeds(seeds, 'remap_queries').mean:.0f} | "
                         f"{pct(over_seeds(seeds, 'remap_before'))} | {pct(over_seeds(seeds, 'remap_after'))} | "
                         f"{pct(over_seeds(seeds, 'remap_gain'))} | – |")
        share = over_seeds(seeds, "blackbox_share")
        lines += ["", f"- Black-box regained {share.text()} of what white-box regained (target at least "
                  f"{BLACKBOX_SHARE}: {verdict(share, BLACKBOX_SHARE)}), with "
                  f"{over_seeds(seeds, 'blackbox_queries').mean:.0f} queries; its surrogate named the API's top class "
                  f"for {pct(over_seeds(seeds, 'surrogate_agreement'))} % of held-out queries in its last round."]
        budget = curve_over_seeds(seeds, "budget_curve")
        if len(budget) > 1:
            points = ", ".join(f"{q:.0f} queries: {e.text()} ({verdict(e, BLACKBOX_SHARE)})" for q, e in budget)
            lines.append(f"- Share of white-box's gain at the same number of steps, against the queries spent so far (after "
                         f"each round; test subset; fig10_query_budget.png): {points}.")
        if all("remap_gain" in s for s in seeds):
            lines.append(f"- Relabelling the API's answers alone regains {pct(over_seeds(seeds, 'remap_gain'))} points: the "
                         "part of the drop that is systematic class confusion.")
    if any("live_robust_before_swap" in s or "live_o0_before_swap" in s for s in seeds):
        lines += ["", "## Beyond the paper: the user's view of an update (live)", "",
                  "The service on loopback serves C0; a client classifies test images through it; the cloud hot-swaps to "
                  "the drifted classifier; the client notices the new model version and re-syncs by itself (white-box, "
                  "from the published weights). Accuracy of what the client gets back, on the same images each time.", "",
                  "| client's obfuscator | before the swap | after the swap | after the automatic re-sync |", "|---|---|---|---|"]
        for label, name in (("robust O", "robust"), ("O0 (plain)", "o0")):
            if all(f"live_{name}_before_swap" in s for s in seeds):
                lines.append("| " + " | ".join([label] + [pct(over_seeds(seeds, f"live_{name}_{k}"))
                                                           for k in ("before_swap", "after_swap", "after_resync")]) + " |")
    return lines
