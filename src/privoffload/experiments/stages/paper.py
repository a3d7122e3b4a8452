"""The paper's stages: C0, O0, experiment 1 (the drift), experiment 2 (the recovery), and the ends of its ratios.

    c0        baseline classifier C0 (the profile's [baseline_classifier])
    o0        baseline obfuscator O0 and its co-trained D0 against frozen C0 ([baseline_obfuscator])
    drift     experiment 1: C goes on from C0; O0's 8-bit upload accuracy measured on the current C at every
              evaluation; a snapshot of C at each, so that later stages can probe other obfuscators on the same Cs
    recovery  experiment 2: O and D go on from O0 against the final C
    scores    the ends of every ratio scored again on all the test images (inference only): C0 and the drifted C
              clean, O0 on both, the recovered O on the drifted C

The report's first section is the paper's table and ratios, Fig. 5 (bars), Fig. 6 (drift) and Fig. 7 (recovery).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...config import ClassifierConfig, DataConfig, ObfuscatorConfig
from ...config.loader import choice, subset
from ...data import DeviceData, select
from ...metrics import accuracy, upload_accuracies
from ...runs import RunDir, is_done, load_classifier, load_codec
from ...runtime import frozen, pick_device, use_bf16
from ...train.classifier import train_classifier
from ...train.obfuscator import train_obfuscator
from .. import figures
from ..stage import Log, Records, Seed, Stage, need
from ..stats import Estimate, estimate, verdict

PAPER = {"c0": 0.7082, "o0": 0.4068, "c_final": 0.8153, "o0_final": 0.2052, "recovery": 0.73}
PAPER["o0_ratio"] = PAPER["o0"] / PAPER["c0"]
PAPER["drop"] = (PAPER["o0"] - PAPER["o0_final"]) / PAPER["o0"]
PAPER["recovery_ratio"] = PAPER["recovery"] / PAPER["c_final"]
TARGETS = {"o0_ratio": 0.55, "drop": 0.35, "recovery_ratio": 0.60}  # at CPU scale, each at least this


@dataclass
class ScoresConfig(DataConfig):
    """The points that enter the protocol's ratios, scored once more, on many test images (inference only)."""

    test_subset: str = "all"  # all 10,000 test images: a ratio's two ends carry the least noise
    precision: str = "auto"

    def validate(self) -> None:
        super().validate()
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.test_subset)


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class ClassifierRecord:
    accuracy: float  # clean test accuracy at the last evaluation (the stage's test subset)
    curve: dict[int, float]  # epoch -> clean test accuracy


@dataclass(frozen=True)
class ObfuscatorRecord:
    accuracy: float  # C's accuracy on the 8-bit uploads at the last evaluation (the stage's test subset)
    d_psnr_db: float  # the co-trained D on those uploads
    d_ssim: float
    curve: dict[int, float]  # epoch -> upload accuracy


@dataclass(frozen=True)
class DriftRecord:
    epochs: int
    curve: dict[int, float]  # epoch -> clean accuracy of the current C (0 = C0)
    o0_curve: dict[int, float]  # epoch -> O0's upload accuracy on the current C


@dataclass(frozen=True)
class ScoresRecord:
    images: int
    points: dict[str, float]  # c0, drift (clean); o0@c0, o0@drift, recovery@drift (8-bit uploads)
    where: str

    def __getitem__(self, key: str) -> float:
        return float(need(self.points, key, self.where))


def read_classifier(folder: Path) -> ClassifierRecord:
    log = Log(folder)
    return ClassifierRecord(log.value("test_accuracy"), log.series("epoch", "test_accuracy"))


def read_obfuscator(folder: Path) -> ObfuscatorRecord:
    log = Log(folder)
    last = log.last("deobfuscator_psnr_db")
    return ObfuscatorRecord(log.value("quantized_obfuscated_accuracy"), float(last["deobfuscator_psnr_db"]),
                            float(last["deobfuscator_ssim"]), log.series("epoch", "quantized_obfuscated_accuracy"))


def read_drift(folder: Path) -> DriftRecord:
    log = Log(folder)
    probed = [r for r in log.records if "probes" in r]
    if not probed:
        raise log.missing("evaluation with probes")
    o0 = {r["epoch"]: float(need(r["probes"], "O0", folder)["quantized_obfuscated_accuracy"]) for r in probed}
    return DriftRecord(probed[-1]["epoch"], {r["epoch"]: float(r["test_accuracy"]) for r in probed}, o0)


def read_scores(folder: Path) -> ScoresRecord:
    record = Log(folder).last("images")
    return ScoresRecord(int(record["images"]), {k: v for k, v in record.items() if isinstance(v, float)},
                        f"{folder}/metrics.jsonl")


