"""Beyond the paper: an obfuscator that survives the cloud's next update (docs/drift-robustness.md).

    trajectory     C0 fine-tuned on images the drift never sees, a snapshot every epoch: stand-ins for the update
    robust         O0 and D0 trained further against C0 and the stand-ins, on half-mirrored uploads
    control        the compute-matched control: O0 and D0 given the same steps against C0 alone
    robust-drift   O0, the robust O and the control (and their snapshots) measured on the very classifiers of
                   experiment 1: C0 and the drift's snapshots (curves), C0 and the final C on all test images (ends)
    attack-o0, attack-robust   the same fresh attacker against O0 and against the robust O: is their privacy the same?
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...config import AttackConfig, ClassifierConfig, DataConfig, OptimConfig
from ...config.loader import choice, subset
from ...data import DeviceData, select
from ...errors import UserError
from ...metrics import upload_accuracies
from ...privacy.attack import train_attack
from ...runs import RunDir, is_done, load_classifier, load_codec
from ...runtime import frozen, pick_device, use_bf16
from ...train.classifier import train_classifier
from ...train.obfuscator import train_obfuscator
from .. import figures
from ..stage import Log, Records, Seed, Stage
from ..stats import estimate, verdict
from .paper import O0, curve, trainer

ROBUST_RATIO, PRIVACY_GAP_DB = 1 / 3, 0.5  # the targets: robust drop at most a third of O0's; privacy within 0.5 dB


@dataclass
class RobustConfig:
    """The drift-robust obfuscator: O0 trained on against C0 and stand-ins for the cloud's next update, snapshots
    along one fine-tune of C0 on the client's own images; beside a compute-matched control."""

    # the stand-ins: C0 fine-tuned with flips at a high constant rate on images the drift never sees, a snapshot
    # every epoch (its width is always C0's); epochs = 0 turns the robust stages off
    trajectory: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(
        epochs=4, subset="range:45000:50000", flip=True, eval_every=1, snapshot_every=1,
        optim=OptimConfig(lr=0.05, schedule="constant", warmup_epochs=0.0)))
    weight: float = 1.0  # ensemble_weight: the stand-ins' weight in O's classification loss, C0's being 1
    per_step: int = 1  # ensemble_per_step: stand-ins drawn per step (0 = all)
    flip_consistency: bool = True  # C0 and the stand-ins also read mirrored uploads: the update trains with flips
    fine_tune: bool = True  # start from O0 and D0 (cheap); false: from scratch, like O0
    epochs: int = 0  # 0 = the baseline obfuscator's epochs
    lam: float = -1.0  # the robust obfuscator's lambda; < 0 = the baseline obfuscator's
    control: bool = True  # also train the control: O0 given the same steps against C0 alone
    attack: AttackConfig = field(default_factory=AttackConfig)  # the same fresh attack on O0 and on the robust O


@dataclass
class ProbesConfig(DataConfig):
    """The obfuscators measured on experiment 1's classifiers (made from the protocol's drift and scores sections)."""

    test_subset: str = "random:1000"  # the curves: the drift's own evaluation images
    score_subset: str = "all"  # the ends: the scores stage's images
    precision: str = "auto"

    def validate(self) -> None:
        super().validate()
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.test_subset)
        subset(self.score_subset)


def overlap(a: str, b: str, n: int = 50_000) -> bool:
    """Do two training subsets share an image? (random:N subsets are drawn with a stage's seed: counted as overlapping)"""
    from ...data import subset_indices

    if "random" in (a.split(":")[0], b.split(":")[0]):
        return True
    return bool(set(subset_indices(a, n)) & set(subset_indices(b, n)))


# ---------------------------------------------------------------- configs

def configure_trajectory(r: RobustConfig, seed: Seed) -> ClassifierConfig | None:
    if not r.trajectory.epochs:
        return None
    drift = seed.protocol.drift.subset  # the client's stand-ins must not have seen the update's own data
    if overlap(r.trajectory.subset, drift):
        raise UserError(f"stage trajectory trains on {r.trajectory.subset}, images the drift ({drift}) trains on too; "
                        "give the stand-ins images the cloud's update never sees")
    return replace(r.trajectory, init=seed.path("c0"), width=seed.protocol.baseline_classifier.width)


