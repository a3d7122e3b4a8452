"""The client's own settings: when it re-syncs by itself (its re-sync algorithm's are ResyncConfig, training.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .loader import positive


@dataclass
class DriftConfig:
    """When the client re-syncs by itself (client/drift.py); every check and decision is logged."""

    on_version_change: bool = True  # re-sync when the cloud answers with another model version
    canary_threshold: float = 0.0  # re-sync when accuracy on the labelled canary images falls below this (0 = off)
    canary_every: int = 50  # classify calls between canary checks
    reclassify: bool = True  # after a re-sync, classify the call's images again with the new obfuscator
    retry_after_calls: int = 1  # a failed re-sync is tried again after this many classify calls, doubling each failure

    def validate(self) -> None:
        if not 0 <= self.canary_threshold <= 1:
            raise UserError(f"config: canary_threshold = {self.canary_threshold} must be an accuracy in [0, 1]")
        positive("canary_every", self.canary_every)
        positive("retry_after_calls", self.retry_after_calls)


