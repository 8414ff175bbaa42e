"""ResultSender adapters: DICOM C-STORE to a configured destination, or files in a folder (demo)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset

from dicom_router.scu import DeliveryFailed, Destination, send_datasets
from radai.config import DestinationSettings
from radai.errors import DeliveryError


class DicomSender:
    def __init__(self, dest: DestinationSettings, calling_ae: str) -> None:
        self._dest = dest
        self._target = Destination(name=dest.name, ae_title=dest.ae_title, host=dest.host, port=dest.port)
        self._calling_ae = calling_ae

    @property
    def name(self) -> str:
        return self._dest.name

    def send(self, datasets: Sequence[Dataset]) -> None:
        try:
            send_datasets(
                datasets,
                self._target,
                calling_ae=self._calling_ae,
                retries=self._dest.retries,
                backoff_s=self._dest.backoff_seconds,
            )
        except DeliveryFailed as exc:
            raise DeliveryError(f"destination {self._dest.name}: {exc}") from exc


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