def configure_robust(r: RobustConfig, seed: Seed):
    if not r.trajectory.epochs:
        return None
    o0 = O0.configure(seed.protocol.baseline_obfuscator, seed)
    every = r.trajectory.snapshot_every or r.trajectory.epochs
    stand_ins = [str(Path(seed.path("trajectory")) / f"epoch-{e}") for e in range(every, r.trajectory.epochs + 1, every)]
    return replace(o0, ensemble=stand_ins, ensemble_weight=r.weight, ensemble_per_step=r.per_step,
                   flip_consistency=r.flip_consistency, lam=o0.lam if r.lam < 0 else r.lam,
                   init=seed.path("o0") if r.fine_tune else "", epochs=r.epochs or o0.epochs, snapshot_every=1)


def configure_control(r: RobustConfig, seed: Seed):
    robust = configure_robust(r, seed)
    return replace(robust, ensemble=[], ensemble_per_step=0, flip_consistency=False) if robust and r.control else None


def configure_probes(r: RobustConfig, seed: Seed) -> ProbesConfig | None:
    p = seed.protocol
    return ProbesConfig(test_subset=p.drift.test_subset, score_subset=p.scores.test_subset,
                        precision=p.scores.precision) if r.trajectory.epochs else None


def configure_attack(target: str):
    return lambda r, seed: replace(r.attack, obfuscator=seed.path(target)) if r.trajectory.epochs else None


# ---------------------------------------------------------------- the probes

