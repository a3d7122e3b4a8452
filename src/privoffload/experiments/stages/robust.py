"""Beyond the paper: an obfuscator that survives the cloud's next update (docs/drift-robustness.md).

    stand-ins      independent runs of the update's own recipe (the drift's schedule, flips and rate, from C0) on
                   images the drift never sees: what the client expects the next classifier to look like
    robust         O0 and D0 trained further against C0 and the stand-ins, on half-mirrored uploads
    control        the compute-matched control: O0 and D0 given the same steps against C0 alone
    robust-drift   O0, the robust O and the control (and their snapshots) measured on the very classifiers of
                   experiment 1: C0 and the drift's snapshots (curves), C0 and every replica of the drift on all test
                   images (ends)
    attack-o0, attack-robust   the same fresh attacker against O0 and against the robust O: is their privacy the same?

The robust O is judged on what the user gets: its absolute accuracy after the drift against O0's, with a
non-inferiority check on C0 (it must not give up more than NONINFERIORITY_MARGIN there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...config import AttackConfig, DataConfig
from ...config.loader import choice, subset
from ...data import DeviceData, select
from ...errors import UserError
from ...metrics import upload_accuracies
from ...privacy.attack import train_attack
from ...runs import RunDir, is_done, load_classifier, load_codec
from ...runtime import frozen, pick_device, use_bf16
from ...train.obfuscator import train_obfuscator
from .. import figures
from ..stage import Log, Records, Seed, Stage
from ..stats import estimate, fieller, verdict
from .paper import O0, curve, trainer
from .updates import REPLICAS, UpdatesConfig, drift_recipe, replica_folders, run_updates

# the targets: the robust O ends at or above O0 after the drift, giving up at most 2 points on C0; privacy within 0.5 dB
NONINFERIORITY_MARGIN, PRIVACY_GAP_DB = 0.02, 0.5


@dataclass
class RobustConfig:
    """The drift-robust obfuscator: O0 trained on against C0 and stand-ins for the cloud's next update (independent
    runs of the drift's recipe from C0 on the client's own images), beside a compute-matched control."""

    stand_ins: int = 3  # independent runs of the update's recipe; 0 turns the robust stages off
    stand_in_subset: str = "range:45000:50000"  # the client's images: never the drift's
    stand_in_epochs: int = 0  # 0 = the drift's epochs; more gives a stand-in as many steps as the update takes
    seed: int = 100  # stand-in k is seeded seed + k (the drift's replicas take the drift's seed + r)
    weight: float = -1.0  # ensemble_weight, each stand-in's, C0's being 1; < 0 = 1 / stand_ins (C0 counts as much as
    # all the stand-ins together)
    per_step: int = 1  # ensemble_per_step: stand-ins drawn per step (0 = all)
    flip_consistency: bool = True  # C0 and the stand-ins also read mirrored uploads: the update trains with flips
    fine_tune: bool = True  # start from O0 and D0 (cheap); false: from scratch, like O0
    epochs: int = 0  # 0 = the baseline obfuscator's epochs
    lam: float = -1.0  # the robust obfuscator's lambda; < 0 = the baseline obfuscator's
    control: bool = True  # also train the control: O0 given the same steps against C0 alone
    attack: AttackConfig = field(default_factory=AttackConfig)  # the same fresh attack on O0 and on the robust O

    def validate(self) -> None:
        subset(self.stand_in_subset)
        if self.stand_ins < 0 or self.stand_in_epochs < 0:
            raise UserError("config: robust.stand_ins and robust.stand_in_epochs must be >= 0")


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

def configure_stand_ins(r: RobustConfig, seed: Seed) -> UpdatesConfig | None:
    if not r.stand_ins:
        return None
    drift = seed.protocol.drift  # the client's stand-ins must not have seen the update's own data
    if overlap(r.stand_in_subset, drift.subset):
        raise UserError(f"stage stand-ins trains on {r.stand_in_subset}, images the drift ({drift.subset}) trains on too; "
                        "give the stand-ins images the cloud's update never sees")
    recipe = replace(drift_recipe(seed), subset=r.stand_in_subset, epochs=r.stand_in_epochs or drift.epochs,
                     snapshot_every=0, eval_every=r.stand_in_epochs or drift.epochs)
    return UpdatesConfig(recipe=recipe, seed=r.seed, count=r.stand_ins, probe_o0=False, score_subset="")


def stand_in_folders(seed: Seed) -> list[Path]:
    cfg = configure_stand_ins(seed.protocol.robust, seed)
    return replica_folders(cfg, Path(seed.path("stand-ins"))) if cfg else []


def configure_robust(r: RobustConfig, seed: Seed):
    if not r.stand_ins:
        return None
    o0 = O0.configure(seed.protocol.baseline_obfuscator, seed)
    return replace(o0, ensemble=[str(p) for p in stand_in_folders(seed)], ensemble_per_step=r.per_step,
                   ensemble_weight=r.weight if r.weight >= 0 else 1 / r.stand_ins, flip_consistency=r.flip_consistency,
                   lam=o0.lam if r.lam < 0 else r.lam, init=seed.path("o0") if r.fine_tune else "",
                   epochs=r.epochs or o0.epochs, snapshot_every=1)


def configure_control(r: RobustConfig, seed: Seed):
    robust = configure_robust(r, seed)
    return replace(robust, ensemble=[], ensemble_per_step=0, flip_consistency=False) if robust and r.control else None


def configure_probes(r: RobustConfig, seed: Seed) -> ProbesConfig | None:
    p = seed.protocol
    return ProbesConfig(test_subset=p.drift.test_subset, score_subset=p.scores.test_subset,
                        precision=p.scores.precision) if r.stand_ins else None


def configure_attack(target: str):
    return lambda r, seed: replace(r.attack, obfuscator=seed.path(target)) if r.stand_ins else None


# ---------------------------------------------------------------- the probes

def run_probes(cfg: ProbesConfig, out: Path, seed: Seed) -> None:
    """Upload accuracy of O0, the robust O, the control and their epoch snapshots on C0 and each drift snapshot (on
    `test_subset`: the drift's curve), and of the three on C0 and on every replica of the drift on `score_subset`
    (the ends)."""
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
    replicas = replica_folders(REPLICAS.configure(seed.protocol.replicas, seed), Path(seed.path(REPLICAS.name)))
    ends = {"c0": classifiers[0], **{f.name: frozen(load_classifier(f, dev)) for f in replicas}}
    record: dict[str, Any] = {"images": len(scored), "curves": curves, "replicas": [f.name for f in replicas], "ends": {}}
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
    replicas: list[str]  # the plain drifts the ends were scored on: drift, replica-1, ...
    ends: dict[str, float]  # O0@c0, O0@drift, O0@replica-1, robust@c0, ... on all test images

    def after(self, probe: str) -> float:
        """The probe's accuracy after the drift: the mean over the drift's replicas."""
        return sum(self.ends[f"{probe}@{r}"] for r in self.replicas) / len(self.replicas)


def read_probes(folder: Path) -> ProbesRecord:
    r = Log(folder).last("ends")
    if "replicas" not in r:
        raise Log(folder).missing("'replicas'")
    return ProbesRecord(int(r["images"]), {k: {int(e): float(a) for e, a in v.items()} for k, v in r["curves"].items()},
                        list(r["replicas"]), {k: float(v) for k, v in r["ends"].items()})


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


def numbers(r: Records) -> dict[str, Any]:
    """One seed: each obfuscator on C0 and after the drift (mean over its replicas; all test images), its relative drop
    there, and its mean and worst drop along the drift's curve (test subset)."""
    p = r["robust-drift"]
    n: dict[str, Any] = {"replicas": len(p.replicas)}
    for name, probe in (("plain", "O0"), ("robust", "robust"), ("control", "control")):
        if probe not in p.curves:
            continue
        c = [p.curves[probe][e] for e in sorted(p.curves[probe])]
        n[f"{name}_start"], n[f"{name}_end"] = p.ends[f"{probe}@c0"], p.after(probe)
        n[f"{name}_drop"] = (n[f"{name}_start"] - n[f"{name}_end"]) / n[f"{name}_start"]
        d = drop(c[0], c[1:] or c)
        n[f"{name}_mean_drop"], n[f"{name}_worst_drop"] = d["mean_drop"], d["worst_drop"]
    if "attack-o0" in r and "attack-robust" in r:
        n["privacy_gap_db"] = abs(r["attack-robust"].psnr_db - r["attack-o0"].psnr_db)
    cost: dict[str, dict[int, float]] = {}  # after each extra epoch: the snapshot minus O0 at the drift's end (test subset)
    end = max(p.curves["O0"])
    for name in ("robust", "control"):
        epochs = {int(k.rsplit("-", 1)[1]): k for k in p.curves if k.startswith(f"{name}@epoch-")}
        if name in p.curves:
            epochs[len(epochs) + 1] = name  # the last snapshot is the obfuscator itself
        cost[name] = {e: p.curves[k][end] - p.curves["O0"][end] for e, k in epochs.items()}
    n["cost"] = cost
    return n


def report(seeds: list[Records]) -> list[str]:
    per_seed = [numbers(r) for r in seeds]
    k = len(seeds)
    e = lambda key: estimate(n.get(key, float("nan")) for n in per_seed)  # noqa: E731
    pct = lambda key: e(key).text(100)  # noqa: E731
    images = seeds[0]["robust-drift"].images
    replicas = "/".join(map(str, sorted({n["replicas"] for n in per_seed})))
    lines = ["## Beyond the paper: a drift-robust obfuscator (experiment 1)", "",
             "The obfuscators measured on the same classifiers: C0, then every evaluation of experiment 1's drift; "
             f"\"after the drift\" is the mean over the drift's {replicas} replicas (the drift run with its own seeds), "
             f"both ends on {images:,} test images. Relative drop = (accuracy on C0 - accuracy after) / accuracy on C0; "
             "mean and worst drop: along the drift's evaluations (test subset). The stand-ins are independent runs of "
             "the update's own recipe on images it never sees. The control is O0 trained for as many more steps as the "
             "robust O, against C0 alone: what the extra training does without the stand-ins. Accuracies in %.", "",
             "| obfuscator | n | on C0 | after the drift | drop after | mean drop | worst drop | fresh-attacker PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    for label, name, attack in (("O0 (plain)", "plain", "attack-o0"), ("control (O0 + the same steps, C0 only)", "control", None),
                                ("robust (C0 + stand-ins, mirrored uploads)", "robust", "attack-robust")):
        if not all(f"{name}_drop" in n for n in per_seed):
            continue
        psnr = estimate(r[attack].psnr_db for r in seeds if attack in r).text() if attack else "–"
        lines.append(f"| {label} | {k} | {pct(f'{name}_start')} | {pct(f'{name}_end')} | {e(f'{name}_drop').text()} | "
                     f"{e(f'{name}_mean_drop').text()} | {e(f'{name}_worst_drop').text()} | {psnr} |")
    if not all("robust_end" in n for n in per_seed):
        return lines
    after = estimate(n["robust_end"] - n["plain_end"] for n in per_seed)
    on_c0 = estimate(n["robust_start"] - n["plain_start"] for n in per_seed)
    ratio = fieller([n["robust_drop"] for n in per_seed], [n["plain_drop"] for n in per_seed])
    lines += ["", f"- After the drift, robust minus O0 (paired, n = {after.n}): {after.text(100)} points (target: at or "
              f"above O0, {verdict(after, 0.0)}).",
              f"- On C0, robust minus O0 (n = {on_c0.n}): {on_c0.text(100)} points (non-inferiority: it may give up at "
              f"most {100 * NONINFERIORITY_MARGIN:.0f} points there, {verdict(on_c0, -NONINFERIORITY_MARGIN)}).",
              f"- Robust drop / O0's drop (ratio of the mean drops, Fieller 95 % interval, n = {ratio.n}): {ratio.text()} "
              "(for reference: a drop ratio rewards an obfuscator that starts lower)."]
    if all("control_end" in n for n in per_seed):
        diff = estimate(n["robust_end"] - n["control_end"] for n in per_seed)
        lines.append(f"- Robust minus control after the drift (n = {diff.n}): {diff.text(100)} points (above 0: the "
                     "stand-ins, not the extra steps, made the difference).")
    if all("privacy_gap_db" in n for n in per_seed):
        gap = e("privacy_gap_db")
        lines.append(f"- Privacy: fresh-attacker PSNR gap between the two (n = {gap.n}), {gap.text()} dB (target at most "
                     f"{PRIVACY_GAP_DB} dB: {verdict(gap, PRIVACY_GAP_DB, at_least=False)}).")
    cost = curve(seeds, lambda r: numbers(r)["cost"]["robust"])
    if cost:
        points = ", ".join(f"{x} epoch{'s' if x > 1 else ''}: {est.text(100)}" for x, est in cost)
        lines.append(f"- Robust minus O0 at the drift's end against the robust O's extra epochs (fig9_robust_cost.png, "
                     f"test subset, points): {points}.")
    return lines


def draw(seeds: list[Records], out: Path, **_) -> list[Path]:
    lines = {label: curve(seeds, lambda r, name=name: numbers(r)["cost"][name])
             for label, name in (("robust O", "robust"), ("control", "control"))}
    paths = [figures.curves({label: points for label, points in lines.items() if points}, out / "fig9_robust_cost.png",
                            xlabel="epochs of extra obfuscator training (the cost)", ylim=None, target=0.0,
                            ylabel="minus O0 after the drift (points)",
                            title="The robust obfuscator against O0 after the drift, by its extra training")]
    paths.append(figures.curves({label: curve(seeds, lambda r, p=probe: r["robust-drift"].curves.get(p, {}))
                                 for label, probe in (("baseline obfuscator O0", "O0"), ("robust obfuscator (C0 + stand-ins)", "robust"),
                                                      ("control", "control"))},
                                out / "fig11_robust_drift.png", xlabel="epochs of further classifier training",
                                title="Experiment 1 with the drift-robust obfuscator"))
    return paths


STAND_INS = Stage("stand-ins", "robust", RobustConfig, configure_stand_ins, run_updates, lambda f: Log(f).records,
                  needs=("c0",))
ROBUST = Stage("robust", "robust", RobustConfig, configure_robust, trainer(train_obfuscator), lambda f: Log(f).records,
               needs=("o0", "stand-ins"))
CONTROL = Stage("control", "robust", RobustConfig, configure_control, trainer(train_obfuscator), lambda f: Log(f).records,
                needs=("o0",))
ATTACK_O0 = Stage("attack-o0", "robust", RobustConfig, configure_attack("o0"), trainer(train_attack), read_attack,
                  needs=("o0",))
ATTACK_ROBUST = Stage("attack-robust", "robust", RobustConfig, configure_attack("robust"), trainer(train_attack),
                      read_attack, needs=("robust",))
ROBUST_DRIFT = Stage("robust-drift", "robust", RobustConfig, configure_probes, run_probes, read_probes,
                     needs=("drift", "drift-replicas", "robust", "control"), report=report, figures=draw)
STAGES = [STAND_INS, ROBUST, CONTROL, ATTACK_O0, ATTACK_ROBUST, ROBUST_DRIFT]
