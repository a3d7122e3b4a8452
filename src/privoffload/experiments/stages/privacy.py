"""Privacy measured by attacks: the attack suite (privacy/suite.py) on the final obfuscator and on O0.

    privacy      the suite on the final O (after recovery): part of the main job, it answers the paper's privacy question
    privacy-o0   the suite on O0
    identify     (where the profile asks) a fresh classifier trained on the suite decoder's reconstructions of the
                 final O's uploads: does the class (ORL: who it is) survive the reconstruction?

Each suite's record is its suite.json; the report aggregates each over the seeds (experiments/privacy_table.py),
and Fig. 4 shows seed 0's final O with a row per attack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ...config import IdentifyConfig, SuiteConfig
from ...privacy.identify import train_identify
from ...privacy.samples import sample_rows
from ...privacy.suite import run_suite
from .. import figures
from ..privacy_table import suite_table
from ..stage import Log, Records, Stage, read_json
from ..stats import estimate
from .paper import trainer


def read_suite(folder: Path) -> dict:
    return read_json(folder / "suite.json")


def suite_report(stage: str, label: str):
    def report(seeds: list[Records]) -> list[str]:
        return ([f"## Attack suite on {label}", ""] + suite_table({r.name: r[stage] for r in seeds}) +
                ["", "Attacks and references: docs/threat-model.md. The attacks' numbers are lower bounds on what an "
                 "adversary can recover (a stronger attack can only do better); the references bracket them: the mean "
                 "image recovers nothing image-specific, the label-only decoder what the class gives away, no defence "
                 "everything. The co-trained D's PSNR is no privacy figure: O can push D's output below a guess while a "
                 "fresh attacker still recovers the image. The obfuscation is not "
                 "differential privacy in the formal sense: no noise is calibrated to a privacy budget."])
    return report


def draw_samples(seeds: list[Records], out: Path, *, folders: list[Path], data_root=None, **_) -> list[Path]:
    """Fig. 4: the first seed's final O: originals, uploads, the co-trained D and a row per attack of its suite."""
    first = folders[0]
    if not (first / "recovery" / "obfuscator.safetensors").exists():  # logs without networks (copied reports)
        return []
    rows = sample_rows(first / "recovery", suite=first / "privacy", data_root=data_root, device="cpu")
    return [figures.sample_grid(rows, out / "fig4_samples.png", title=f"{first.name}: final obfuscator")]


@dataclass(frozen=True)
class IdentifyRecord:
    accuracy: float
    chance: float


def read_identify(folder: Path) -> IdentifyRecord:
    log = Log(folder)
    return IdentifyRecord(log.value("test_accuracy"), log.value("chance"))


def identify_report(seeds: list[Records]) -> list[str]:
    acc = estimate(r["identify"].accuracy for r in seeds)
    return ["## Does the class survive the reconstruction?", "",
            f"A fresh classifier trained on the suite decoder's reconstructions of the training images tells the class "
            f"of the test images' reconstructions (on {seeds[0].dataset}: "
            f"{'who it is' if seeds[0].dataset == 'orl' else 'their label'}) with accuracy {acc.text(100)} % (chance "
            f"{100 * seeds[0]['identify'].chance:.1f} %; n = {len(seeds)} seeds)."]


PRIVACY = Stage("privacy", "privacy", SuiteConfig, lambda s, seed: replace(s, obfuscator=seed.path("recovery")),
                trainer(run_suite), read_suite, needs=("recovery",), group="privacy", main=True,
                report=suite_report("privacy", "the final O (after recovery)"), figures=draw_samples)
PRIVACY_O0 = Stage("privacy-o0", "privacy", SuiteConfig, lambda s, seed: replace(s, obfuscator=seed.path("o0")),
                   trainer(run_suite), read_suite, needs=("o0",), group="privacy",
                   report=suite_report("privacy-o0", "O0 (baseline)"))
IDENTIFY = Stage("identify", "identify", IdentifyConfig,
                 lambda s, seed: replace(s, attack=str(Path(seed.path("privacy")) / "decoder")) if s.epochs else None,
                 trainer(train_identify), read_identify, needs=("privacy",), group="privacy", report=identify_report)
STAGES = [PRIVACY, PRIVACY_O0, IDENTIFY]
