"""Helpers of the service tests: small real networks, a real repository, a real uvicorn on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from privoffload.cloud.app import create_app
from privoffload.cloud.auth import Tokens
from privoffload.cloud.repository import Repository
from privoffload.config import ServeConfig

from ..helpers import calibrated, fit_head  # noqa: F401  (re-exported for the service tests)

TOKEN = "inference-token-for-tests"
ADMIN = "admin-token-for-the-tests"
MODEL = "cifar10-resnet18"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_repo(root: Path, files: list[Path]) -> Repository:
    repo = Repository(root)
    for f in files:
        repo.publish(f, MODEL)
    return repo


class LiveServer:
    """The app under a real uvicorn, on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
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


def serve(repo: Repository, **settings) -> LiveServer:
    cfg = ServeConfig(repo=str(repo.root), device="cpu", **settings)
    return LiveServer(create_app(cfg, Tokens.of(TOKEN, ADMIN)))
