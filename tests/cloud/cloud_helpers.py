"""Helpers of the service tests: small real networks, a real repository, a real uvicorn on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from privoffload.cloud.app import create_app
from privoffload.cloud.auth import Tokens
from privoffload.cloud.repository import Repository, new_key_pair
from privoffload.config import ServeConfig
from privoffload.live import LoopbackServer as LiveServer  # noqa: F401  (the service tests' loopback server)

from ..helpers import calibrated, fit_head  # noqa: F401  (re-exported for the service tests)

TOKEN = "inference-token-for-tests"
ADMIN = "admin-token-for-the-tests"
MODEL = "cifar10-resnet18"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_repo(root: Path, files: list[Path], signing_key: Path | None = None) -> Repository:
    repo = Repository(root)
    for f in files:
        repo.publish(f, MODEL, signing_key=signing_key)
    return repo


def key_pair(folder: Path, name: str = "publisher") -> tuple[Path, Path]:
    return new_key_pair(folder, name)


def serve(repo: Repository, tokens: Tokens | None = None, **settings) -> LiveServer:
    cfg = ServeConfig(repo=str(repo.root), device="cpu", **settings)
    return LiveServer(create_app(cfg, tokens or Tokens.of(TOKEN, ADMIN)))


class ServeProcess:
    """`privoffload serve` as an operator runs it: a subprocess on a free loopback port, up once it is ready.
    Its own process, so that what it does to its own event loop (GIL included) is measured alone."""

    def __init__(self, repo: Path, *args: str, **popen):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "privoffload", "serve", "--repo", str(repo), "--port", str(self.port),
                    "--device", "cpu", *args]
        self.env = {**os.environ, "PRIVOFFLOAD_TOKEN": TOKEN, "PRIVOFFLOAD_ADMIN_TOKEN": ADMIN, **popen.pop("env", {})}
        self.popen, self.logs = popen, ""

    def __enter__(self) -> "ServeProcess":
        self.proc = subprocess.Popen(self.cmd, env=self.env, stderr=subprocess.PIPE, text=True, **self.popen)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"serve did not start:\n{self.logs[-2000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        _, self.logs = self.proc.communicate(timeout=30)


class Recorder:
    """ASGI middleware that keeps (path, headers, body) of every request the server receives, as it receives it."""

    def __init__(self, app, bodies: list):
        self.app, self.bodies = app, bodies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks = []

        async def recording():
            message = await receive()
            chunks.append(message.get("body", b""))
            return message

        await self.app(scope, recording, send)
        self.bodies.append((scope["path"], dict((k.decode(), v.decode()) for k, v in scope["headers"]), b"".join(chunks)))
