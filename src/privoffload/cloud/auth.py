"""Bearer tokens: one for inference, one for administration, and optionally one for the metrics scraper.

Tokens come from the environment (`PRIVOFFLOAD_TOKEN`, `PRIVOFFLOAD_ADMIN_TOKEN`, and
`PRIVOFFLOAD_METRICS_TOKEN`). They are kept only as SHA-256 digests and compared with
`hmac.compare_digest`, so the comparison takes the same time whatever the guess. No token or an
unknown one: 401. A known token on a route that is not its own: 403. The admin token may use
every route; `/metrics` takes the metrics token, or the inference token where none is set, so a
scraper never holds the credential that swaps models.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import UserError
from .schemas import ApiError

TOKEN_ENV = "PRIVOFFLOAD_TOKEN"
ADMIN_TOKEN_ENV = "PRIVOFFLOAD_ADMIN_TOKEN"
METRICS_TOKEN_ENV = "PRIVOFFLOAD_METRICS_TOKEN"
MIN_LENGTH = 16


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Tokens:
    inference: bytes | None  # digests; None on both = authentication off (explicitly asked for)
    admin: bytes | None
    metrics: bytes | None = None  # None: /metrics takes the inference token

    @classmethod
    def from_env(cls, no_auth: bool = False) -> "Tokens":
        if no_auth:
            return cls(None, None)
        values = {name: os.environ.get(name, "") for name in (TOKEN_ENV, ADMIN_TOKEN_ENV, METRICS_TOKEN_ENV)}
        for name, value in values.items():
            if len(value) < MIN_LENGTH and (value or name != METRICS_TOKEN_ENV):
                raise UserError(f"set {name} to a secret of at least {MIN_LENGTH} characters "
                                f"(e.g. `export {name}=$(openssl rand -hex 24)`), or pass --no-auth on a trusted network")
        given = [v for v in values.values() if v]
        if len(set(given)) != len(given):
            raise UserError(f"{', '.join(n for n, v in values.items() if v)} must all differ")
        return cls(*(_digest(v) if v else None for v in values.values()))

    @classmethod
    def of(cls, inference: str, admin: str, metrics: str | None = None) -> "Tokens":
        return cls(_digest(inference), _digest(admin), _digest(metrics) if metrics else None)

    @property
    def enabled(self) -> bool:
        return self.inference is not None

    def role(self, token: str | None) -> str | None:
        """'admin', 'inference', 'metrics' or None; every digest is always compared."""
        d = _digest(token or "")
        matches = {role: hmac.compare_digest(d, digest or b"")
                   for role, digest in (("admin", self.admin), ("inference", self.inference), ("metrics", self.metrics))}
        return next((role for role, match in matches.items() if match), None)


bearer = HTTPBearer(auto_error=False, description="PRIVOFFLOAD_TOKEN for inference, PRIVOFFLOAD_ADMIN_TOKEN for admin, "
                                                  "PRIVOFFLOAD_METRICS_TOKEN (if set) for /metrics")


def _check(request: Request, creds: HTTPAuthorizationCredentials | None, route: str) -> None:
    tokens: Tokens = request.app.state.tokens
    if not tokens.enabled:
        return
    role = tokens.role(creds.credentials if creds else None)
    if role is None:
        raise ApiError(401, "invalid bearer token" if creds else "this route needs 'Authorization: Bearer <token>'",
                       {"WWW-Authenticate": "Bearer"})
    allowed = {"inference": ("inference", "admin"), "admin": ("admin",),
               "metrics": ("metrics" if tokens.metrics else "inference", "admin")}[route]
    if role not in allowed:
        raise ApiError(403, f"this route needs the {allowed[0]} token")


def inference_access(request: Request, creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    _check(request, creds, "inference")


def admin_access(request: Request, creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    _check(request, creds, "admin")


def metrics_access(request: Request, creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    _check(request, creds, "metrics")
