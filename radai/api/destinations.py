"""`/api/v1/destinations`: the configured destinations (never their TLS key paths, passwords or tokens), each
with its last cached echo result and outbound queue counts, and an echo test (admin: it opens a connection
to the PACS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from fastapi import APIRouter, Depends, HTTPException

from radai.api.auth import Tokens, require_admin, require_read
from radai.errors import NotFoundError


@dataclass(frozen=True)
class DestinationStatus:
    """One destination as the API shows it. DIMSE: ae_title, host, port; STOW-RS: url (the others null)."""

    name: str
    type: Literal["dimse", "stow"]
    ae_title: str | None
    host: str | None
    port: int | None
    url: str | None
    outputs: list[str]  # the result objects it gets: seg, sr, sc, gsps, notice
    tls: bool  # DICOM TLS, or an https:// url
    up: bool | None  # the last echo (C-ECHO, or QIDO-RS for STOW), null if never checked
    pending: int  # deliveries queued or being sent
    dead: int  # dead-lettered deliveries


@dataclass(frozen=True)
class EchoOutcome:
    name: str
    ok: bool
    seconds: float


class DestinationAdmin(Protocol):
    """What the API needs of the destinations (implemented by radai.destination_admin.ServerDestinations).
    `status` and `echo` raise radai.errors.NotFoundError for an unknown name."""

    def statuses(self) -> list[DestinationStatus]: ...

    def status(self, name: str) -> DestinationStatus: ...

    def echo(self, name: str) -> EchoOutcome: ...


def destinations_router(admin: DestinationAdmin, tokens: Tokens) -> APIRouter:
    router = APIRouter(
        prefix="/api/v1/destinations", tags=["destinations"], dependencies=[Depends(require_read(tokens))]
    )

    @router.get("")
    def list_destinations() -> list[DestinationStatus]:
        """Every configured destination in configuration order."""
        return admin.statuses()

    @router.get("/{name}")
    def get_destination(name: str) -> DestinationStatus:
        """One destination."""
        try:
            return admin.status(name)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc

    @router.post("/{name}/echo", dependencies=[Depends(require_admin(tokens))])
    def echo(name: str) -> EchoOutcome:
        """Echo the destination now (C-ECHO; QIDO-RS for STOW-RS) and remember the result as its `up`."""
        try:
            return admin.echo(name)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc

    return router
