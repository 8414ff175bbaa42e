"""Result encoders: label maps and measurements -> DICOM SEG (BINARY or LABELMAP) and SR (TID 1500), a
Secondary Capture series and GSPS for legacy PACS, and the "AI did not run" notice; all built with highdicom.
:mod:`radai.results.gate` checks every object before it may leave.

Pure core: no sockets, threads or clock reads of our own; :mod:`radai.results.validate` alone
writes a temporary file to run dciodvfy.
"""

from radai.results.findings import DetectionFinding, FindingsRequest, build_findings_sr
from radai.results.gate import problems
from radai.results.gsps import GspsRequest, build_gsps
from radai.results.notice import NoticeRequest, build_notice
from radai.results.sc import ScRequest, build_sc, iter_sc
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
    "DetectionFinding",
    "FindingsRequest",
    "GspsRequest",
    "NoticeRequest",
    "ScRequest",
    "SegRequest",
    "SegmentMeasurement",
    "SegmentSpec",
    "SrRequest",
    "build_findings_sr",
    "build_gsps",
    "build_notice",
    "build_sc",
    "build_seg",
    "build_sr",
    "dciodvfy_errors",
    "dciodvfy_messages",
    "derived_uid",
    "iter_sc",
    "measure_means",
    "measure_volumes",
    "problems",
    "segment_numbers",
]
