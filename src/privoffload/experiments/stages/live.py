"""Beyond the paper: the user's view of an update, live (its runner is live.py's `hot_swap_stage`).

The service on loopback serves C0; a client classifies test images through it; the cloud hot-swaps to the drifted
classifier; the client notices the new model version and re-syncs by itself. The run needs the service and the
client, layers above the experiments, so the command line hands the protocol its runner (`reproduce(runners=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...config import ResyncConfig
from ...config.loader import subset
from ..stage import Log, Records, Stage, need
from ..stats import estimate


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
    accuracy: dict[str, dict[str, float]]  # obfuscator (robust, o0) -> before_swap, after_swap, after_resync
    images: int


def read_live(folder: Path) -> LiveRecord:
    log = Log(folder)
    if not log.records:
        raise log.missing("client record")
    where = f"{folder}/metrics.jsonl"
    return LiveRecord({r["obfuscator"]: {k: float(need(r, k, where)) for k in ("before_swap", "after_swap", "after_resync")}
                       for r in log.records}, int(log.records[0]["images"]))


def report(seeds: list[Records]) -> list[str]:
    lines = ["## Beyond the paper: the user's view of an update (live)", "",
             "The service on loopback serves C0; a client classifies test images through it; the cloud hot-swaps to the "
             "drifted classifier; the client notices the new model version and re-syncs by itself (white-box, from the "
             f"published weights). Accuracy of what the client gets back, on the same {seeds[0]['live'].images:,} images "
             f"each time; n = {len(seeds)} seed{'s' if len(seeds) > 1 else ''}.", "",
             "| client's obfuscator | before the swap | after the swap | after the automatic re-sync |", "|---|---|---|---|"]
    for label, name in (("robust O", "robust"), ("O0 (plain)", "o0")):
        if all(name in r["live"].accuracy for r in seeds):
            lines.append("| " + " | ".join([label] + [estimate(r["live"].accuracy[name][k] for r in seeds).text(100)
                                                       for k in ("before_swap", "after_swap", "after_resync")]) + " |")
    return lines


LIVE = Stage("live", "live", LiveConfig, lambda s, seed: s if s.enabled else None, None, read_live,
             needs=("c0", "o0", "drift"), report=report)
STAGES = [LIVE]
