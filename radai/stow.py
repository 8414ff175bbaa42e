"""ResultSender for DICOMweb: STOW-RS of Part-10 files to `{url}/studies` (PS3.18 10.5), QIDO-RS as echo."""

from __future__ import annotations

import io
import json
import logging
import ssl
import uuid
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree

import httpx
from pydicom import Dataset, dcmwrite

from radai.config import DestinationSettings
from radai.errors import ConfigError, DeliveryError

log = logging.getLogger(__name__)

FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def multipart_related(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """The body and Content-Type of a STOW request. Hand-written: httpx builds only multipart/form-data."""
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in part for part in parts):  # a random 128-bit boundary; checked anyway
        boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def failed_instances(response: httpx.Response) -> list[int | None]:
    """The FailureReason of each item of the response's FailedSOPSequence (None where absent).

    Raises ValueError, ElementTree.ParseError, AttributeError or TypeError when the body is neither a
    DICOM JSON nor a Native DICOM Model (XML) data set.
    """
    if response.content.lstrip().startswith(b"<"):  # XML; Orthanc sends it without a Content-Type
        root = ElementTree.fromstring(response.content)
        reasons: list[int | None] = []
        for item in root.findall(f"./{{*}}DicomAttribute[@tag='{FAILED_SOP_SEQUENCE}']/{{*}}Item"):
            value = item.findtext(f"./{{*}}DicomAttribute[@tag='{FAILURE_REASON}']/{{*}}Value")
            reasons.append(int(value) if value and value.strip().isdigit() else None)
        return reasons
    body: Any = json.loads(response.content) if response.content.strip() else {}
    if isinstance(body, list):  # some servers wrap the one response data set in an array
        body = body[0] if body else {}
    if not isinstance(body, dict):
        raise ValueError("response is not a DICOM JSON data set")
    sequence = body.get(FAILED_SOP_SEQUENCE) or {}
    out: list[int | None] = []
    for item in sequence.get("Value", []):
        values = ((item or {}).get(FAILURE_REASON) or {}).get("Value") or [None]
        out.append(values[0] if isinstance(values[0], int) else None)
    return out


class StowSender:
    """One STOW-RS request per `send` (no retries here: the outbound queue, radai.delivery, retries)."""

    def __init__(
        self, dest: DestinationSettings, *, timeout_s: float = 30.0, echo_timeout_s: float = 3.0
    ) -> None:
        if dest.type != "stow" or dest.url is None:
            raise ValueError(f"destination {dest.name} is not a STOW-RS destination")
        self._name = dest.name
        self._url = dest.url
        self._timeout = timeout_s
        self._echo_timeout = echo_timeout_s
        try:
            self._verify = ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"destination {dest.name}: cannot load ca_file {dest.ca_file}: {exc}") from exc
        self._auth: httpx.Auth | None = None
        self._headers: dict[str, str] = {}
        if dest.username is not None and dest.password is not None:
            self._auth = httpx.BasicAuth(dest.username, dest.password.get_secret_value())
        if dest.token is not None:
            self._headers["Authorization"] = f"Bearer {dest.token.get_secret_value()}"

    @property
    def name(self) -> str:
        return self._name

    def _client(self, timeout_s: float) -> httpx.Client:
        return httpx.Client(
            auth=self._auth, headers=self._headers, verify=self._verify, timeout=timeout_s, trust_env=False
        )

    def send(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            return
        body, content_type = multipart_related([_part10(ds) for ds in datasets])
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        try:
            with self._client(self._timeout) as client:
                response = client.post(f"{self._url}/studies", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"destination {self._name}: STOW-RS request failed: {_reason(exc)}") from exc
        self._check(response, len(datasets))
        log.debug("STOW-RS to %s stored %d instance(s)", self._name, len(datasets))

    def _check(self, response: httpx.Response, sent: int) -> None:
        """Raise DeliveryError unless the response says every instance was stored (PS3.18 10.5.3)."""
        status = response.status_code
        try:
            failed, readable = failed_instances(response), True
        except (ValueError, ElementTree.ParseError, AttributeError, TypeError):
            failed, readable = [], False
        if status == 200 and not failed:
            return  # all stored (a body we cannot read changes nothing)
        if status == 202 and readable and not failed:
            log.warning("STOW-RS to %s: stored with warnings (HTTP 202)", self._name)
            return  # warnings only (e.g. coerced attributes): every instance is stored
        reason = f"destination {self._name}: STOW-RS answered HTTP {status} {response.reason_phrase}".rstrip()
        if failed:
            codes = sorted({f"0x{r:04X}" for r in failed if r is not None})
            detail = f" (FailureReason {', '.join(codes)})" if codes else ""
            reason += f": {len(failed)} of {sent} instance(s) failed{detail}"
        elif status == 202:
            reason += " with an unreadable response"
        raise DeliveryError(reason)

    def echo(self) -> bool:
        """A QIDO-RS search for one study: True on any 2xx answer; never raises."""
        try:
            with self._client(self._echo_timeout) as client:
                response = client.get(
                    f"{self._url}/studies",
                    params={"limit": "1"},
                    headers={"Accept": "application/dicom+json"},
                )
            return response.is_success
        except Exception as exc:  # a probe must answer False, never raise into /readyz
            log.debug("QIDO-RS echo of %s failed: %s", self._name, type(exc).__name__)
            return False


def _reason(exc: httpx.HTTPError) -> str:
    """The error's type and first line (connection refused, certificate verify failed, timed out...)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
