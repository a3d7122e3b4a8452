"""The versions being served, one per model name, and the one place where a version is swapped.

A swap loads and verifies the new version off the event loop while the old one keeps serving,
then replaces it with a single assignment. Batches read the current version once, when they
start, so requests already in a batch finish on the old version and no request fails.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from ..config import ServeConfig
from ..errors import UserError
from .batching import Batcher
from .repository import LoadedModel, Repository
from .telemetry import Metrics, event


class ModelStore:
    def __init__(self, repo: Repository, device: torch.device, metrics: Metrics | None = None):
        self.repo = repo
        self.device = device
        self.metrics = metrics or Metrics()
        self.current: dict[str, LoadedModel] = {}
        self.failures: dict[tuple[str, int], str] = {}  # why a version was refused, for the index
        self.verified: set[tuple[str, int]] = set()  # versions that loaded here: the only ones whose weights are served
        self.batchers: dict[str, Batcher] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.cfg = ServeConfig()

    @classmethod
    def open(cls, repo: Repository, device: torch.device, metrics: Metrics | None = None) -> "ModelStore":
        """Load the newest version of every model that verifies; older ones stand in for broken ones."""
        store = cls(repo, device, metrics)
        for name in repo.names():
            for version in reversed(repo.versions(name)):
                try:
                    store._install(name, repo.load(name, version, device))
                    break
                except UserError as e:
                    store.failures[(name, version)] = str(e)
                    event("version refused", logging.WARNING, model=name, version=version, reason=str(e))
        if not store.current:
            detail = f" ({next(iter(store.failures.values()))})" if store.failures else ""
            raise UserError(f"no loadable model in {repo.root}{detail}; publish one with "
                            f"`privoffload publish RUN --repo {repo.root}`")
        return store

    def _install(self, name: str, model: LoadedModel) -> None:
        self.current[name] = model  # the swap: one assignment, read once per batch
        self.failures.pop((name, model.version), None)
        self.verified.add((name, model.version))
        self.metrics.version.labels(name).set(model.version)

    def _batcher(self, name: str) -> Batcher:
        cfg, m = self.cfg, self.metrics
        return Batcher(lambda: self.current[name], cfg.batch_window_ms / 1000, cfg.max_batch_images, cfg.max_queue_images,
                       cfg.queue_timeout_s, on_batch=self._observe_batch,
                       on_drop=lambda reason: m.dropped.labels(name, reason).inc(),
                       on_restart=lambda: m.restarts.labels(name).inc())

    def _observe_batch(self, requests: int, images: int) -> None:
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_images.observe(images)

    def start(self, cfg: ServeConfig) -> None:
        """Start one batching worker per model (needs the running event loop)."""
        self.cfg = cfg
        for name in self.current:
            self.batchers[name] = self._batcher(name)
            self.batchers[name].start()

    @property
    def ready(self) -> bool:
        return bool(self.batchers) and all(b.alive for b in self.batchers.values())

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.batchers.clear()

    async def swap(self, name: str, version: int | None) -> tuple[LoadedModel | None, LoadedModel]:
        """Load `version` of `name` (newest if None), verify it, then serve it; on any error the old one stays."""
        lock = self.locks.setdefault(name, asyncio.Lock())
        async with lock:  # one load per model at a time
            old = self.current.get(name)
            try:
                new = await asyncio.to_thread(self.repo.load, name, version, self.device, old.manifest if old else None)
            except UserError as e:
                refused = version if version is not None else max(self.repo.versions(name), default=None)
                if refused is not None:
                    self.failures[(name, refused)] = str(e)
                    self.verified.discard((name, refused))
                self.metrics.loads.labels(name, "refused").inc()
                event("load refused", logging.WARNING, model=name, version=version, reason=str(e),
                      serving=old.version if old else None)
                raise
            self._install(name, new)
            if name not in self.batchers:
                self.batchers[name] = self._batcher(name)
                self.batchers[name].start()
            self.metrics.loads.labels(name, "loaded").inc()
            event("model swapped", model=name, version=new.version, previous=old.version if old else None)
            return old, new
