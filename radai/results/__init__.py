"""Result encoders: label maps and measurements -> DICOM SEG and SR (TID 1500), built with highdicom.

Pure core: no sockets, threads or clock reads of our own; :mod:`radai.results.validate` alone
writes a temporary file to run dciodvfy.
"""

from radai.results.seg import (
    Algorithm,
    CodedConcept,
    SegmentSpec,
    SegRequest,
    build_seg,
    segment_numbers,
)
from radai.results.sr import (
    NOT_VERIFIED_TEXT,
    SegmentMeasurement,
    SrRequest,
    build_sr,
    measure_means,
    measure_volumes,
)
from radai.results.uids import derived_uid
from radai.results.validate import dciodvfy_errors, dciodvfy_messages

__all__ = [
    "NOT_VERIFIED_TEXT",
    "Algorithm",
    "CodedConcept",
    "SegRequest",
    "SegmentMeasurement",
    "SegmentSpec",
    "SrRequest",
    "build_seg",
    "build_sr",
    "dciodvfy_errors",
    "dciodvfy_messages",
    "derived_uid",
    "measure_means",
    "measure_volumes",
    "segment_numbers",
]
