"""The "AI did not run" notice SR: what it says, where it lands, and that it is valid."""

from __future__ import annotations

import datetime
import io
import shutil

import highdicom as hd
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes

from radai.errors import EncodingError
from radai.results.notice import NOT_PERFORMED_TEXT, NoticeRequest, build_notice
from radai.results.validate import dciodvfy_errors
from tests.radai.results_fixtures import ALGORITHM, ct_source, reread

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")
CREATED = datetime.datetime(2026, 1, 2, 3, 4, 5)
REASON = "NotAVolumeError: slices are not evenly spaced (gap of 12.5 mm after slice 4)"


def _texts(sr: Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: object) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            if item.ValueType == "TEXT":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence"))

    walk(sr.ContentSequence)
    return found


def test_notice_says_which_model_did_not_run_and_why() -> None:
    notice = reread(build_notice(NoticeRequest(ct_source(), ALGORITHM, REASON, created=CREATED)))

    texts = _texts(notice)
    assert NOT_PERFORMED_TEXT in texts
    assert f"Model: {ALGORITHM.name} ({ALGORITHM.model_id} version {ALGORITHM.version})" in texts
    assert f"Reason: {REASON}" in texts
    assert notice.SeriesDescription.startswith("AI NOT RUN")
    assert (notice.CompletionFlag, notice.VerificationFlag) == ("COMPLETE", "UNVERIFIED")


def test_notice_lands_in_the_source_study_and_references_the_series_the_model_was_given() -> None:
    source = ct_source()
    notice = reread(build_notice(NoticeRequest(source, ALGORITHM, REASON, created=CREATED)))

    assert notice.StudyInstanceUID == source[0].StudyInstanceUID
    assert notice.PatientID == source[0].PatientID
    assert notice.SeriesInstanceUID != source[0].SeriesInstanceUID
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in notice.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in source}


def test_notice_is_a_tid1500_report_observed_by_the_model_device() -> None:
    notice = hd.sr.srread(_buffer(build_notice(NoticeRequest(ct_source(), ALGORITHM, REASON))))

    assert notice.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    root = notice.ContentSequence
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in root]
    assert codes.DCM.ImageLibrary.value in names
    device = [
        item
        for item in root
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121013"
    ]
    assert device and device[0].TextValue == ALGORITHM.model_id  # Device Observer Name


def _buffer(ds: Dataset) -> io.BytesIO:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return out


def test_a_second_notice_for_the_same_job_replaces_the_first() -> None:
    first = build_notice(NoticeRequest(ct_source(), ALGORITHM, REASON))
    second = build_notice(NoticeRequest(ct_source(), ALGORITHM, "another reason"))

    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        second.SeriesInstanceUID,
        second.SOPInstanceUID,
    )


def test_notice_without_source_headers_is_refused() -> None:
    with pytest.raises(EncodingError, match="headers"):
        build_notice(NoticeRequest([], ALGORITHM, REASON))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_notice_passes_dciodvfy_without_errors() -> None:
    assert dciodvfy_errors(build_notice(NoticeRequest(ct_source(), ALGORITHM, REASON))) == []


def test_notice_for_a_source_without_type_2_patient_attributes_is_built_without_changing_it() -> None:
    source = ct_source()
    del source[0].PatientBirthDate
    notice = build_notice(NoticeRequest(source, ALGORITHM, REASON))

    assert notice.PatientBirthDate == "" and "PatientBirthDate" not in source[0]