# ---------------------------------------------------------------- running

def trainer(fn):
    """A trainer of train/ or privacy/ as a stage's run: resumable, on the protocol's data and device."""
    return lambda cfg, out, seed: fn(cfg, out, resume=True, data=seed.data, device=seed.device)


def run_drift(cfg: ClassifierConfig, out: Path, seed: Seed) -> None:
    train_classifier(cfg, out, resume=True, data=seed.data, device=seed.device,
                     probes={"O0": load_codec(seed.path("o0"))})


def run_scores(cfg: ScoresConfig, out: Path, seed: Seed) -> None:
    """Clean accuracy of C0 and the drifted C, and the 8-bit upload accuracy of O0 on both and of the recovered O
    on the drifted C, on `test_subset` (all test images). Inference only; one record."""
    run = RunDir(out)
    run.start(cfg, resume=True)
    if is_done(out):
        return
    dev = pick_device(seed.device)
    bf16 = use_bf16(cfg.precision, dev)
    test = DeviceData(*select(seed.data, cfg.test_subset, split="test"), dev)
    c = {name: frozen(load_classifier(seed.path(name), dev)) for name in ("c0", "drift")}
    t0 = time.perf_counter()
    record: dict[str, Any] = {"images": len(test), **{name: accuracy(m, test, bf16=bf16) for name, m in c.items()}}
    scored = upload_accuracies(c, frozen(load_codec(seed.path("o0"), device=dev)), test, bf16=bf16)
    record.update({f"o0@{k}": v for k, v in scored.items()})
    record["recovery@drift"] = upload_accuracies({"drift": c["drift"]}, frozen(load_codec(seed.path("recovery"), device=dev)),
                                                 test, bf16=bf16)["drift"]
    record["eval_time_s"] = time.perf_counter() - t0
    (out / "metrics.jsonl").unlink(missing_ok=True)
    run.log(record)
    run.finish()


# ---------------------------------------------------------------- the report's section

def numbers(r: Records) -> dict[str, float]:
    """The paper's figures and ratios of one seed: the ends from `scores` (all test images)."""
    s = r["scores"]
    n = {"c0": s["c0"], "o0": s["o0@c0"], "c_final": s["drift"], "o0_final": s["o0@drift"], "recovery": s["recovery@drift"]}
    n["o0_ratio"] = n["o0"] / n["c0"]
    n["drop"] = (n["o0"] - n["o0_final"]) / n["o0"]
    n["recovery_ratio"] = n["recovery"] / n["c_final"]
    return n


def over(seeds: list[Records], value) -> Estimate:
    return estimate(value(r) for r in seeds)


def curve(seeds: list[Records], points) -> list[tuple[float, Estimate]]:
    """A curve over the seeds: `points(records)` -> {x: y} per seed; each x's mean and interval over the seeds that have it."""
    per_seed = [points(r) for r in seeds]
    xs = sorted({x for p in per_seed for x in p})
    return [(x, estimate(p[x] for p in per_seed if x in p)) for x in xs]


def recovery_curve(r: Records) -> dict[int, float]:
    """The recovery's curve, starting (epoch 0) where the drift left O0."""
    drift = r["drift"]
    return {0: drift.o0_curve[drift.epochs], **r["recovery"].curve}


