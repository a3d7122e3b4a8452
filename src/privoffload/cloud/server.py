"""The service on the network: uvicorn with TLS, timeouts and a connection limit; `privoffload serve`.

uvicorn alone bounds neither how long a connection may take to send a request's head (one that
trickles header bytes stays open for as long as it trickles) nor, without settings, how many
connections are open. `uvicorn_config` is the one place where the service's settings become
uvicorn's: `serve` and the tests both use it, so the tests run what production runs.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl

import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServeConfig
from ..errors import UserError
from ..runtime import pick_device
from .app import create_app
from .auth import Tokens
from .repository import Repository
from .store import ModelStore
from .telemetry import event, setup_logging


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request head: a connection that has not sent a
    complete request head `header_timeout` seconds after it opened (or after its last response) is closed."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self.head_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete  # no request since the timer was armed
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, cfg: ServeConfig, **overrides) -> uvicorn.Config:
    """uvicorn's settings for the service: TLS, the head, body and keep-alive timeouts, the connection limit."""
    return uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, timeout_graceful_shutdown=10,
        http=functools.partial(GuardedH11Protocol, header_timeout=cfg.header_timeout_s),
        timeout_keep_alive=cfg.keep_alive_s, limit_concurrency=cfg.max_connections,
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
    store = ModelStore.open(Repository(cfg.repo), pick_device(cfg.device))
    if not tokens.enabled:
        event("authentication is off (--no-auth): anyone who reaches this port can use and swap models", logging.WARNING)
    elif not cfg.ssl_certfile and not is_loopback(cfg.host):
        event("serving plain http beyond this machine: tokens cross the network in clear; give --ssl-certfile and "
              "--ssl-keyfile, or put a TLS reverse proxy in front (docs/service.md)", logging.WARNING)
    uvicorn.Server(uvicorn_config(create_app(cfg, tokens, store), cfg)).run()