def run_probes(cfg: ProbesConfig, out: Path, seed: Seed) -> None:
    """Upload accuracy of O0, the robust O, the control and their epoch snapshots on C0 and each drift snapshot (on
    `test_subset`: the drift's curve), and of the three on C0 and the final C on `score_subset` (the ends)."""
    run = RunDir(out)
    run.start(cfg, resume=True)
    if is_done(out):
        return
    dev = pick_device(seed.device)
    bf16 = use_bf16(cfg.precision, dev)
    drift = Path(seed.path("drift"))
    snapshots = sorted(drift.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    if not snapshots:
        raise UserError(f"{drift} has no epoch snapshots; delete it and run `privoffload reproduce` again")
    classifiers = {0: frozen(load_classifier(seed.path("c0"), dev)),
                   **{int(p.name.split("-")[1]): frozen(load_classifier(p, dev)) for p in snapshots}}
    probes = {"O0": Path(seed.path("o0"))}
    for name in ("robust", "control"):
        folder = Path(seed.path(name))
        if (folder / "obfuscator.safetensors").exists():
            probes[name] = folder
            last = max((int(e.name.split("-")[1]) for e in folder.glob("epoch-*")), default=0)
            probes.update({f"{name}@{e.name}": e for e in sorted(folder.glob("epoch-*")) if e.name != f"epoch-{last}"})
    t0 = time.perf_counter()
    test = DeviceData(*select(seed.data, cfg.test_subset, split="test"), dev)
    curves = {name: {str(k): v for k, v in upload_accuracies({str(e): c for e, c in classifiers.items()},
                                                             frozen(load_codec(f, device=dev)), test, bf16=bf16).items()}
              for name, f in probes.items()}
    scored = DeviceData(*select(seed.data, cfg.score_subset, split="test"), dev)
    ends = {"c0": classifiers[0], "drift": frozen(load_classifier(drift, dev))}
    record: dict[str, Any] = {"images": len(scored), "curves": curves, "ends": {}}
    for name in ("O0", "robust", "control"):
        if name in probes:
            accs = upload_accuracies(ends, frozen(load_codec(probes[name], device=dev)), scored, bf16=bf16)
            record["ends"].update({f"{name}@{k}": v for k, v in accs.items()})
    record["time_s"] = time.perf_counter() - t0
    (out / "metrics.jsonl").unlink(missing_ok=True)
    run.log(record)
    run.finish()


@dataclass(frozen=True)
class ProbesRecord:
    images: int
    curves: dict[str, dict[int, float]]  # obfuscator (O0, robust, control, robust@epoch-1, ...) -> epoch of the drift -> accuracy
    ends: dict[str, float]  # O0@c0, O0@drift, robust@c0, ... on all test images


def read_probes(folder: Path) -> ProbesRecord:
    r = Log(folder).last("ends")
    return ProbesRecord(int(r["images"]), {k: {int(e): float(a) for e, a in v.items()} for k, v in r["curves"].items()},
                        {k: float(v) for k, v in r["ends"].items()})


@dataclass(frozen=True)
class AttackRecord:
    psnr_db: float
    ssim: float


def read_attack(folder: Path) -> AttackRecord:
    r = Log(folder).last("attacker_psnr_db")
    return AttackRecord(float(r["attacker_psnr_db"]), float(r["attacker_ssim"]))


# ---------------------------------------------------------------- the report

def drop(start: float, later: list[float]) -> dict[str, float]:
    """Relative drops of an obfuscator's accuracy from `start` (on C0): after the drift (the last of `later`),
    on average over the drift's evaluations (less noisy than one point), and at its worst."""
    rel = (lambda a: (start - a) / start) if start else (lambda a: float("nan"))
    return {"drop": rel(later[-1]), "mean_drop": rel(sum(later) / len(later)), "worst_drop": rel(min(later))}


def ratio(num: float, den: float) -> float:
    """num / den, or nan where the denominator is not positive (the report counts those seeds)."""
    return num / den if den > 0 else float("nan")


def numbers(r: Records) -> dict[str, Any]:
    p = r["robust-drift"]
    n: dict[str, Any] = {}
    for name, probe in (("plain", "O0"), ("robust", "robust"), ("control", "control")):
        if probe not in p.curves:
            continue
        c = [p.curves[probe][e] for e in sorted(p.curves[probe])]
        n[f"{name}_start"], n[f"{name}_end"] = p.ends[f"{probe}@c0"], p.ends[f"{probe}@drift"]
        n[f"{name}_drop"] = (n[f"{name}_start"] - n[f"{name}_end"]) / n[f"{name}_start"]
        d = drop(c[0], c[1:] or c)  # mean and worst: along the curve (test subset)
        n[f"{name}_mean_drop"], n[f"{name}_worst_drop"], n[f"{name}_curve_drop"] = d["mean_drop"], d["worst_drop"], d["drop"]
    for name in ("robust", "control"):
        for key in ("drop", "mean_drop", "worst_drop"):
            if f"{name}_{key}" in n:
                n[f"{name}_{key}_ratio"] = ratio(n[f"{name}_{key}"], n[f"plain_{key}"])
    if "attack-o0" in r and "attack-robust" in r:
        n["privacy_gap_db"] = abs(r["attack-robust"].psnr_db - r["attack-o0"].psnr_db)
    cost: dict[str, dict[int, float]] = {}  # drop ratio (test subset) of the robust O and its control after each epoch
    for name in ("robust", "control"):
        epochs = {int(k.rsplit("-", 1)[1]): k for k in p.curves if k.startswith(f"{name}@epoch-")}
        if name in p.curves:
            epochs[len(epochs) + 1] = name  # the last snapshot is the obfuscator itself
        cost[name] = {e: ratio(drop(p.curves[k][0], [p.curves[k][x] for x in sorted(p.curves[k])][1:])["drop"],
                               n["plain_curve_drop"]) for e, k in epochs.items()}
    n["cost"] = cost
    return n


def report(seeds: list[Records]) -> list[str]:
    per_seed = [numbers(r) for r in seeds]
    k = len(seeds)
    e = lambda key: estimate(n.get(key, math.nan) for n in per_seed)  # noqa: E731
    pct = lambda key: e(key).text(100)  # noqa: E731
    images = seeds[0]["robust-drift"].images
    lines = ["## Beyond the paper: a drift-robust obfuscator (experiment 1)", "",
             "The obfuscators measured on the same classifiers: C0, then every evaluation of experiment 1's drift. "
             "Relative drop = (accuracy on C0 - accuracy during the drift) / accuracy on C0: after the drift "
             f"(both ends on {images:,} test images), averaged over its evaluations and at its lowest point (on the "
             "test subset). The control is O0 trained for as many more steps as the robust O, against C0 alone: "
             f"what the extra training does without the stand-ins. n = {k} seed{'s' if k > 1 else ''}.", "",
             "| obfuscator | on C0 | after drift | drop after | mean drop | worst drop | fresh-attacker PSNR dB |",
             "|---|---|---|---|---|---|---|"]
    for label, name, attack in (("O0 (plain)", "plain", "attack-o0"), ("control (O0 + the same steps, C0 only)", "control", None),
                                ("robust (C0 + stand-ins, mirrored uploads)", "robust", "attack-robust")):
        if not all(f"{name}_drop" in n for n in per_seed):
            continue
        psnr = estimate(r[attack].psnr_db for r in seeds if attack in r).text() if attack else "–"
        lines.append(f"| {label} | {pct(f'{name}_start')} | {pct(f'{name}_end')} | {pct(f'{name}_drop')} | "
                     f"{pct(f'{name}_mean_drop')} | {pct(f'{name}_worst_drop')} | {psnr} |")

    def judged(key: str, target: float) -> str:
        est = e(key)
        skipped = sum(1 for n in per_seed if not math.isfinite(n.get(key, math.nan)))
        if est.n == 0:
            return "– (no seed has a value: O0 did not drop)"
        note = f"; {skipped} seed{'s' if skipped > 1 else ''} without a value (O0 did not drop)" if skipped else ""
        return f"{est.text()} ({verdict(est, target, at_least=False)}{note})"

    lines += ["", f"- Robust drop / plain drop (target at most {ROBUST_RATIO:.2f}): after the drift "
              f"{judged('robust_drop_ratio', ROBUST_RATIO)}, mean over the drift {judged('robust_mean_drop_ratio', ROBUST_RATIO)}, "
              f"worst {judged('robust_worst_drop_ratio', ROBUST_RATIO)}."]
    if all("control_drop_ratio" in n for n in per_seed):
        diff = estimate(n["robust_drop_ratio"] - n["control_drop_ratio"] for n in per_seed)
        lines.append(f"- Control drop / plain drop: after the drift {e('control_drop_ratio').text()}; robust minus control: "
                     f"{diff.text()} (below 0: the stand-ins, not the extra steps, made the difference).")
    if all("privacy_gap_db" in n for n in per_seed):
        gap = e("privacy_gap_db")
        lines.append(f"- Privacy: fresh-attacker PSNR gap between the two, {gap.text()} dB (target at most "
                     f"{PRIVACY_GAP_DB} dB: {verdict(gap, PRIVACY_GAP_DB, at_least=False)}).")
    cost = curve(seeds, lambda r: numbers(r)["cost"]["robust"])
    if cost:
        points = ", ".join(f"{x} epoch{'s' if x > 1 else ''}: {est.text()}" for x, est in cost)
        lines.append(f"- Drop ratio against the robust O's extra epochs (fig9_robust_cost.png, test subset): {points}.")
    return lines


def draw(seeds: list[Records], out: Path, **_) -> list[Path]:
    lines = {name: curve(seeds, lambda r, name=name: numbers(r)["cost"][name]) for name in ("robust", "control")}
    paths = [figures.cost_curve({label: lines[name] for label, name in (("robust O", "robust"), ("control", "control"))
                                 if lines[name]}, ROBUST_RATIO, out / "fig9_robust_cost.png")]
    paths.append(figures.curves({label: curve(seeds, lambda r, p=probe: r["robust-drift"].curves.get(p, {}))
                                 for label, probe in (("baseline obfuscator O0", "O0"), ("robust obfuscator (C0 + stand-ins)", "robust"),
                                                      ("control", "control"))},
                                out / "fig11_robust_drift.png", xlabel="epochs of further classifier training",
                                title="Experiment 1 with the drift-robust obfuscator"))
    return paths


TRAJECTORY = Stage("trajectory", "robust", RobustConfig, configure_trajectory, trainer(train_classifier), lambda f: Log(f).records,
                   needs=("c0",))
ROBUST = Stage("robust", "robust", RobustConfig, configure_robust, trainer(train_obfuscator), lambda f: Log(f).records,
               needs=("o0", "trajectory"))
CONTROL = Stage("control", "robust", RobustConfig, configure_control, trainer(train_obfuscator), lambda f: Log(f).records,
                needs=("o0",))
ATTACK_O0 = Stage("attack-o0", "robust", RobustConfig, configure_attack("o0"), trainer(train_attack), read_attack,
                  needs=("o0",))
ATTACK_ROBUST = Stage("attack-robust", "robust", RobustConfig, configure_attack("robust"), trainer(train_attack),
                      read_attack, needs=("robust",))
ROBUST_DRIFT = Stage("robust-drift", "robust", RobustConfig, configure_probes, run_probes, read_probes,
                     needs=("drift", "robust", "control"), report=report, figures=draw)
STAGES = [TRAJECTORY, ROBUST, CONTROL, ATTACK_O0, ATTACK_ROBUST, ROBUST_DRIFT]