def report(seeds: list[Records]) -> list[str]:
    k = len(seeds)
    per_seed = [numbers(r) for r in seeds]
    e = {key: estimate(n[key] for n in per_seed) for key in per_seed[0]}
    on_paper = seeds[0].dataset == "cifar10"  # the paper's numbers are CIFAR-10's: a column only for CIFAR-10

    def row(*cells: str) -> str:  # cells[1] is the paper's column
        kept = [c for i, c in enumerate(cells) if on_paper or i != 1]
        return "|" + "|".join(c if c == "---" else f" {c} " if c else " " for c in kept) + "|"

    drift_after = "/".join(map(str, sorted({r["drift"].epochs for r in seeds})))
    recovered = "/".join(map(str, sorted({max(r["recovery"].curve) for r in seeds})))
    images = {r["scores"].images for r in seeds}
    pct = lambda key: e[key].text(100)  # noqa: E731
    lines = ["## The paper's protocol", "",
             "Baseline classifier C0 and obfuscator O0, experiment 1 (C keeps training; O0 is measured on the current "
             "C), experiment 2 (O retrains against the final C). Every figure is the mean over "
             f"{k} seed{'s' if k > 1 else ''} ± the half-width of its 95 % t-interval; a ratio is computed per seed, "
             f"then averaged; n = {k} seed{'s' if k > 1 else ''} × {', '.join(f'{i:,}' for i in sorted(images))} test "
             "images (the ends of every ratio; curves on the profile's test subset). Obfuscated accuracy is the cloud "
             "classifier's accuracy on the 8-bit upload, the pixels it receives. Accuracies in %.", "",
             row("figure", "paper (CIFAR-10)", "ours", "note"), row("---", "---", "---", "---"),
             row("C0 test accuracy", f"{100 * PAPER['c0']:.2f}", pct("c0"), ""),
             row("O0 obfuscated accuracy", f"{100 * PAPER['o0']:.2f}", pct("o0"), ""),
             row("C after drift", f"{100 * PAPER['c_final']:.2f}", pct("c_final"), f"after {drift_after} epochs"),
             row("O0 on the drifted C", f"{100 * PAPER['o0_final']:.2f}", pct("o0_final"),
                 f"paper: after 10 epochs of drift; ours: after {drift_after}" if on_paper else f"after {drift_after} epochs"),
             row("O after recovery", f"{100 * PAPER['recovery']:.2f}", pct("recovery"), f"after {recovered} epochs"),
             "", row("ratio", "paper (CIFAR-10)", "ours", "target", "verdict"), row("---", "---", "---", "---", "---")]
    for key, label in (("o0_ratio", "O0 / C0"), ("drop", "relative drop of O0 after the drift"),
                       ("recovery_ratio", "O after recovery / C after drift")):
        lines.append(row(label, f"{PAPER[key]:.2f}", e[key].text(), f"at least {TARGETS[key]:.2f}", verdict(e[key], TARGETS[key])))
    lines += ["", "The co-trained D, on the uploads of the stages' test subsets (it is no privacy figure: O is trained to "
              "beat exactly this D; the attack suite below measures privacy):", "",
              "| obfuscator | co-trained D PSNR dB | SSIM |", "|---|---|---|"]
    for label, stage in (("O0", "o0"), ("O after recovery", "recovery")):
        lines.append(f"| {label} | {over(seeds, lambda r: r[stage].d_psnr_db).text()} | "
                     f"{over(seeds, lambda r: r[stage].d_ssim).text(digits=3)} |")
    return lines


def draw(seeds: list[Records], out: Path, **_) -> list[Path]:
    bars = {"classifier C0": over(seeds, lambda r: r["scores"]["c0"]),
            "obfuscator O0": over(seeds, lambda r: r["scores"]["o0@c0"]),
            "final classifier": over(seeds, lambda r: r["scores"]["drift"]),
            "final obfuscator": over(seeds, lambda r: r["scores"]["recovery@drift"])}
    return [figures.accuracy_bars(bars, out / "fig5_accuracy.png"),
            figures.curves({"classifier (clean)": curve(seeds, lambda r: r["drift"].curve),
                            "baseline obfuscator O0": curve(seeds, lambda r: r["drift"].o0_curve)},
                           out / "fig6_drift.png", xlabel="epochs of further classifier training",
                           title="Experiment 1: obfuscator accuracy while the classifier trains"),
            figures.curves({"obfuscator": curve(seeds, recovery_curve)}, out / "fig7_recovery.png",
                           xlabel="epochs of obfuscator retraining", title="Experiment 2: obfuscator recovery")]


# ---------------------------------------------------------------- the stages

C0 = Stage("c0", "baseline_classifier", ClassifierConfig, lambda s, seed: s, trainer(train_classifier), read_classifier,
           group="paper", main=True)
O0 = Stage("o0", "baseline_obfuscator", ObfuscatorConfig, lambda s, seed: replace(s, classifier=seed.path("c0")),
           trainer(train_obfuscator), read_obfuscator, needs=("c0",), group="paper", main=True)
DRIFT = Stage("drift", "drift", lambda: ClassifierConfig(subset="range:0:45000", flip=True),
              lambda s, seed: replace(s, init=seed.path("c0"), snapshot_every=s.snapshot_every or s.eval_every),
              run_drift, read_drift, needs=("c0", "o0"), group="paper", main=True)
RECOVERY = Stage("recovery", "recovery", lambda: ObfuscatorConfig(subset="range:0:45000", flip=True),
                 lambda s, seed: replace(s, classifier=seed.path("drift"), init=seed.path("o0")),
                 trainer(train_obfuscator), read_obfuscator, needs=("drift", "o0"), group="paper", main=True)
SCORES = Stage("scores", "scores", ScoresConfig, lambda s, seed: s, run_scores, read_scores,
               needs=("c0", "o0", "drift", "recovery"), group="paper", main=True, report=report, figures=draw)
STAGES = [C0, O0, DRIFT, RECOVERY, SCORES]
