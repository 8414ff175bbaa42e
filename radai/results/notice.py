"""The "AI did not run" notice: a short SR sent to the PACS when a study matched a model but its job failed
or was refused, so that silence never reads as "normal".

It is a TID 1500 Imaging Measurement Report with no measurement group: the observer is the device (model id
and version), the image library lists the series the model was given, and a Qualitative Evaluations
container says in plain text that the analysis was not performed, by which model, and why. Viewers that list
measurement reports (OHIF) list it in the study; every SR viewer shows its text. Pure: returns a pydicom
Dataset built with highdicom.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from radai.errors import EncodingError
from radai.results.seg import Algorithm, with_type2
from radai.results.sr import QUALITATIVE_EVALUATIONS, report_attributes, report_root

NOT_PERFORMED_TEXT = "AI analysis NOT performed: do not read the absence of AI results as a normal finding"
_REASON_MAX = 400


@dataclass(frozen=True)
class NoticeRequest:
    """Input of :func:`build_notice`: the series the model was given (headers are enough: no pixels are
    read), the model, and the reason in words (no patient data: it comes from radai's own errors)."""

    source: Sequence[Dataset]
    algorithm: Algorithm
    reason: str
    series_number: int = 909
    created: datetime.datetime | None = None


def notice_description(algorithm: Algorithm) -> str:
    """The notice's SeriesDescription, clipped to the 64 characters of a LO value."""
    text = f"AI NOT RUN {algorithm.name}"
    return text if len(text) <= 64 else text[:61] + "..."


def _text(value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _statement(req: NoticeRequest) -> hd.sr.ContainerContentItem:
    algo = req.algorithm
    reason = " ".join(req.reason.split())[:_REASON_MAX] or "unknown reason"
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            _text(NOT_PERFORMED_TEXT),
            _text(f"Model: {algo.name} ({algo.model_id} version {algo.version})"),
            _text(f"Reason: {reason}"),
        ]
    )
    return container


def _content(req: NoticeRequest) -> hd.sr.ContentSequence:
    """TID 1500 without Imaging Measurements: the root, then the statement as Qualitative Evaluations."""
    root = report_root(req.source, req.algorithm)
    root.ContentSequence.append(_statement(req))
    return hd.sr.ContentSequence([root], is_root=True)


def build_notice(req: NoticeRequest) -> Dataset:
    """A COMPLETE, UNVERIFIED Comprehensive SR saying the model did not run on ``req.source`` and why.

    Its UIDs derive from the study, series and model, so a second failure of the same job replaces the
    first notice at the PACS instead of adding one. Raises :class:`EncodingError` on unusable input."""
    if not req.source:
        raise EncodingError("the notice needs the headers of the series the model was given")
    algo = req.algorithm
    try:
        return hd.sr.ComprehensiveSR(
            # highdicom copies patient and study from the first and raises on an absent type 2 attribute.
            evidence=[with_type2(req.source[0]), *req.source[1:]],
            content=_content(req),
            **report_attributes(
                req.source, algo, ("notice",), req.series_number, notice_description(algo), req.created
            ),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodingError(f"notice SR could not be built: {exc}") from exc
