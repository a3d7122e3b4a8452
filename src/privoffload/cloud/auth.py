"""Bearer tokens: one for inference, one for administration (the admin token may also infer).

Tokens come from the environment (`PRIVOFFLOAD_TOKEN`, `PRIVOFFLOAD_ADMIN_TOKEN`). They are kept
only as SHA-256 digests and compared with `hmac.compare_digest`, so the comparison takes the same
time whatever the guess. No token or an unknown one: 401. The inference token on an admin route: 403.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import UserError

TOKEN_ENV = "PRIVOFFLOAD_TOKEN"
ADMIN_TOKEN_ENV = "PRIVOFFLOAD_ADMIN_TOKEN"
MIN_LENGTH = 16


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Tokens:
    inference: bytes | None  # digests; None on both = authentication off (explicitly asked for)
    admin: bytes | None

    @classmethod
    def from_env(cls, no_auth: bool = False) -> "Tokens":
        if no_auth:
            return cls(None, None)
        values = {name: os.environ.get(name, "") for name in (TOKEN_ENV, ADMIN_TOKEN_ENV)}
        for name, value in values.items():
            if len(value) < MIN_LENGTH:
                raise UserError(f"set {name} to a secret of at least {MIN_LENGTH} characters "
                                f"(e.g. `export {name}=$(openssl rand -hex 24)`), or pass --no-auth on a trusted network")
        if values[TOKEN_ENV] == values[ADMIN_TOKEN_ENV]:
            raise UserError(f"{TOKEN_ENV} and {ADMIN_TOKEN_ENV} must differ")
        return cls(_digest(values[TOKEN_ENV]), _digest(values[ADMIN_TOKEN_ENV]))

    @classmethod
    def of(cls, inference: str, admin: str) -> "Tokens":
        return cls(_digest(inference), _digest(admin))

    @property
    def enabled(self) -> bool:
        return self.inference is not None

    def role(self, token: str | None) -> str | None:
        """'admin', 'inference' or None; both digests are always compared."""
        d = _digest(token or "")
        is_admin = hmac.compare_digest(d, self.admin or b"")
        is_inference = hmac.compare_digest(d, self.inference or b"")
        return "admin" if is_admin else "inference" if is_inference else None


bearer = HTTPBearer(auto_error=False, description="PRIVOFFLOAD_TOKEN for inference, PRIVOFFLOAD_ADMIN_TOKEN for admin")


def _check(request: Request, creds: HTTPAuthorizationCredentials | None, admin: bool) -> None:
    tokens: Tokens = request.app.state.tokens
    if not tokens.enabled:
        return
    role = tokens.role(creds.credentials if creds else None)
    if role is None:
        raise AuthError(401, "invalid bearer token" if creds else "this route needs 'Authorization: Bearer <token>'")
    if admin and role != "admin":
        raise AuthError(403, "this route needs the admin token")


def inference_access(request: Request, creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    _check(request, creds, admin=False)


def admin_access(request: Request, creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    _check(request, creds, admin=True)
