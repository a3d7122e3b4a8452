"""The data plane: everything the routes ask of the models, and the one owner of versions, batchers and the
served-version record. Routes parse and authorise, then call one method here (as KServe's handlers delegate to
its DataPlane); none reaches past these methods.

    infer       choose(name, version) -> the model a request is answered by; for_obfuscator(name, k): the one
                that answers a client announcing obfuscator version k; infer(choice, images)
    ready       ready (None, or why not); model_ready(name, version)
    metadata    metadata(name, version)
    index       index(ready_only)
    load        load(name, version): verify, record as served, swap in
    weights     published(name, version): a verified version's file, manifest and signature

Which version answers a request is decided here only: the version being served (a pinned one must be it), or, for
a client that announces its obfuscator version k (`for_obfuscator`), the served version if it supports k, else the
newest older version that does (repository.Manifest.supports: the version k was registered with, or one the swap
gate passed). Versions newer than the served one are never chosen: publishing serves nothing. An older version is
loaded (and verified) on its first such request and kept, with its own batching worker, for the server's life;
the choice per (model, k, served version) is remembered, since published versions and registrations never change.
Such a request is pinned to its version: if a swap takes that version away before its batch runs, it is chosen
again once.

A load verifies the new version off the event loop while the old one keeps serving, records it in the
repository (so that every replica starting later serves it too), then replaces it with a single assignment.
Batches read the current version once, when they start, so requests already in a batch finish on the old
version and no request fails. At start each model serves its recorded version; if that one no longer verifies,
the newest older one that does (never a newer one: only a load makes a version served), and the index says why.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ServeConfig
from ..errors import UserError
from . import tensors
from .batching import Batcher, VersionGone
from .repository import LoadedModel, Manifest, Repository, parse_version
from .telemetry import Metrics, event


class NotFound(UserError):
    """No such model or version in the repository (404)."""


@dataclass(frozen=True)
class Choice:
    """The model a request is answered by: a loaded version, and whether the request pinned it."""

    name: str
    model: LoadedModel
    pinned: bool
    obfuscator: int | None = None  # the obfuscator version the client announced

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.manifest.shape


class DataPlane:
    def __init__(self, repo: Repository, device: torch.device, metrics: Metrics | None = None):
        self.repo = repo
        self.device = device
        self.metrics = metrics or Metrics()
        self.current: dict[str, LoadedModel] = {}  # the version each model serves
        self.failures: dict[tuple[str, int], str] = {}  # why a version was refused, for the index
        self.verified: set[tuple[str, int]] = set()  # versions that loaded here: the only ones whose weights are served
        self.batchers: dict[str, Batcher] = {}  # the served version's worker, by model name
        self.older: dict[tuple[str, int], Batcher] = {}  # workers of older versions kept for announced obfuscators
        self.chosen: dict[tuple[str, int, int], int] = {}  # (name, obfuscator, served version) -> answering version
        self.locks: dict[str, asyncio.Lock] = {}
        self.cfg = ServeConfig()

    # ---- life

    @classmethod
    def open(cls, repo: Repository, device: torch.device, metrics: Metrics | None = None) -> "DataPlane":
        """Load each model's recorded version (see the module docstring for what stands in for a broken one)."""
        plane = cls(repo, device, metrics)
        for name in repo.names():
            plane._open_model(name)
        if not plane.current:
            detail = f" ({next(iter(plane.failures.values()))})" if plane.failures else ""
            raise UserError(f"no loadable model in {repo.root}{detail}; publish one with "
                            f"`privoffload publish RUN --repo {repo.root}`")
        return plane

    def _open_model(self, name: str) -> None:
        versions = self.repo.versions(name)
        recorded = self.repo.served(name)
        if recorded is not None:
            candidates = [v for v in reversed(versions) if v <= recorded]
            if recorded not in versions:
                self._refused(name, recorded, "recorded as served, but it is not in the repository")
        else:
            candidates = list(reversed(versions))
        for version in candidates:
            try:
                model = self.repo.load(name, version, self.device)
            except UserError as e:
                self._refused(name, version, str(e))
                continue
            if recorded is None:  # the first server of this repository: what it serves becomes the record
                try:
                    agreed = self.repo.record_served(name, version, replace=False)
                except UserError as e:
                    event("served version not recorded", logging.WARNING, model=name, version=version, reason=str(e))
                    agreed = version
                if agreed != version:  # another replica recorded first: serve what it recorded
                    return self._open_model(name)
            elif version != recorded:
                event("serving an older version than the recorded one", logging.WARNING, model=name,
                      version=version, recorded=recorded)
            self._install(name, model)
            return

    def _refused(self, name: str, version: int, reason: str) -> None:
        self.failures[(name, version)] = reason
        event("version refused", logging.WARNING, model=name, version=version, reason=reason)

    def _install(self, name: str, model: LoadedModel) -> None:
        self.current[name] = model  # the swap: one assignment, read once per batch
        self.failures.pop((name, model.version), None)
        self.verified.add((name, model.version))
        self.metrics.version.labels(name).set(model.version)

    def start(self, cfg: ServeConfig) -> None:
        """Start one batching worker per model (needs the running event loop)."""
        self.cfg = cfg
        for name in self.current:
            self._start_batcher(name)

    def _start_batcher(self, name: str) -> None:
        self.batchers[name] = self._batcher(name, lambda: self.current[name])

    def _batcher(self, name: str, current) -> Batcher:
        cfg, m = self.cfg, self.metrics
        batcher = Batcher(current, cfg.batch_window_ms / 1000, cfg.max_batch_images, cfg.max_queue_images,
                          cfg.queue_timeout_s, on_batch=self._observe_batch,
                          on_drop=lambda reason: m.dropped.labels(name, reason).inc(),
                          on_restart=lambda: m.restarts.labels(name).inc())
        batcher.start()
        return batcher

    def _observe_batch(self, requests: int, images: int) -> None:
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_images.observe(images)

    async def stop(self) -> None:
        for b in [*self.batchers.values(), *self.older.values()]:
            await b.stop()
        self.batchers.clear()
        self.older.clear()

    @property
    def ready(self) -> str | None:
        """None when every model is served by a running worker; else why not."""
        if not self.batchers:
            return "no model loaded yet"
        if not all(b.alive for b in [*self.batchers.values(), *self.older.values()]):
            return "a batching worker is not running"
        return None

    # ---- which version answers

    def serving(self, name: str) -> LoadedModel:
        """The version `name` serves; NotFound, or a UserError for a model that is on disk but not loaded."""
        if name not in self.current:
            if self.repo.versions(name):
                raise UserError(f"model {name!r} is in the repository but not loaded; an admin can load it")
            raise NotFound(f"no model named {name[:64]!r}; POST /v2/repository/index lists them")
        return self.current[name]

    def version(self, name: str, text: str) -> int:
        """A version number of `name` that exists in the repository, from its URL text; else NotFound."""
        v = parse_version(text)
        if v is None or v not in self.repo.versions(name):
            raise NotFound(f"model {name[:64]!r} has no version {text[:20]!r}")
        return v

    def choose(self, name: str, version: str | None) -> Choice:
        """The loaded version that answers a request for `name` (pinned to `version`, if given)."""
        model = self.serving(name)
        if version is None:
            return Choice(name, model, pinned=False)
        v = self.version(name, version)
        if v != model.version:
            raise UserError(f"version {v} of {name!r} is not loaded; version {model.version} is serving")
        return Choice(name, model, pinned=True)

    async def for_obfuscator(self, name: str, obfuscator: int) -> Choice:
        """The version that answers a client announcing `obfuscator` (see the module docstring); a UserError (400)
        for an obfuscator version not registered with `name`, or one no loadable version supports."""
        serving = self.serving(name)
        key = (name, obfuscator, serving.version)
        if key not in self.chosen:
            registration = await asyncio.to_thread(self.repo.obfuscator, name, obfuscator)
            if serving.manifest.supports(registration):
                self.chosen[key] = serving.version
            else:
                self.chosen[key] = await self._older_supporting(name, registration, serving)
        version = self.chosen[key]
        if version == serving.version:
            return Choice(name, serving, pinned=True, obfuscator=obfuscator)
        return Choice(name, self.older[(name, version)].current(), pinned=True, obfuscator=obfuscator)

    async def _older_supporting(self, name: str, registration, serving: LoadedModel) -> int:
        """The newest version older than the served one that supports the obfuscator, loaded with its own worker."""
        for v in reversed([v for v in self.repo.versions(name) if v < serving.version]):
            try:
                if not self.repo.manifest(name, v).supports(registration):
                    continue
                async with self.locks.setdefault(f"{name}/{v}", asyncio.Lock()):
                    if (name, v) not in self.older:
                        model = await asyncio.to_thread(self.repo.load, name, v, self.device, serving.manifest)
                        self.older[(name, v)] = self._batcher(name, lambda model=model: model)
                        self.verified.add((name, v))
                        event("older version loaded", model=name, version=v, obfuscator=registration.version)
                return v
            except UserError as e:
                self._refused(name, v, str(e))
        raise UserError(f"no loadable version of {name!r} up to the served {serving.version} supports obfuscator "
                        f"version {registration.version}")

    # ---- the routes' questions

    async def infer(self, choice: Choice, x: np.ndarray) -> tuple[np.ndarray, int, tuple[str, ...]]:
        """Classify float images [N, *shape] -> (probabilities, the version that computed them, its class names).
        Raises batching.Overloaded (queue full, deadline) and batching.VersionGone (a pinned version swapped out);
        the returned future is cancelled if the caller is."""
        try:
            probs, used = await self._run(choice, x)
        except VersionGone:
            if choice.obfuscator is None:
                raise
            choice = await self.for_obfuscator(choice.name, choice.obfuscator)  # a swap came between: choose again
            probs, used = await self._run(choice, x)
        self.metrics.images.labels(choice.name).inc(len(x))
        return probs, used, choice.model.manifest.classes  # versions of one name share their classes (load checks)

    async def _run(self, choice: Choice, x: np.ndarray) -> tuple[np.ndarray, int]:
        v = choice.model.version
        batcher = self.older.get((choice.name, v)) if v != self.current[choice.name].version else None
        future = (batcher or self.batchers[choice.name]).submit(torch.from_numpy(x), v if choice.pinned else None)
        try:
            return await future
        finally:
            future.cancel()  # a caller that went away withdraws its job (a no-op once it is done)

    def metadata(self, name: str, version: str | None = None) -> dict:
        """Inputs, outputs and the version: the one being served, or a stored one."""
        if version is None:
            m = self.serving(name).manifest
        else:
            m = self.repo.manifest(name, self.version(name, version))
        inputs, outputs = tensors.metadata(len(m.classes), m.shape)
        return {"name": name, "versions": [str(m.version)], "platform": "pytorch", "inputs": inputs, "outputs": outputs,
                "parameters": {"classes": list(m.classes)}}  # the class names, in the order of `probabilities`

    def model_ready(self, name: str, version: str | None = None) -> dict:
        model = self.serving(name) if version is None else self.choose(name, version).model
        return {"name": name, "version": str(model.version), "ready": True}

    def index(self, ready_only: bool = False) -> list[dict]:
        """Every model and version in the repository; READY marks the ones being served."""
        out = []
        for name in self.repo.names():
            for v in self.repo.versions(name):
                served = name in self.current and self.current[name].version == v
                if ready_only and not served:
                    continue
                out.append({"name": name, "version": str(v), "state": "READY" if served else "UNAVAILABLE",
                            "reason": "" if served else self.failures.get((name, v), "not loaded")})
        return out

    async def load(self, name: str, version: int | None) -> tuple[LoadedModel | None, LoadedModel]:
        """Load `version` of `name` (newest if None), verify it, record it as served, then serve it; on any error
        the old one stays (a UserError says why)."""
        versions = self.repo.versions(name)
        if not versions:
            raise NotFound(f"no model named {name[:64]!r} in the repository")
        if version is not None and version not in versions:
            raise NotFound(f"model {name!r} has no version {version}")
        async with self.locks.setdefault(name, asyncio.Lock()):  # one load per model at a time
            old = self.current.get(name)
            wanted = version if version is not None else versions[-1]
            try:
                new = await asyncio.to_thread(self.repo.load, name, wanted, self.device, old.manifest if old else None)
                self.verified.add((name, new.version))
                await asyncio.to_thread(self.repo.record_served, name, new.version)
            except UserError as e:
                self.failures[(name, wanted)] = str(e)
                if name not in self.current or self.current[name].version != wanted:
                    self.verified.discard((name, wanted))
                self.metrics.loads.labels(name, "refused").inc()
                event("load refused", logging.WARNING, model=name, version=wanted, reason=str(e),
                      serving=old.version if old else None)
                serving = old.version if old else "none"
                raise UserError(f"refused, version {serving} keeps serving: {e}") from None
            self._install(name, new)
            if name not in self.batchers:
                self._start_batcher(name)
            self.metrics.loads.labels(name, "loaded").inc()
            event("model swapped", model=name, version=new.version, previous=old.version if old else None)
            return old, new

    def published(self, name: str, version: str) -> tuple[Path, Manifest, str, str | None]:
        """A version this server hands out (served with serve_weights, and verified by a load here): its weights
        file, manifest, manifest text as published and signature. NotFound otherwise."""
        if not self.cfg.serve_weights:
            raise NotFound("this server does not publish weights (start it with --serve-weights)")
        v = self.version(name, version)
        if (name, v) not in self.verified:
            raise NotFound(f"version {v} of {name!r} has not been verified by a load on this server; its weights are "
                           f"not published")
        return self.repo.weights_path(name, v), self.repo.manifest(name, v), self.repo.manifest_text(name, v), \
            self.repo.signature(name, v)
