"""The service on the network: uvicorn with TLS, timeouts and bounds on connections and heads; `privoffload serve`.

uvicorn alone bounds neither how long a connection may take to send a request's head (one that trickles
header bytes stays open for as long as it trickles) nor how large that head may be, and its one bound on
connections (limit_concurrency) counts idle ones: 260 sockets that each sent half a request head made
every request, health probes included, a 503. Here instead:

- each request head must be complete within `header_timeout_s`, at most `max_head_kb` and `max_headers`
  lines (else 431, before anything is parsed);
- a client address with more than `max_idle_per_client` idle or half-sent-head connections gives all of
  them only `idle_grace_s` to send a complete head: a flood is cut within a second, a burst of real
  requests (whose heads arrive at once) is not;
- beyond `max_connections` open connections, the oldest idle one of the client with the most idle ones is
  cut to make room, so a new client, or a probe, always gets in while any connection is idle;
- requests in flight are bounded in the app (`max_requests`, cloud/app.py), with the health routes outside.

`uvicorn_config` is the one place where the service's settings become uvicorn's: `serve` and the tests both
use it, so the tests run what production runs.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import ssl
import time

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServeConfig
from ..errors import UserError
from ..runtime import pick_device
from .app import create_app
from .auth import Tokens
from .dataplane import DataPlane
from .repository import Repository
from .telemetry import event, setup_logging


def _answer(status: str, message: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 error answer that closes its connection, written before any request is parsed."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            f"connection: close\r\n\r\n").encode() + body


class Connections:
    """The open connections of one server, by client address: the bounds uvicorn lacks (module docstring)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.by_client: dict[str, dict["GuardedH11Protocol", None]] = {}  # insertion-ordered: oldest first
        self.count = 0
        self.cut = 0  # connections cut to make room or for a slow head, for the operator (logged at shutdown)

    def opened(self, conn: "GuardedH11Protocol") -> bool:
        """Register a new connection; False if it must be refused (every other connection is busy)."""
        self.by_client.setdefault(conn.host, {})[conn] = None
        self.count += 1
        if self.count > self.cfg.max_connections:
            victim = self._greediest_idle(conn)
            if victim is None:
                return False
            victim.cut()
        self.crowd(conn.host)
        return True

    def closed(self, conn: "GuardedH11Protocol") -> None:
        conns = self.by_client.get(conn.host, {})
        if conns.pop(conn, False) is None:
            self.count -= 1
            if not conns:
                del self.by_client[conn.host]

    def crowd(self, host: str) -> None:
        """A client with more idle connections than max_idle_per_client: each of them gets idle_grace_s at most."""
        idle = [c for c in self.by_client.get(host, ()) if c.idle]
        if len(idle) > self.cfg.max_idle_per_client:
            for c in idle:
                c.deadline_in(self.cfg.idle_grace_s)

    def _greediest_idle(self, new: "GuardedH11Protocol") -> "GuardedH11Protocol | None":
        """The oldest idle connection (not `new`) of the client with the most idle connections."""
        best: list = []
        for conns in self.by_client.values():
            idle = [c for c in conns if c.idle and c is not new]
            if len(idle) > len(best):
                best = idle
        return best[0] if best else None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol under `Connections`, with a deadline and a size on each request head."""

    def __init__(self, *args, connections: Connections, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard, self.cfg = connections, connections.cfg
        self.head_timer = None
        self.deadline = float("inf")
        self.head_bytes = self.head_lines = 0
        self.head_tail = b""  # the last bytes of the head so far, to find its end across reads
        self.host = ""

    @property
    def idle(self) -> bool:
        """Waiting for a request head (none yet, or the last one answered): connected, but asking nothing."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.host = self.client[0] if self.client else ""
        self.deadline_in(self.cfg.header_timeout_s)
        if not self.guard.opened(self):
            transport.write(_answer("503 Service Unavailable", "the server has no connection free; retry later",
                                    "retry-after: 1\r\n"))
            transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.head_bytes = self.head_lines = 0
        self.head_tail = b""
        self.deadline = float("inf")
        self.deadline_in(self.cfg.header_timeout_s)
        self.guard.crowd(self.host)

    def connection_lost(self, exc) -> None:
        self.guard.closed(self)
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.idle and self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self.guard.cut += 1
            self.transport.write(_answer("431 Request Header Fields Too Large",
                                         f"a request head may have at most {self.cfg.max_headers} header lines and "
                                         f"{self.cfg.max_head_kb:g} KiB"))
            self.transport.close()
            return
        super().data_received(data)

    def _head_too_large(self, data: bytes) -> bool:
        """Count the bytes and lines of the head being received (up to its blank line) against the limits."""
        seen = self.head_tail + data
        end = seen.find(b"\r\n\r\n")
        part = data if end < 0 else data[:max(0, end - len(self.head_tail))]
        self.head_bytes += len(part)
        self.head_lines += part.count(b"\n")
        too_large = self.head_bytes > self.cfg.max_head_kb * 1024 or self.head_lines > self.cfg.max_headers + 1
        self.head_tail = seen[-3:] if end < 0 else b""
        if end >= 0:  # the head is complete: the body that follows is not counted
            self.head_bytes = self.head_lines = 0
        return too_large

    def deadline_in(self, seconds: float) -> None:
        """Close this connection if it is still idle `seconds` from now (never later than a deadline already set)."""
        when = self.loop.time() + seconds
        if when >= self.deadline:
            return
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.deadline = when
        self.head_timer = self.loop.call_at(when, self._head_late)

    def _head_late(self) -> None:
        self.head_timer = None
        self.deadline = float("inf")
        if self.idle and not self.transport.is_closing():
            self.cut()

    def cut(self) -> None:
        """Close an idle connection (asking nothing, so nobody waits for an answer on it)."""
        self.guard.cut += 1
        self.transport.close()


def uvicorn_config(app, cfg: ServeConfig, **overrides) -> uvicorn.Config:
    """uvicorn's settings for the service: TLS, the head, body and keep-alive timeouts, the connection bounds."""
    return uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, timeout_graceful_shutdown=10,
        http=functools.partial(GuardedH11Protocol, connections=Connections(cfg)),
        timeout_keep_alive=cfg.keep_alive_s, limit_concurrency=None,
        ssl_certfile=cfg.ssl_certfile or None, ssl_keyfile=cfg.ssl_keyfile or None, **overrides)


def check_tls(cfg: ServeConfig) -> None:
    """Load the certificate and key once here, so that a bad one is a one-line error and not a traceback."""
    if not cfg.ssl_certfile:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot use the certificate {cfg.ssl_certfile} with the key {cfg.ssl_keyfile} "
                        f"({getattr(e, 'strerror', None) or e})") from None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: ServeConfig) -> None:
    """`privoffload serve`: check tokens, TLS and the repository (one-line errors), then run uvicorn."""
    tokens = Tokens.from_env(cfg.no_auth)
    check_tls(cfg)
    setup_logging(cfg.log_level)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plane = DataPlane.open(Repository(cfg.repo), pick_device(cfg.device))
    if not tokens.enabled:
        event("authentication is off (--no-auth): anyone who reaches this port can use and swap models", logging.WARNING)
    elif not cfg.ssl_certfile and not is_loopback(cfg.host):
        event("serving plain http beyond this machine: tokens cross the network in clear; give --ssl-certfile and "
              "--ssl-keyfile, or put a TLS reverse proxy in front (docs/service.md)", logging.WARNING)
    uvicorn.Server(uvicorn_config(create_app(cfg, tokens, plane), cfg)).run()
