"""The offload system run live, for the report: the user's view of a model update.

The cloud service (cloud/) serves C0 on loopback; a client (client/) holding an obfuscator classifies test
images; the cloud hot-swaps to the drifted classifier; the client notices the new model version and re-syncs
by itself (white-box: the service publishes weights, signed by the publisher, whose key the client holds). Accuracy is
recorded before the swap, after it (the old obfuscator on the new model) and after the automatic re-sync, for the
robust obfuscator and for O0; and for O0 once more with the compatible update as the new model, where the client
should not need its re-sync at all.

This sits beside the CLI, above both apps, because it runs both: it is the runner of the protocol's `live` stage
(experiments/stages/live.py, which holds its settings, record and report section), handed to `reproduce` by the
command line.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from .client.drift import AutoSyncClient
from .client.resync import ClientState
from .cloud.app import create_app
from .cloud.auth import Tokens
from .cloud.repository import Repository, new_key_pair
from .cloud.server import uvicorn_config
from .config import DriftConfig, ServeConfig, model_name
from .data import select
from .errors import UserError
from .experiments.stage import Seed
from .experiments.stages.live import COMPATIBLE_UPDATE, LiveConfig
from .runs import RunDir, is_done


class LoopbackServer:
    """The app under a real uvicorn, on a free loopback port, in a background thread: with the service's own
    uvicorn settings (TLS, timeouts, limits) when the app has a ServeConfig, else uvicorn's defaults."""

    def __init__(self, app):
        self.app = app
        # proto IPPROTO_TCP, as uvicorn's own sockets: asyncio then sets TCP_NODELAY on each connection, without
        # which every answer on a kept-alive connection waits ~40 ms for a delayed ACK
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        cfg = getattr(getattr(app, "state", None), "config", None)
        self.url = f"{'https' if cfg and cfg.ssl_certfile else 'http'}://127.0.0.1:{self.port}"
        config = uvicorn_config(app, cfg) if cfg else uvicorn.Config(app, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def hot_swap_stage(live: LiveConfig, out: Path, seed: Seed) -> None:
    """The protocol's `live` stage for one seed: the hot swap with the robust O (where there is one) and with O0."""
    run = RunDir(out)
    run.start(live, resume=True)
    if is_done(out):
        return
    x_test, y_test = select(seed.data, live.test_subset, split="test")
    x_own, y_own = select(seed.data, live.resync.subset, live.resync.seed)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    swaps = [("robust", "drift"), ("o0", "drift"), ("o0", COMPATIBLE_UPDATE)]
    for name, update in swaps:
        if (seed.folder / name / "obfuscator.safetensors").exists() and is_done(seed.folder / update):
            record = swap_once(seed.folder, name, out, x_test, y_test, x_own, y_own, live,
                               model=model_name(seed.protocol.dataset), update=update)
            run.log(record)
            print(f"live {name} -> {update}: before the swap {record['before_swap']:.4f}, after {record['after_swap']:.4f}, "
                  f"after the automatic re-sync {record['after_resync']:.4f}", flush=True)
    run.finish()


def swap_once(folder: Path, obfuscator: str, out: Path, x: np.ndarray, y: np.ndarray, x_own: np.ndarray,
              y_own: np.ndarray, live: LiveConfig, model: str = model_name("cifar10"), update: str = "drift") -> dict:
    """One client, one swap: C0 serving, classify; publish and load the update (the classifier run `update` of the
    seed folder), classify; re-sync, classify."""
    work = Path(tempfile.mkdtemp(prefix=".live-", dir=out))
    try:
        private, public = new_key_pair(work)
        repo = Repository(work / "models")
        repo.publish(folder / "c0" / "classifier.safetensors", model, source="c0", signing_key=private)
        inference, admin = secrets.token_hex(24), secrets.token_hex(24)
        serve = ServeConfig(repo=str(repo.root), device="cpu", serve_weights=True)
        state = ClientState.create(folder / obfuscator, work / "client", model_version="1")
        resync = dataclasses.replace(live.resync, mode="white-box")
        with LoopbackServer(create_app(serve, Tokens.of(inference, admin))) as server, \
                AutoSyncClient(server.url, state.path, x_own, y_own, drift=DriftConfig(reclassify=False),
                               resync_cfg=resync, token=inference, publisher_key=public, model=model) as client:
            t0 = time.perf_counter()
            before = client.classify(x)
            repo.publish(folder / update / "classifier.safetensors", model, source=update, signing_key=private)
            loaded = httpx.post(f"{server.url}/v2/repository/models/{model}/load", json={},
                                headers={"Authorization": f"Bearer {admin}"}, timeout=120)
            if loaded.status_code != 200:  # the service keeps the old version; the protocol stops with the reason
                raise UserError(f"live: the service refused the update {folder / update}: {loaded.text[:300]}")
            after_swap = client.classify(x)  # answered by the new model; the client notices and re-syncs afterwards
            after_resync = client.classify(x)
            seconds = time.perf_counter() - t0
        events = [e["event"] for e in client.monitor.events]
        return {"obfuscator": obfuscator, "update": update, "images": len(y), "before_swap": float((before.classes == y).mean()),
                "versions": [before.model_version, after_swap.model_version, after_resync.model_version],
                "after_swap": float((after_swap.classes == y).mean()),
                "after_resync": float((after_resync.classes == y).mean()), "resyncs": len(client.resyncs),
                "resync": client.resyncs[0] if client.resyncs else None, "events": events, "time_s": seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)
