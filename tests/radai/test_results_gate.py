"""The validation gate in front of delivery: real results pass; broken ones are caught with a reason."""

from __future__ import annotations

import copy
import shutil

import pytest
from pydicom.uid import generate_uid

from radai.results import build_sr
from radai.results.gate import problems
from radai.results.notice import NoticeRequest, build_notice
from tests.radai.results_fixtures import ALGORITHM, ct_source, standard_seg
from tests.radai.test_results_sr import sr_request

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy is not installed")


@needs_dciodvfy
def test_real_seg_sr_and_notice_pass_the_gate() -> None:
    seg = standard_seg()
    sr = build_sr(sr_request(seg=seg))
    notice = build_notice(NoticeRequest(ct_source(), ALGORITHM, "model error"))

    assert problems([seg, sr, notice], ct_source()) == []


def test_seg_frame_moved_off_the_source_slices_is_caught() -> None:
    seg = copy.deepcopy(standard_seg())
    position = seg.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0]
    position.ImagePositionPatient = [float(v) + 2.5 for v in position.ImagePositionPatient]

    found = problems([seg], ct_source(), dciodvfy=False)

    assert found == ["SEG #1: SEG: 1 frame(s) lie on no source slice"]


def test_sr_whose_seg_is_not_among_the_results_is_caught() -> None:
    sr = build_sr(sr_request())

    found = problems([sr], ct_source(), dciodvfy=False)

    assert len(found) == 1 and "reference(s) to instances outside" in found[0]


def test_result_outside_the_source_study_is_caught() -> None:
    seg = copy.deepcopy(standard_seg())
    seg.StudyInstanceUID = generate_uid()

    assert problems([seg], ct_source(), dciodvfy=False) == ["SEG #1: not in the source study"]


@needs_dciodvfy
def test_object_dciodvfy_rejects_is_caught_with_its_first_error() -> None:
    seg = copy.deepcopy(standard_seg())
    del seg.ContentLabel  # Type 1 in the Segmentation Image module

    found = problems([seg], ct_source())

    assert len(found) == 1 and found[0].startswith("SEG #1: dciodvfy: Error")


def test_object_highdicom_cannot_read_back_is_caught() -> None:
    seg = copy.deepcopy(standard_seg())
    del seg.SegmentSequence

    found = problems([seg], ct_source(), dciodvfy=False)

    assert len(found) == 1 and "highdicom cannot read it back" in found[0]


@needs_dciodvfy
def test_an_error_the_source_already_has_is_not_held_against_the_result() -> None:
    source = ct_source()
    for ds in source:
        ds.PatientAge = "0Y"  # invalid AS value in the source; every result copies it
    notice = build_notice(NoticeRequest(source, ALGORITHM, "model error"))

    assert problems([notice], source) == []


@needs_dciodvfy
def test_labelmap_seg_passes_the_gate_without_dciodvfy_which_does_not_know_its_iod() -> None:
    from radai.results import build_seg
    from tests.radai.results_fixtures import seg_request

    labelmap = build_seg(seg_request(labelmap=True, uid_parts=("labelmap",)))

    assert problems([labelmap], ct_source()) == []
