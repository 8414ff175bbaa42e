"""Transfer syntaxes end to end: DCMTK encodes CT slices, storescu sends them to a Receiver, and the spooled
files build the same volume as the uncompressed originals (exactly when lossless)."""

from __future__ import annotations

import queue
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from dicom_router.assembler import Study
from dicom_router.receiver import Receiver
from radai.imaging.volume import Volume, build_volume
from tests.dicom_router.peers import CT_SERIES, storescu

SLICES = 4
QUIET = 0.3
WAIT = 60.0  # generous bound for a loaded CI machine; never a timing assertion

pytestmark = pytest.mark.skipif(
    not CT_SERIES.is_dir() or shutil.which("dcmcjpeg") is None, reason="needs ../shared data and DCMTK"
)


@dataclass(frozen=True)
class Variant:
    name: str
    syntax: uid.UID
    encode: Callable[[Path, Path], None]  # (uncompressed source file, output file)
    storescu_option: str


def _dcmtk(*tool: str) -> Callable[[Path, Path], None]:
    def run(src: Path, dst: Path) -> None:
        subprocess.run([*tool, str(src), str(dst)], check=True, capture_output=True, timeout=60)

    return run


def _pydicom_j2k(src: Path, dst: Path) -> None:
    # DCMTK's free toolkit has no JPEG 2000 encoder; pydicom's (OpenJPEG) writes the lossless stream
    ds = pydicom.dcmread(src)
    ds.compress(uid.JPEG2000Lossless, generate_instance_uid=False)
    ds.save_as(dst, enforce_file_format=True)


# storescu can propose only the default JPEG lossless syntax (SV1), not Process 14 with other predictors
LOSSLESS = [
    Variant("jpeg_lossless_sv1", uid.JPEGLosslessSV1, _dcmtk("dcmcjpeg", "+e1"), "-xs"),
    Variant("jpeg_ls_lossless", uid.JPEGLSLossless, _dcmtk("dcmcjpls"), "-xt"),
    Variant("jpeg_2000_lossless", uid.JPEG2000Lossless, _pydicom_j2k, "-xv"),
    Variant("rle", uid.RLELossless, _dcmtk("dcmcrle"), "-xr"),
    Variant("deflated", uid.DeflatedExplicitVRLittleEndian, _dcmtk("dcmconv", "+td"), "-xd"),
    Variant("explicit_big_endian", uid.ExplicitVRBigEndian, _dcmtk("dcmconv", "+tb"), "-xb"),
    Variant("implicit_little_endian", uid.ImplicitVRLittleEndian, _dcmtk("dcmconv", "+ti"), "-xi"),
]
# 16-bit CT in an 8-bit codec: DCMTK rescales each slice to 0..255 and writes a matching Rescale Slope
JPEG_BASELINE = Variant("jpeg_baseline", uid.JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "+eb", "+un"), "-xy")


@pytest.fixture(scope="module")
def originals() -> list[Path]:
    return sorted(CT_SERIES.glob("*.dcm"))[:SLICES]


@pytest.fixture(scope="module")
def reference(originals: list[Path]) -> Volume:
    return build_volume([pydicom.dcmread(p) for p in originals])


@pytest.fixture
def receive(tmp_path: Path) -> Iterator[Callable[[Variant, list[Path]], list[Path]]]:
    """Encode the originals as the variant, send them with storescu, return the spooled files."""
    started: list[Receiver] = []

    def run(variant: Variant, originals: list[Path]) -> list[Path]:
        encoded = tmp_path / variant.name
        encoded.mkdir()
        for src in originals:
            variant.encode(src, encoded / src.name)
        studies: queue.Queue[Study] = queue.Queue()
        receiver = Receiver("RADAI", "127.0.0.1", 0, tmp_path / "spool", QUIET, studies.put)
        receiver.start()
        started.append(receiver)
        sent = storescu(receiver.port, sorted(encoded.iterdir()), variant.storescu_option)
        assert sent.returncode == 0, sent.stderr
        study = studies.get(timeout=WAIT)
        return [h.path for s in study.series.values() for h in s.instances]

    yield run
    for receiver in started:
        receiver.stop()


def _spooled_volume(files: list[Path], syntax: uid.UID) -> Volume:
    datasets = [pydicom.dcmread(p) for p in files]
    assert len(datasets) == SLICES
    # the spool keeps what was sent: the transfer syntax under test really went over the wire
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in datasets} == {str(syntax)}
    return build_volume(datasets)


@pytest.mark.parametrize("variant", LOSSLESS, ids=lambda v: v.name)
def test_lossless_transfer_syntax_builds_the_uncompressed_volume_exactly(
    variant: Variant,
    originals: list[Path],
    reference: Volume,
    receive: Callable[[Variant, list[Path]], list[Path]],
) -> None:
    vol = _spooled_volume(receive(variant, originals), variant.syntax)
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_array_equal(vol.affine, reference.affine)
    assert vol.sop_instance_uids == reference.sop_instance_uids


def test_jpeg_baseline_builds_the_volume_within_lossy_tolerance(
    originals: list[Path], reference: Volume, receive: Callable[[Variant, list[Path]], list[Path]]
) -> None:
    files = receive(JPEG_BASELINE, originals)
    vol = _spooled_volume(files, JPEG_BASELINE.syntax)
    np.testing.assert_array_equal(vol.affine, reference.affine)
    assert vol.sop_instance_uids == reference.sop_instance_uids
    # 8 bits over about 4200 HU: one stored step is the slope DCMTK wrote (about 32 HU); JPEG adds block error
    step = max(float(pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope) for p in files)
    error = np.abs(vol.array - reference.array)
    assert 10.0 < step < 50.0
    assert float(error.mean()) < step
    body = reference.array > -200  # away from the 2000 HU edge of the field of view, where JPEG rings
    assert float(np.percentile(error[body], 99)) < 4 * step
    assert not np.array_equal(vol.array, reference.array)  # it really was lossy
