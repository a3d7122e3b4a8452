"""Drift detection: when the client re-syncs its obfuscator, and the client that does it by itself.

Two signals, each switched in `DriftConfig`:
- the cloud answers with another model_version (the client's `on_version_change` hook);
- accuracy on a small labelled canary set of the user's own images, classified through the cloud
  every `canary_every` calls, falls below `canary_threshold` (catches a cloud that changes its
  model without changing the version number).
Every signal, check and decision is logged: to the `privoffload.client` logger and, one JSON line
each, to `events.jsonl` in the client's folder. A signal stays pending until a re-sync succeeds: one
that fails, whatever the error (the server is down, its weights do not verify, the disk is full,
...), keeps it, is tried again after `retry_after_calls` classify calls, twice as many after each
further failure, and the user's call still gets its answer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import DriftConfig, ResyncConfig, model_name
from .client import Client, ClientError, Result
from .obfuscator import dataset_of, load_obfuscator
from .resync import ClientState, resync

log = logging.getLogger("privoffload.client")


class DriftMonitor:
    """Collects the signals; `check` (after each classify call) returns why to re-sync now, or None."""

    def __init__(self, cfg: DriftConfig, canary: tuple[np.ndarray, np.ndarray] | None = None,
                 events: str | Path | None = None):
        cfg.validate()
        self.cfg, self.canary = cfg, canary
        self.events_path = Path(events) if events else None
        self.events: list[dict] = []
        self.pending: str | None = None
        self.calls = 0
        self.failures = 0  # re-syncs failed in a row
        self.wait = 0  # classify calls to let pass before trying a failed re-sync again

    def record(self, event: str, **fields) -> None:
        entry = {"time": time.time(), "event": event, **fields}
        self.events.append(entry)
        log.info(json.dumps(entry))
        if self.events_path is not None:
            with open(self.events_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def version_changed(self, old: str | None, new: str) -> None:
        """The Client's hook: the cloud answered with another model version."""
        act = self.cfg.on_version_change
        self.record("model version changed", old=old, new=new, resync=act)
        if act:
            self.pending = f"model version {old} -> {new}"

    def check(self, classify: Callable[[np.ndarray], Result]) -> str | None:
        """After a classify call: run the canary check when it is due; return the reason to re-sync now, if any.

        The reason stays pending until `resynced` (a re-sync that fails keeps it, and backs off: `failed`)."""
        self.calls += 1
        due = self.canary is not None and self.cfg.canary_threshold > 0 and self.calls % self.cfg.canary_every == 0
        if self.pending is None and due:
            x, y = self.canary
            try:
                acc = float((classify(x).classes == y).mean())
            except ClientError as e:  # the check failed, not the user's call: try again when it is next due
                self.record("canary check failed", error=str(e)[:200])
                return None
            low = acc < self.cfg.canary_threshold
            self.record("canary checked", accuracy=round(acc, 4), threshold=self.cfg.canary_threshold, images=len(y),
                        resync=low)
            if low:
                self.pending = f"canary accuracy {acc:.3f} below {self.cfg.canary_threshold}"
        if self.wait > 0:  # backing off after a failed re-sync; the reason stays pending
            self.wait -= 1
            return None
        return self.pending

    def failed(self, reason: str, error: Exception) -> None:
        """A re-sync for `reason` failed: keep the reason, and back off (doubling) before the next try."""
        self.failures += 1
        self.wait = self.cfg.retry_after_calls * 2 ** min(self.failures - 1, 10)
        self.pending = self.pending or reason
        self.record("resync failed", reason=reason, error=str(error)[:300], failures=self.failures,
                    retry_after_calls=self.wait)

    def resynced(self) -> None:
        self.failures = self.wait = 0
        self.pending = None


class AutoSyncClient:
    """A client that notices model updates and re-syncs its obfuscator by itself; the user only classifies.

    `state` is the client's folder (`resync.ClientState`); `images`, `labels` are the user's own labelled
    images that re-syncing trains on; `canary` a few labelled images (for example some of those) for the check.
    """

    def __init__(self, server: str, state: str | Path, images: np.ndarray, labels: np.ndarray, *,
                 drift: DriftConfig | None = None, resync_cfg: ResyncConfig | None = None,
                 canary: tuple[np.ndarray, np.ndarray] | None = None, token: str | None = None,
                 model: str | None = None, device: str = "cpu", **client_options):
        self.state = ClientState(state)
        self.images, self.labels, self.device = images, labels, device
        self.drift, self.resync_cfg = drift or DriftConfig(), resync_cfg or ResyncConfig()
        self.resync_cfg.validate()
        self.monitor = DriftMonitor(self.drift, canary, self.state.path / "events.jsonl")
        self.client = Client(server, load_obfuscator(self.state.path), token=token,
                             model=model or model_name(dataset_of(self.state.path)),
                             model_version=self.state.model_version, on_version_change=self.monitor.version_changed,
                             **client_options)
        self.resyncs: list[dict] = []

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "AutoSyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def classify(self, images: np.ndarray) -> Result:
        result = self.client.classify(images)
        reason = self.monitor.check(self.client.classify)
        if reason is not None and self.resync(reason) is not None and self.drift.reclassify:
            result = self.client.classify(images)
        return result

    def resync(self, reason: str) -> dict | None:
        """Re-sync now; None if it failed (logged, and tried again later: see DriftMonitor.failed)."""
        self.monitor.record("resync started", reason=reason)
        try:
            done = resync(self.state, self.client, self.images, self.labels, self.resync_cfg, self.device)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the user's call gets its answer and the signal stays
            self.monitor.failed(reason, e)
            return None
        self.client.obfuscate = load_obfuscator(self.state.path)
        self.monitor.resynced()
        self.monitor.record("resync finished", reason=reason, **done)
        self.resyncs.append(done)
        return done
