"""ResultSender adapters: DICOM C-STORE to a configured destination, or files in a folder (demo)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router.scu import DeliveryFailed, Destination, send_datasets
from dicom_router.security import TlsSettings as RouterTls
from dicom_router.security import client_context
from radai.config import DestinationSettings, TlsSettings
from radai.errors import DeliveryError

log = logging.getLogger(__name__)


def router_tls(tls: TlsSettings | None) -> RouterTls | None:
    """The dicom_router form of a TLS section of the settings."""
    if tls is None:
        return None
    return RouterTls(
        cert_file=tls.cert_file,
        key_file=tls.key_file,
        ca_file=tls.ca_file,
        require_client_cert=tls.require_client_cert,
        check_hostname=tls.check_hostname,
    )


class DicomSender:
    """One attempt per `send` (retries=0): the outbound queue (radai.delivery) does the retrying."""

    def __init__(
        self,
        dest: DestinationSettings,
        calling_ae: str,
        *,
        timeout_s: float = 30.0,
        echo_timeout_s: float = 3.0,
    ) -> None:
        self._dest = dest
        self._target = Destination(name=dest.name, ae_title=dest.ae_title, host=dest.host, port=dest.port)
        self._calling_ae = calling_ae
        self._timeout = timeout_s
        self._echo_timeout = echo_timeout_s
        self._tls = router_tls(dest.tls)

    @property
    def name(self) -> str:
        return self._dest.name

    def send(self, datasets: Sequence[Dataset]) -> None:
        try:
            send_datasets(
                datasets,
                self._target,
                calling_ae=self._calling_ae,
                retries=0,
                timeout_s=self._timeout,
                tls=self._tls,
            )
        except DeliveryFailed as exc:
            raise DeliveryError(f"destination {self._dest.name}: {exc}") from exc

    def echo(self) -> bool:
        """C-ECHO the destination (dicom_router.scu has no echo; pynetdicom's is a few lines)."""
        ae = AE(ae_title=self._calling_ae)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self._echo_timeout
        ae.connection_timeout = self._echo_timeout
        try:
            tls_args = (client_context(self._tls), self._dest.host) if self._tls is not None else None
            assoc = ae.associate(
                self._dest.host, self._dest.port, ae_title=self._dest.ae_title, tls_args=tls_args
            )
            if not assoc.is_established:
                return False
            try:
                status = assoc.send_c_echo()
                return bool(status) and int(status.get("Status", -1)) == 0x0000
            finally:
                if assoc.is_established:
                    assoc.release()
        except Exception as exc:  # a probe must answer False, never raise into /readyz
            log.debug("C-ECHO of %s failed: %s", self._dest.name, type(exc).__name__)
            return False
        finally:
            ae.shutdown()


class FolderSender:
    """Writes each result as `<Modality>_<SOPInstanceUID>.dcm` into a folder."""

    def __init__(self, folder: Path, name: str = "folder") -> None:
        self._folder = folder
        self._name = name
        self.written: list[Path] = []

    @property
    def name(self) -> str:
        return self._name

    def send(self, datasets: Sequence[Dataset]) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            path = self._folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            try:
                ds.save_as(path, enforce_file_format=True)
            except OSError as exc:
                raise DeliveryError(f"cannot write {path}: {exc.strerror}") from exc
            self.written.append(path)

    def echo(self) -> bool:
        folder = self._folder if self._folder.is_dir() else self._folder.parent
        return folder.is_dir() and os.access(folder, os.W_OK)
