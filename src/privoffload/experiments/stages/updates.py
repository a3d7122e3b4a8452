"""Beyond the paper: the cloud's update run several times, and run as a compatible update (docs/drift-robustness.md).

    drift-replicas     the drift again with its own seeds (`[replicas] count` drifts per C0/O0 pair, the drift stage's
                       own the first): how much of O0's drop is the update and how much the draw of one run
    compatible-drift   each of those drifts again, seed for seed, with the compatibility term on O0
                       (train/classifier.py: Compatibility): an update that keeps the obfuscator it published working

Each replica's ends are scored on the scores stage's images: C's clean accuracy, O0's uploads' accuracy on it and
their negative-flip rate (right on C0, wrong now). Replica r of the compatible drift and replica r of the plain one
share the seed (order, flips), so every contrast is paired; seeds are the independent units, replicas are averaged
within a seed. `run_updates` also trains the robust obfuscator's stand-ins (robust.py): runs of one recipe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...config import ClassifierConfig, CompatConfig, DataConfig
from ...config.loader import choice, positive, subset
from ...data import DeviceData, select
from ...metrics import accuracy, upload_accuracies
from ...runs import RunDir, is_done, load_classifier, load_codec
from ...runtime import frozen, pick_device, use_bf16
from ...train.classifier import train_classifier
from ..stage import Log, Records, Seed, Stage, need
from ..stats import estimate, fieller, verdict
from .paper import DRIFT

COMPAT_RATIO, CLEAN_MARGIN = 0.2, 0.01  # targets: O0's drop at most a fifth of plain's; C's clean accuracy within 1 point


@dataclass
class ReplicasConfig:
    """How many times the drift runs per C0/O0 pair (the drift stage's own run is the first)."""

    count: int = 4

    def validate(self) -> None:
        positive("replicas.count", self.count)


@dataclass
class CompatSection:
    """The compatible drift: the drift's recipe and seeds with the compatibility term on O0 (`ClassifierConfig.compat`)."""

    enabled: bool = True
    weight: float = 1.0
    loss: str = "kl"  # kl | focal (the choice, measured on a validation split: docs/drift-robustness.md)

    def validate(self) -> None:
        CompatConfig(weight=self.weight, loss=self.loss).validate()


@dataclass
class UpdatesConfig(DataConfig):
    """Classifier runs of one recipe, run k (in replica-<k>/) seeded `seed + k`; the runs in `scored_too` (earlier
    stages') count as the first replicas and are scored, not trained. With `score_subset`, every replica's ends:
    clean accuracy, O0's uploads' accuracy and their negative flips against C0."""

    recipe: ClassifierConfig = field(default_factory=ClassifierConfig)  # its seed is replaced by seed + k
    seed: int = 0
    count: int = 1  # replicas in all, scored_too included
    scored_too: list[str] = field(default_factory=list)
    probe_o0: bool = True  # O0's upload accuracy at every evaluation of a run (its curve)
    score_subset: str = "all"  # "" = no ends (the stand-ins)
    precision: str = "auto"

    def validate(self) -> None:
        super().validate()
        positive("count", self.count)
        self.recipe.validate()
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        if self.score_subset:
            subset(self.score_subset)


def replica_folders(cfg: UpdatesConfig, out: Path) -> list[Path]:
    """Replica k's run folder: an earlier stage's for the first ones, replica-<k>/ here for the rest."""
    return [Path(p) for p in cfg.scored_too] + [out / f"replica-{k}" for k in range(len(cfg.scored_too), cfg.count)]


def run_updates(cfg: UpdatesConfig, out: Path, seed: Seed) -> None:
    """Train the replicas this stage owns (each resumable), then score every replica's ends in one record."""
    run = RunDir(out)
    run.start(cfg, resume=True)
    if is_done(out):
        return
    folders = replica_folders(cfg, out)
    for k, folder in enumerate(folders[len(cfg.scored_too):], start=len(cfg.scored_too)):
        if not is_done(folder):
            probes = {"O0": load_codec(seed.path("o0"))} if cfg.probe_o0 else None
            train_classifier(replace(cfg.recipe, seed=cfg.seed + k), folder, resume=True, data=seed.data,
                             device=seed.device, probes=probes)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    if cfg.score_subset:
        run.log(score_updates(cfg, folders, seed))
    run.finish()


def score_updates(cfg: UpdatesConfig, folders: list[Path], seed: Seed) -> dict[str, Any]:
    """C0 and every replica on `score_subset`: clean accuracy; O0's uploads' accuracy; their negative flips vs C0."""
    dev = pick_device(seed.device)
    bf16 = use_bf16(cfg.precision, dev)
    test = DeviceData(*select(seed.data, cfg.score_subset, split="test"), dev)
    c0, o0 = frozen(load_classifier(seed.path("c0"), dev)), frozen(load_codec(seed.path("o0"), device=dev))
    t0 = time.perf_counter()
    record: dict[str, Any] = {"images": len(test), "c0": accuracy(c0, test, bf16=bf16), "replicas": []}
    for folder in folders:
        c = frozen(load_classifier(folder, dev))
        scored = upload_accuracies({"c0": c0, "new": c}, o0, test, bf16=bf16, reference="c0")
        record["o0@c0"] = scored["c0"]
        record["replicas"].append({"run": folder.name, "clean": accuracy(c, test, bf16=bf16), "o0": scored["new"],
                                   "o0_negative_flips": scored["new_negative_flips"]})
    record["time_s"] = time.perf_counter() - t0
    return record


# ---------------------------------------------------------------- configs

def drift_recipe(seed: Seed) -> ClassifierConfig:
    """The drift stage's recipe for this seed (C0 linked), its seed left to the replicas; no snapshots (only the
    drift stage's own are probed)."""
    return replace(DRIFT.configure(seed.protocol.drift, seed), seed=0, snapshot_every=0)


def configure_replicas(r: ReplicasConfig, seed: Seed) -> UpdatesConfig:
    p = seed.protocol
    return UpdatesConfig(recipe=drift_recipe(seed), seed=p.drift.seed, count=r.count, scored_too=[seed.path("drift")],
                         score_subset=p.scores.test_subset, precision=p.scores.precision)


def configure_compatible(c: CompatSection, seed: Seed) -> UpdatesConfig | None:
    if not c.enabled:
        return None
    p = seed.protocol
    recipe = replace(drift_recipe(seed), compat=CompatConfig(obfuscators=[seed.path("o0")], weight=c.weight, loss=c.loss))
    return UpdatesConfig(recipe=recipe, seed=p.drift.seed, count=p.replicas.count, score_subset=p.scores.test_subset,
                         precision=p.scores.precision)


# ---------------------------------------------------------------- records and the report

@dataclass(frozen=True)
class UpdatesRecord:
    images: int
    c0: float  # C0's clean accuracy
    o0_c0: float  # O0's uploads on C0
    replicas: list[dict[str, float]]  # per replica: clean, o0, o0_negative_flips

    def mean(self, key: str) -> float:
        return sum(r[key] for r in self.replicas) / len(self.replicas)

    def drops(self) -> list[float]:
        """O0's relative drop from C0 to each replica."""
        return [(self.o0_c0 - r["o0"]) / self.o0_c0 for r in self.replicas]


def read_updates(folder: Path) -> UpdatesRecord:
    r = Log(folder).last("replicas")
    where = f"{folder}/metrics.jsonl"
    replicas = [{k: float(need(x, k, where)) for k in ("clean", "o0", "o0_negative_flips")} for x in r["replicas"]]
    return UpdatesRecord(int(r["images"]), float(r["c0"]), float(need(r, "o0@c0", where)), replicas)


def paired(seeds: list[Records]) -> list[dict[str, float]]:
    """Per seed, replicas averaged: the plain and the compatible drift's ends, O0's drops and negative flips."""
    out = []
    for r in seeds:
        plain, compat = r["drift-replicas"], r["compatible-drift"]
        out.append({"replicas": len(compat.replicas), "o0_c0": plain.o0_c0,
                    **{f"{key}_{name}": u.mean(key) for name, u in (("plain", plain), ("compat", compat))
                       for key in ("clean", "o0", "o0_negative_flips")},
                    "drop_plain": sum(plain.drops()) / len(plain.drops()),
                    "drop_compat": sum(compat.drops()) / len(compat.drops())})
    return out


def spread(seeds: list[Records]) -> tuple[float, float]:
    """The drift's variance, as standard deviations of O0's accuracy on the plain drifts (points): within a seed
    (between replicas, pooled over the seeds) and between seeds (of the per-seed means)."""
    within, means = [], []
    for r in seeds:
        accs = [x["o0"] for x in r["drift-replicas"].replicas]
        m = sum(accs) / len(accs)
        means.append(m)
        within += [(a - m) ** 2 for a in accs]
    dof = sum(len(r["drift-replicas"].replicas) - 1 for r in seeds)
    w = math.sqrt(sum(within) / dof) if dof else math.nan
    b = estimate(means)
    between = math.sqrt(sum((m - b.mean) ** 2 for m in means) / (len(means) - 1)) if len(means) > 1 else math.nan
    return w, between


def points(sd: float) -> str:
    return "–" if math.isnan(sd) else f"{100 * sd:.2f}"


def report(seeds: list[Records]) -> list[str]:
    rows = paired(seeds)
    k = len(seeds)
    images = seeds[0]["compatible-drift"].images
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = ["## Beyond the paper: a compatible update (the cloud keeps its obfuscators working)", "",
             "The drift run again with the compatibility term on O0 (its uploads' answers kept close to C0's, "
             "KL or focal distillation: train/classifier.py), seed for seed beside the plain drift; each drift is run "
             f"{rows[0]['replicas']} times per seed with its own seeds (replicas, averaged within a seed; seeds are the "
             f"independent units). Ends on {images:,} test images; accuracies in %; NFR = negative-flip rate of O0's "
             "uploads (right on C0, wrong on the updated C). Both drifts train for the drift's fixed epochs (an update "
             "is a training job of its own, not trained to convergence).", "",
             "| seed | replicas | C clean: plain | compatible | O0 on C0 | O0: plain | compatible | drop: plain | "
             "compatible | NFR: plain | compatible |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, n in zip(seeds, rows):
        lines.append(f"| {r.name} | {n['replicas']} | {pct(n['clean_plain'])} | {pct(n['clean_compat'])} | "
                     f"{pct(n['o0_c0'])} | {pct(n['o0_plain'])} | {pct(n['o0_compat'])} | {n['drop_plain']:.3f} | "
                     f"{n['drop_compat']:.3f} | {pct(n['o0_negative_flips_plain'])} | {pct(n['o0_negative_flips_compat'])} |")
    e = lambda key, scale=100.0: estimate(n[key] for n in rows).text(scale)  # noqa: E731
    lines.append(f"| mean ± 95 % CI (n = {k}) | | {e('clean_plain')} | {e('clean_compat')} | {e('o0_c0')} | "
                 f"{e('o0_plain')} | {e('o0_compat')} | {e('drop_plain', 1)} | {e('drop_compat', 1)} | "
                 f"{e('o0_negative_flips_plain')} | {e('o0_negative_flips_compat')} |")
    ratio = fieller([n["drop_compat"] for n in rows], [n["drop_plain"] for n in rows])
    clean = estimate(n["clean_compat"] - n["clean_plain"] for n in rows)
    within, between = spread(seeds)
    lines += ["", f"- O0's drop under the compatible drift / under the plain drift (ratio of the mean drops, Fieller "
              f"95 % interval, n = {ratio.n}): {ratio.text()} (target at most {COMPAT_RATIO}: "
              f"{verdict(ratio, COMPAT_RATIO, at_least=False)}).",
              f"- C's clean accuracy, compatible minus plain (paired, n = {clean.n}): {clean.text(100)} points "
              f"(non-inferiority margin {100 * CLEAN_MARGIN:.0f} point: {verdict(clean, -CLEAN_MARGIN)}).",
              f"- The drift's own spread: O0's accuracy after a plain drift varies by {points(within)} points (SD) "
              f"between replicas of one seed and by {points(between)} points between the seeds' means."]
    return lines


REPLICAS = Stage("drift-replicas", "replicas", ReplicasConfig, configure_replicas, run_updates, read_updates,
                 needs=("c0", "o0", "drift"))
COMPATIBLE = Stage("compatible-drift", "compat", CompatSection, configure_compatible, run_updates, read_updates,
                   needs=("c0", "o0", "drift-replicas"), report=report)
STAGES = [REPLICAS, COMPATIBLE]
