"""The service attacked on loopback, at the connection level: a flood of half-sent request heads, a burst of
requests, heads of thousands of headers, and replicas restarted after a publish or a rollback.

Raw sockets, so that nothing a client library does (pools, retries) hides what the server does.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time

import httpx
import numpy as np

from .cloud_helpers import ADMIN, MODEL, auth, make_repo, serve
from privoffload import oip

PARTIAL = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: "


def one_image_request(path: str = f"/v2/models/{MODEL}/infer") -> bytes:
    spec, raw = oip.tensor("images", np.zeros((1, 3, 32, 32), np.uint8), "UINT8", binary=True)
    body, headers = oip.join_body({"inputs": [spec], "outputs": [{"name": "class"}]}, [raw])
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, **auth(), "Content-Length": str(len(body))}.items())
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body


def status_of(sock: socket.socket, seconds: float = 60) -> int | str:
    """The status code of the answer on `sock`, or how the connection ended without one."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        return "timeout"
    except OSError:
        return "reset"
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else "closed"


class Flood:
    """`n` connections that each send part of a request head and nothing more; every one the server closes is
    opened again at once, until `stop()` (or `seconds` have passed)."""

    def __init__(self, port: int, n: int, seconds: float = 60):
        self.port, self.n, self.deadline = port, n, time.monotonic() + seconds
        self.stopped, self.opened, self.reopened = threading.Event(), threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, selector: selectors.BaseSelector) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(PARTIAL)
        except OSError:
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for _ in range(self.n):
                self._open(selector)
            self.opened.set()
            while not self.stopped.is_set() and time.monotonic() < self.deadline:
                for key, _ in selector.select(0.05):
                    sock = key.fileobj
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:  # closed by the server: open another
                        selector.unregister(sock)
                        sock.close()
                        self.reopened += 1
                        self._open(selector)
            for key in list(selector.get_map().values()):
                key.fileobj.close()

    def __enter__(self) -> "Flood":
        self.thread.start()
        self.opened.wait(60)
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(30)


def test_a_flood_of_partial_heads_does_not_take_the_service_down(tmp_path, weights):
    """260 connections that send half a request head and stay (reopened as soon as they are closed): the health
    routes and other clients' requests are still answered within a second. (Before: every request, health
    included, got uvicorn's plain 503 for as long as the flood went on.)"""
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    request = one_image_request()
    with serve(repo) as server, Flood(server.port, 260) as flood:
        time.sleep(0.5)
        answers = []
        for _ in range(3):
            for path in ("/v2/health/live", "/v2/health/ready"):
                start = time.perf_counter()
                try:
                    status = httpx.get(f"{server.url}{path}", timeout=5).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                answers.append((path, status, time.perf_counter() - start))
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                start = time.perf_counter()
                sock.sendall(request)
                answers.append(("infer", status_of(sock, 5), time.perf_counter() - start))
            time.sleep(0.3)
    print(f"\nunder a flood of 260 partial heads ({flood.reopened} reopened): "
          + ", ".join(f"{p} {s} in {t * 1000:.0f} ms" for p, s, t in answers))
    assert all(status == 200 and seconds < 1 for _, status, seconds in answers), answers


def test_a_burst_of_400_requests_is_answered_not_refused(tmp_path, weights):
    """400 one-image requests sent at once on 400 connections: they are classified (the queue holds them), not
    refused wholesale. (Before: all 400 got uvicorn's plain 503, open connections counting against the limit.)"""
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    request = one_image_request()
    with serve(repo, max_queue_images=1024) as server:
        socks = []
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(request)
            socks.append(sock)
        statuses = [status_of(sock) for sock in socks]
        for sock in socks:
            sock.close()
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"\na burst of 400 requests: {counts}")
    assert counts.get(200, 0) >= 380, counts


def test_request_heads_with_thousands_of_headers_are_refused_unread(tmp_path, weights):
    """5,000 headers: refused with 431 before the head is parsed, without a token; a normal head still works."""
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    many = "".join(f"X-H{i}: v\r\n" for i in range(5000))
    with serve(repo) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
            refused = status_of(sock, 10)
        assert httpx.get(f"{server.url}/v2/health/live", headers={f"X-H{i}": "v" for i in range(40)}).status_code == 200
    assert refused == 431, refused


def serving(url: str) -> str:
    return httpx.get(f"{url}/v2/models/{MODEL}/ready", headers=auth()).json()["version"]


def load(url: str, version: int) -> httpx.Response:
    return httpx.post(f"{url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": str(version)}},
                      headers=auth(ADMIN), timeout=60)


def test_replicas_restarted_after_a_publish_or_a_rollback_serve_the_recorded_version(tmp_path, weights):
    """A version published but not loaded is not served by a replica that restarts; a rollback survives restarts;
    replicas on one repository agree whenever they start. (Before: a restarted replica served the newest version
    on disk, so replicas disagreed and a rollback was undone by the next restart.)"""
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    with serve(repo) as a:
        repo.publish(weights["c2"], MODEL)  # on disk, not loaded anywhere
        with serve(repo) as b:  # a replica that restarts now
            assert (serving(a.url), serving(b.url)) == ("1", "1")
            assert load(a.url, 2).status_code == 200  # the rollout, one replica after the other
            assert load(b.url, 2).status_code == 200
        with serve(repo) as b:
            assert serving(b.url) == "2"
        assert load(a.url, 1).status_code == 200  # a rollback
    with serve(repo) as a, serve(repo) as b:  # every replica restarted
        assert (serving(a.url), serving(b.url)) == ("1", "1")
