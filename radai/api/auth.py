"""Bearer tokens with two scopes: `read` (studies, models) and `admin` (every write; also reads).

Auth is on as soon as either token is configured: then the read routes need the read or the admin token and
writes need the admin token. Without an admin token every write answers 403. Health checks and /metrics stay
open (probes and Prometheus). Tokens are compared in constant time.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Header, HTTPException


@dataclass(frozen=True)
class Tokens:
    admin: str | None = None
    read: str | None = None

    @property
    def enabled(self) -> bool:
        return self.admin is not None or self.read is not None


def _presented(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, expected: str | None) -> bool:
    return (
        token is not None
        and expected is not None
        and secrets.compare_digest(token.encode(), expected.encode())
    )


def _unauthorised(what: str) -> HTTPException:
    return HTTPException(401, f"{what} token required", headers={"WWW-Authenticate": "Bearer"})


def scope_of(tokens: Tokens, authorization: str | None) -> str:
    """The scope the presented bearer token grants: "admin", "read" or "anonymous" (for the audit log)."""
    token = _presented(authorization)
    if _matches(token, tokens.admin):
        return "admin"
    if _matches(token, tokens.read):
        return "read"
    return "anonymous"


def require_admin(tokens: Tokens) -> Callable[..., None]:
    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        if tokens.admin is None:
            raise HTTPException(403, "writes are disabled: no api.admin_token is configured")
        if not _matches(_presented(authorization), tokens.admin):
            raise _unauthorised("admin")

    return check


def require_read(tokens: Tokens) -> Callable[..., None]:
    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        if not tokens.enabled:
            return
        token = _presented(authorization)
        if not (_matches(token, tokens.read) or _matches(token, tokens.admin)):
            raise _unauthorised("read")

    return check
