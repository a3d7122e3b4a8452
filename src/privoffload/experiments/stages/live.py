"""Beyond the paper: the user's view of an update, live (its runner is live.py's `hot_swap_stage`).

The service on loopback serves C0; a client classifies test images through it; the cloud hot-swaps to the drifted
classifier; the client notices the new model version and re-syncs by itself. With O0 the swap is made twice: to the
plain drift and to the compatible one (updates.py), after which the client should not need its re-sync. The run
needs the service and the client, layers above the experiments, so the command line hands the protocol its runner
(`reproduce(runners=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...config import ResyncConfig
from ...config.loader import subset
from ..stage import Log, Records, Stage, need
from ..stats import estimate, verdict
from .updates import COMPAT_RATIO

COMPATIBLE_UPDATE = "compatible-drift/replica-0"  # the compatible update paired with the drift stage's (same seed)


@dataclass
class LiveConfig:
    """The live hot swap after each seed's stages: the service, a client, a model update, an automatic re-sync."""

    enabled: bool = True
    test_subset: str = "random:1000"  # the images the client classifies before the swap, after it, after the re-sync
    resync: ResyncConfig = field(default_factory=lambda: ResyncConfig(steps=100))  # white-box, on the client's images

    def validate(self) -> None:
        subset(self.test_subset)
        self.resync.validate()


@dataclass(frozen=True)
class LiveRecord:
    accuracy: dict[str, dict[str, float]]  # obfuscator@update (robust@drift, o0@drift, o0@compatible-drift/replica-0)
    # -> before_swap, after_swap, after_resync
    images: int


def read_live(folder: Path) -> LiveRecord:
    log = Log(folder)
    if not log.records:
        raise log.missing("client record")
    where = f"{folder}/metrics.jsonl"
    return LiveRecord({f"{r['obfuscator']}@{need(r, 'update', where)}": {
        k: float(need(r, k, where)) for k in ("before_swap", "after_swap", "after_resync")} for r in log.records},
        int(log.records[0]["images"]))


ROWS = (("robust O, plain update", "robust@drift"), ("O0, plain update", "o0@drift"),
        ("O0, compatible update", f"o0@{COMPATIBLE_UPDATE}"))


def report(seeds: list[Records]) -> list[str]:
    k = len(seeds)
    lines = ["## Beyond the paper: the user's view of an update (live)", "",
             "The service on loopback serves C0; a client classifies test images through it; the cloud hot-swaps to the "
             "updated classifier (the drift, or the compatible drift of the same seed); the client notices the new model "
             "version and re-syncs by itself (white-box, from the published weights). Accuracy of what the client gets "
             f"back, on the same {seeds[0]['live'].images:,} images each time, in %.", "",
             "| client's obfuscator, update | n | before the swap | after the swap | after the automatic re-sync |",
             "|---|---|---|---|---|"]
    for label, name in ROWS:
        if all(name in r["live"].accuracy for r in seeds):
            lines.append("| " + " | ".join([label, str(k)] + [estimate(r["live"].accuracy[name][key] for r in seeds).text(100)
                                                              for key in ("before_swap", "after_swap", "after_resync")]) + " |")
    plain, compat = ROWS[1][1], ROWS[2][1]
    if all(plain in r["live"].accuracy and compat in r["live"].accuracy for r in seeds):
        loss = lambda a: a["before_swap"] - a["after_swap"]  # noqa: E731
        est = estimate(loss(r["live"].accuracy[compat]) - COMPAT_RATIO * loss(r["live"].accuracy[plain]) for r in seeds)
        lines += ["", f"- Through the compatible swap, without a re-sync, O0's client loses {est.text(100)} points minus "
                  f"{COMPAT_RATIO} x what the plain swap takes from it (paired, n = {est.n}; target at most 0, it keeps its "
                  f"accuracy: {verdict(est, 0.0, at_least=False)})."]
    return lines


LIVE = Stage("live", "live", LiveConfig, lambda s, seed: s if s.enabled else None, None, read_live,
             needs=("c0", "o0", "drift", "compatible-drift"), report=report)
STAGES = [LIVE]
