"""radai's SEG and SR have the structure of the reference objects made by dcmqi and highdicom.

Each test reads an aspect that viewers and PACS rely on from a reference object in
``../shared/data/dicom/seg_sr_reference`` and the same aspect from radai's object, built where possible
over the reference's own source images with the reference's own label map, and asserts they agree.
Where radai deliberately differs, the difference is asserted with the reason next to it.
"""

from __future__ import annotations

import copy
import datetime
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr._snomed_dict import mapping as snomed_mapping
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from radai.results import (
    Algorithm,
    CodedConcept,
    NoticeRequest,
    SegmentMeasurement,
    SegmentSpec,
    SegRequest,
    SrRequest,
    build_notice,
    build_seg,
    build_sr,
    dciodvfy_errors,
    measure_means,
    measure_volumes,
    segment_numbers,
)
from tests.radai.results_fixtures import reread

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "data" / "dicom" / "seg_sr_reference"
DCMQI = REFERENCE / "dcmqi"
HIGHDICOM = REFERENCE / "highdicom" / "test_files"

pytestmark = [
    pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared reference objects are absent"),
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),  # source PatientName
]

ALGORITHM = Algorithm(model_id="reference-check", version="1.0.0", name="Reference check")
CREATED = datetime.datetime(2024, 5, 17, 9, 30, 0)
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"


@dataclass(frozen=True)
class Case:
    """A reference SEG and the folder of the source images it was made on."""

    name: str
    reference: Path
    source: Path

    @property
    def labelmap(self) -> bool:
        return str(pydicom.dcmread(self.reference, stop_before_pixels=True).SegmentationType) == "LABELMAP"


LIVER = Case("dcmqi-liver", DCMQI / "segmentations" / "liver.dcm", DCMQI / "segmentations" / "ct-3slice")
SMALL = Case(
    "dcmqi-24x38x3",
    DCMQI / "segmentations" / "24x38x3" / "seg" / "label.seg",
    DCMQI / "segmentations" / "24x38x3" / "image",
)
HD_CT = Case("highdicom-ct", HIGHDICOM / "seg_image_ct_binary_single_frame.dcm", HIGHDICOM / "ct_image.dcm")
MULTI = Case(
    "dcmqi-5-segments",
    DCMQI / "segmentations" / "partial_overlaps.dcm",
    DCMQI / "segmentations" / "ct-3slice",
)
LABELMAP = Case(
    "dcmqi-labelmap",
    DCMQI / "segmentations" / "sparse-labelmap-ppv5.dcm",
    DCMQI / "segmentations" / "24x38x3" / "image",
)
CASES = [LIVER, MULTI, SMALL, HD_CT, LABELMAP]
BINARY_CASES = [LIVER, MULTI, SMALL, HD_CT]
# BINARY SEGs by other tools whose sources are not in the folder: segment descriptions only.
OTHER_BINARY = [
    DCMQI / "sr-example" / "seg.dcm",
    REFERENCE / "orthanc_tcga_gbm_seg" / "DicomSeg.dcm",
    HIGHDICOM / "seg_image_ct_binary.dcm",
]


def _raw_source(case: Case) -> list[Dataset]:
    files = [case.source] if case.source.is_file() else sorted(case.source.glob("*.dcm"))
    source = [pydicom.dcmread(f) for f in files]
    orientation = np.asarray(source[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(source, key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, dtype=float)))


@cache
def _source_cached(case: Case) -> tuple[Dataset, ...]:
    source = _raw_source(case)
    # dcmqi's ct-3slice has SpecificCharacterSet present and empty (the default repertoire); used as it is.
    return tuple(source)


def source_of(case: Case) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in _source_cached(case)]


@cache
def reference_seg(path: Path) -> hd.seg.Segmentation:
    return hd.seg.segread(path)


def segment_pixels(seg: hd.seg.Segmentation, source: list[Dataset]) -> NDArray[np.uint8]:
    """Segment numbers per source image, (Z, rows, columns), read by highdicom; where segments overlap
    (dcmqi's partial_overlaps), the highest segment number wins, as a label map can hold only one."""
    combine = str(seg.SegmentationType) == "LABELMAP"
    pixels = np.asarray(
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in source],
            combine_segments=combine,
            # dcmqi does not write SpatialLocationsPreserved; its frames do preserve them (same grid).
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )
    )
    if not combine:
        numbers = np.asarray(seg.segment_numbers, dtype=np.uint8)
        pixels = (pixels.astype(np.uint8) * numbers).max(axis=-1)
    return pixels.astype(np.uint8)


def color_of(item: Dataset) -> tuple[int, int, int]:
    """The segment's recommended display colour as RGB (a fixed one where the reference has none)."""
    if "RecommendedDisplayCIELabValue" not in item:
        return (200, 100, 50)
    lab = hd.color.CIELabColor.from_dicom_value([int(v) for v in item.RecommendedDisplayCIELabValue])
    red, green, blue = lab.to_rgb(clip=True)
    return int(red), int(green), int(blue)


def specs_of(seg: Dataset) -> list[SegmentSpec]:
    """The reference's segments as radai segment specs (label value = segment number)."""
    specs = []
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) == 0:
            continue  # the LABELMAP background item: radai's encoder writes its own
        category, kind = (
            item.SegmentedPropertyCategoryCodeSequence[0],
            item.SegmentedPropertyTypeCodeSequence[0],
        )
        specs.append(
            SegmentSpec(
                value=int(item.SegmentNumber),
                name=str(item.SegmentLabel),
                category=CodedConcept(
                    category.CodingSchemeDesignator, category.CodeValue, category.CodeMeaning
                ),
                type=CodedConcept(kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning),
                color=color_of(item),
            )
        )
    return specs


@cache
def radai_seg(case: Case, keep_empty: bool = False) -> Dataset:
    """radai's SEG over the reference's source, with the reference's label map, read back from bytes."""
    source = source_of(case)
    reference = reference_seg(case.reference)
    labels = segment_pixels(reference, source).transpose(2, 1, 0)  # (X, Y, Z) as build_seg takes it
    request = SegRequest(
        source=source,
        labels=np.ascontiguousarray(labels),
        segments=specs_of(reference),
        algorithm=ALGORITHM,
        labelmap=case.labelmap,
        keep_empty=keep_empty,
        created=CREATED,
    )
    return reread(build_seg(request))


def keywords(ds: Dataset) -> set[str]:
    return {element.keyword for element in ds if element.keyword}


def frame_groups(seg: Dataset, frame: int) -> dict[str, Dataset]:
    """The functional group items that apply to one frame: per-frame ones over shared ones."""
    groups = {e.keyword: e.value[0] for e in seg.SharedFunctionalGroupsSequence[0]}
    groups.update({e.keyword: e.value[0] for e in seg.PerFrameFunctionalGroupsSequence[frame]})
    return groups


def frame_keys(seg: Dataset) -> set[tuple[str, int, tuple[float, ...]]]:
    """Per frame: the referenced source instance, the segment (0 for LABELMAP) and the plane position."""
    out = set()
    for frame in range(int(seg.NumberOfFrames)):
        groups = frame_groups(seg, frame)
        source_image = groups["DerivationImageSequence"].SourceImageSequence[0]
        identification = groups.get("SegmentIdentificationSequence")
        number = int(identification.ReferencedSegmentNumber) if identification is not None else 0
        position = tuple(round(float(v), 3) for v in groups["PlanePositionSequence"].ImagePositionPatient)
        out.add((str(source_image.ReferencedSOPInstanceUID), number, position))
    return out


def code_key(item: Dataset) -> tuple[str, str]:
    """(scheme, value) of a code item, SNOMED-RT (SRT) codes mapped to their SNOMED CT (SCT) ids."""
    scheme, value = str(item.CodingSchemeDesignator), str(item.CodeValue)
    if scheme == "SRT" and value in snomed_mapping["SRT"]:
        return "SCT", snomed_mapping["SRT"][value]
    return scheme, value


# ---------------------------------------------------------------------------------------------- SEG


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_seg_has_the_sop_class_type_and_pixel_encoding_of_the_reference(case: Case) -> None:
    reference, ours = reference_seg(case.reference), radai_seg(case)
    for keyword in (
        "SOPClassUID",
        "SegmentationType",
        "BitsAllocated",
        "BitsStored",
        "PhotometricInterpretation",
    ):
        assert ours[keyword].value == reference[keyword].value, keyword
    assert ours.SOPClassUID == (LABELMAP_SOP_CLASS if case.labelmap else SegmentationStorage)
    assert ours.FrameOfReferenceUID == reference.FrameOfReferenceUID == source_of(case)[0].FrameOfReferenceUID


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_seg_frames_reference_the_same_source_images_and_pixels_as_the_reference(case: Case) -> None:
    reference, ours = reference_seg(case.reference), radai_seg(case)
    source = source_of(case)
    pixels = segment_pixels(reference, source)
    # radai omits frames without any segment, as dcmqi's sparse LABELMAP and partial_overlaps do; its other
    # BINARY SEGs keep one frame per segment and source image, which radai writes with keep_empty.
    non_empty = {
        frame
        for frame in frame_keys(reference)
        if any(
            ds.SOPInstanceUID == frame[0] and (pixels[k] == frame[1] if frame[1] else pixels[k] > 0).any()
            for k, ds in enumerate(source)
        )
    }
    assert frame_keys(ours) == non_empty
    if not case.labelmap and int(reference.NumberOfFrames) == len(source) * len(reference.SegmentSequence):
        assert frame_keys(radai_seg(case, keep_empty=True)) == frame_keys(reference)
    assert np.array_equal(segment_pixels(hd.seg.Segmentation.from_dataset(ours), source), pixels)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_seg_functional_groups_carry_the_items_of_the_reference(case: Case) -> None:
    reference, ours = reference_seg(case.reference), radai_seg(case)
    shared = keywords(reference.SharedFunctionalGroupsSequence[0])
    assert shared >= {"PixelMeasuresSequence", "PlaneOrientationSequence"}
    # highdicom moves SegmentIdentificationSequence to the shared group when the SEG has one segment;
    # the standard allows either place and viewers (dcmjs getSegmentIndex, highdicom) look in both.
    assert keywords(ours.SharedFunctionalGroupsSequence[0]) - {"SegmentIdentificationSequence"} == shared
    if not case.labelmap and len(ours.SegmentSequence) > 1:  # then per frame, as in every reference
        assert "SegmentIdentificationSequence" in ours.PerFrameFunctionalGroupsSequence[0]
    theirs_groups, our_groups = frame_groups(reference, 0), frame_groups(ours, 0)
    assert set(our_groups) == set(theirs_groups)
    for keyword, item in theirs_groups.items():
        extra = keywords(our_groups[keyword]) - keywords(item)
        missing = keywords(item) - keywords(our_groups[keyword])
        if keyword == "FrameContentSequence" and case.labelmap:
            # dcmqi indexes LABELMAP frames by stack; radai (highdicom) by ImagePositionPatient (below).
            assert missing == {"StackID", "InStackPositionNumber"}
        else:
            assert missing == set(), keyword
        assert extra == set(), keyword
    theirs_derivation, our_derivation = (
        theirs_groups["DerivationImageSequence"],
        our_groups["DerivationImageSequence"],
    )
    assert code_key(our_derivation.DerivationCodeSequence[0]) == code_key(
        theirs_derivation.DerivationCodeSequence[0]
    )
    theirs_image, our_image = theirs_derivation.SourceImageSequence[0], our_derivation.SourceImageSequence[0]
    # radai (highdicom) also says SpatialLocationsPreserved YES, which highdicom needs to index by source.
    assert keywords(our_image) - keywords(theirs_image) <= {"SpatialLocationsPreserved"}
    assert keywords(theirs_image) <= keywords(our_image)
    assert code_key(our_image.PurposeOfReferenceCodeSequence[0]) == code_key(
        theirs_image.PurposeOfReferenceCodeSequence[0]
    )
    assert our_image.ReferencedSOPClassUID == theirs_image.ReferencedSOPClassUID


def dimension_pointers(seg: Dataset) -> list[tuple[str, str]]:
    return [
        (
            pydicom.datadict.keyword_for_tag(item.DimensionIndexPointer),
            pydicom.datadict.keyword_for_tag(item.FunctionalGroupPointer),
        )
        for item in seg.DimensionIndexSequence
    ]


@pytest.mark.parametrize("case", BINARY_CASES, ids=lambda c: c.name)
def test_binary_seg_dimension_index_matches_the_reference(case: Case) -> None:
    assert dimension_pointers(radai_seg(case)) == dimension_pointers(reference_seg(case.reference))
    # The first index value is the frame's segment number, in the reference and in radai's SEG alike.
    for seg in (reference_seg(case.reference), radai_seg(case)):
        for frame in range(int(seg.NumberOfFrames)):
            groups = frame_groups(seg, frame)
            index = groups["FrameContentSequence"].DimensionIndexValues
            assert len(index) == 2
            assert int(index[0]) == int(groups["SegmentIdentificationSequence"].ReferencedSegmentNumber)


def test_labelmap_seg_indexes_frames_by_position_where_dcmqi_indexes_them_by_stack() -> None:
    # Both identify each frame's plane; dcmqi uses Stack ID + In-Stack Position Number, highdicom (and so
    # radai) Image Position Patient, which viewers can use without a stack model.
    assert dimension_pointers(reference_seg(LABELMAP.reference)) == [
        ("StackID", "FrameContentSequence"),
        ("InStackPositionNumber", "FrameContentSequence"),
    ]
    assert dimension_pointers(radai_seg(LABELMAP)) == [("ImagePositionPatient", "PlanePositionSequence")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_seg_references_the_source_series_as_the_reference_does(case: Case) -> None:
    reference, ours = reference_seg(case.reference), radai_seg(case)
    (theirs_series,), (our_series,) = reference.ReferencedSeriesSequence, ours.ReferencedSeriesSequence
    assert keywords(our_series) == keywords(theirs_series)
    assert our_series.SeriesInstanceUID == theirs_series.SeriesInstanceUID
    theirs = {str(i.ReferencedSOPInstanceUID) for i in theirs_series.ReferencedInstanceSequence}
    mine = {str(i.ReferencedSOPInstanceUID) for i in our_series.ReferencedInstanceSequence}
    # radai lists every source image; dcmqi's sparse LABELMAP lists only those with a frame.
    assert theirs <= mine == {str(ds.SOPInstanceUID) for ds in source_of(case)}
    assert keywords(our_series.ReferencedInstanceSequence[0]) == keywords(
        theirs_series.ReferencedInstanceSequence[0]
    )


# Segment description attributes some references carry that radai leaves out, and why that is OK.
OPTIONAL_SEGMENT_ATTRIBUTES = {
    "SegmentDescription",  # type 3; the SegmentLabel names the segment
    "AnatomicRegionSequence",  # type 3; radai's property type codes name the structure itself
}


@pytest.mark.parametrize("path", [c.reference for c in BINARY_CASES] + OTHER_BINARY, ids=lambda p: p.name)
def test_seg_segment_descriptions_carry_what_the_reference_segments_carry(path: Path) -> None:
    ours = radai_seg(LIVER).SegmentSequence[0]
    for item in pydicom.dcmread(path, stop_before_pixels=True).SegmentSequence:
        assert keywords(item) - OPTIONAL_SEGMENT_ATTRIBUTES <= keywords(ours)
        for keyword in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
            assert keywords(item[keyword].value[0]) <= keywords(ours[keyword].value[0])
        assert item.SegmentAlgorithmType in {"AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"}
    # The references' segments are manual, edited or automatic; radai's are AUTOMATIC, so they must name their
    # algorithm: by name (as dcmqi does) and by identification sequence (as highdicom does).
    assert ours.SegmentAlgorithmType == "AUTOMATIC"
    assert {"SegmentAlgorithmName", "SegmentationAlgorithmIdentificationSequence"} <= keywords(ours)
    assert len(ours.RecommendedDisplayCIELabValue) == 3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_seg_segments_have_the_reference_numbers_labels_and_codes(case: Case) -> None:
    reference, ours = reference_seg(case.reference), radai_seg(case)
    assert [int(i.SegmentNumber) for i in ours.SegmentSequence] == [
        int(i.SegmentNumber) for i in reference.SegmentSequence
    ]
    for theirs, mine in zip(reference.SegmentSequence, ours.SegmentSequence, strict=True):
        assert code_key(mine.SegmentedPropertyTypeCodeSequence[0]) == code_key(
            theirs.SegmentedPropertyTypeCodeSequence[0]
        )
        if int(theirs.SegmentNumber) == 0:
            # LABELMAP background: both say Background (DCM 125040); dcmqi files it under "Spatial and
            # Relational Concept", highdicom under Background itself. Viewers key on segment number 0.
            assert code_key(mine.SegmentedPropertyCategoryCodeSequence[0]) == ("DCM", "125040")
            continue
        assert mine.SegmentLabel == theirs.SegmentLabel
        if "RecommendedDisplayCIELabValue" in theirs:  # the reference's colour, encoded as the reference did
            assert list(mine.RecommendedDisplayCIELabValue) == list(theirs.RecommendedDisplayCIELabValue)
        assert code_key(mine.SegmentedPropertyCategoryCodeSequence[0]) == code_key(
            theirs.SegmentedPropertyCategoryCodeSequence[0]
        )


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_seg_has_no_dciodvfy_error_the_reference_does_not_have(case: Case) -> None:
    # The installed dciodvfy predates the Label Map SEG class: it reports the same two errors on dcmqi's
    # LABELMAP SEG (class unknown, background segment 0) as on radai's; BINARY SEGs have none.
    theirs = dciodvfy_errors(pydicom.dcmread(case.reference))
    assert theirs is not None
    assert dciodvfy_errors(radai_seg(case)) == theirs
    assert (theirs == []) is not case.labelmap


def test_seg_builds_on_a_source_with_an_empty_specific_character_set() -> None:
    # dcmqi's ct-3slice CT (a GE scanner's images) has (0008,0005) present and empty, meaning the default
    # repertoire; highdicom 0.28 rejects '' and radai passes the source through unchanged.
    source = _raw_source(LIVER)
    assert source[0].SpecificCharacterSet == ""
    labels = segment_pixels(reference_seg(LIVER.reference), source).transpose(2, 1, 0)
    build_seg(
        SegRequest(
            source=source,
            labels=np.ascontiguousarray(labels),
            segments=specs_of(reference_seg(LIVER.reference)),
            algorithm=ALGORITHM,
        )
    )


# ----------------------------------------------------------------------------------------------- SR

DCMQI_SR = DCMQI / "sr-example" / "sr.dcm"
DCMQI_SR_SEG = DCMQI / "sr-example" / "seg.dcm"
HD_SR = HIGHDICOM / "sr_document.dcm"
HD_SR_GROUPS = HIGHDICOM / "sr_document_with_multiple_groups.dcm"
REFERENCE_SRS = [DCMQI_SR, HD_SR, HD_SR_GROUPS]
Key = tuple[str, str]


def key(code: Code) -> Key:
    return str(code.scheme_designator), str(code.value)


IMAGING_MEASUREMENTS = key(codes.DCM.ImagingMeasurements)
MEASUREMENT_GROUP = key(codes.DCM.MeasurementGroup)
REFERENCED_SEGMENT = key(codes.DCM.ReferencedSegment)
SOURCE_SERIES = key(codes.DCM.SourceSeriesForSegmentation)
IMAGE_LIBRARY = key(codes.DCM.ImageLibrary)
IMAGE_REGION = key(codes.DCM.ImageRegion)
OBSERVER_TYPE = key(codes.DCM.ObserverType)
VOLUME = key(codes.SCT.Volume)
MEASUREMENT_METHOD = key(codes.SCT.MeasurementMethod)
QUALITATIVE_EVALUATIONS = ("UMLS", "C0034375")
# Rows of dcmqi's TID 1411 group that radai leaves out, and why that is OK.
OMITTED_GROUP_ROWS = {
    ("NCIt", "C67447"),  # Activity Session: radai reports one session, no longitudinal context
    ("UMLS", "C2348792"),  # Time Point: likewise
    ("DCM", "126100"),  # Real World Value Map: for PET SUV; radai's CT HU come from the rescale itself
    MEASUREMENT_METHOD,  # dcmqi's group-level method is the SUV body weight method (PET only)
    key(codes.SCT.FindingSite),  # radai's finding type (the segmented property type) names the structure
}


def concept(item: Dataset) -> Key | None:
    names = item.get("ConceptNameCodeSequence")
    return code_key(names[0]) if names else None


def signature(item: Dataset) -> tuple[str, str, Key | None]:
    return str(item.RelationshipType), str(item.ValueType), concept(item)


def children(item: Dataset, name: Key | None = None) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if name is None or concept(c) == name]


def measurement_groups(sr: Dataset) -> list[Dataset]:
    return [g for m in children(sr, IMAGING_MEASUREMENTS) for g in children(m, MEASUREMENT_GROUP)]


def volumetric_groups(sr: Dataset) -> list[Dataset]:
    return [g for g in measurement_groups(sr) if children(g, REFERENCED_SEGMENT)]


def planar_groups(sr: Dataset) -> list[Dataset]:
    return [g for g in measurement_groups(sr) if children(g, IMAGE_REGION)]


def sections(sr: Dataset) -> list[str]:
    """The root's children in order, one entry per run of the same row (observation context items as one)."""
    out: list[str] = []
    for item in sr.ContentSequence:
        name = "observation context" if item.RelationshipType == "HAS OBS CONTEXT" else str(concept(item))
        if not out or out[-1] != name:
            out.append(name)
    return out


def evidence(sr: Dataset) -> dict[str, str]:
    """SOP instance UID -> SOP class UID of every instance in CurrentRequestedProcedureEvidenceSequence."""
    return {
        str(i.ReferencedSOPInstanceUID): str(i.ReferencedSOPClassUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }


def evidence_series(sr: Dataset) -> dict[str, set[str]]:
    """Series instance UID -> its SOP instance UIDs in CurrentRequestedProcedureEvidenceSequence."""
    out: dict[str, set[str]] = {}
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            uids = {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence}
            out.setdefault(str(series.SeriesInstanceUID), set()).update(uids)
    return out


@cache
def reference_sr(path: Path) -> Dataset:
    return pydicom.dcmread(path)


@cache
def radai_sr() -> Dataset:
    """radai's SR on its SEG of dcmqi's 5-segment CT example, with a planar region per finding."""
    from radai.pipeline import key_region  # here: importing the pipeline loads the runtime (seconds)

    source, seg = source_of(MULTI), radai_seg(MULTI)
    labels = segment_pixels(reference_seg(MULTI.reference), source).transpose(2, 1, 0)
    rows_mm, columns_mm = (float(v) for v in source[0].PixelSpacing)
    positions = np.array([ds.ImagePositionPatient for ds in source], dtype=float)
    voxel_ml = rows_mm * columns_mm * float(np.linalg.norm(positions[1] - positions[0])) / 1000.0
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in source])
    volumes, means = measure_volumes(labels, voxel_ml), measure_means(labels, hu.transpose(2, 1, 0))
    numbers = segment_numbers(seg)
    measurements = [
        SegmentMeasurement(
            segment_number=numbers[spec.value],
            name=spec.name,
            type=spec.type,
            volume_ml=volumes[spec.value],
            mean_value=means[spec.value],
            key_region=key_region(labels, spec.value, source, None),
        )
        for spec in specs_of(seg)
        if spec.value in numbers
    ]
    return reread(
        build_sr(
            SrRequest(seg=seg, source=source, measurements=measurements, algorithm=ALGORITHM, created=CREATED)
        )
    )


def test_sr_has_the_sop_class_template_and_root_concept_of_the_references() -> None:
    ours = radai_sr()
    # dcmqi writes Comprehensive SR, highdicom Comprehensive 3D SR; TID 1500 allows both and radai is the latter.
    assert ours.SOPClassUID in {reference_sr(p).SOPClassUID for p in REFERENCE_SRS}
    assert ours.SOPClassUID == reference_sr(HD_SR).SOPClassUID
    for path in REFERENCE_SRS:
        theirs = reference_sr(path)
        (template,), (their_template,) = ours.ContentTemplateSequence, theirs.ContentTemplateSequence
        assert (template.MappingResource, template.TemplateIdentifier) == (
            their_template.MappingResource,
            their_template.TemplateIdentifier,
        )
        assert concept(ours) == concept(theirs)
        assert ours.ValueType == theirs.ValueType == "CONTAINER"
    # The root's continuity: SEPARATE in dcmqi's report, CONTINUOUS in highdicom's (and radai's); the items
    # are independent measurements either way and viewers do not read it.
    assert ours.ContinuityOfContent in {reference_sr(p).ContinuityOfContent for p in REFERENCE_SRS}
    assert ours.ContinuityOfContent == reference_sr(HD_SR).ContinuityOfContent
    # Like both references, radai's report is UNVERIFIED; unlike them it is COMPLETE (nothing left to add).
    assert (
        ours.VerificationFlag
        == reference_sr(DCMQI_SR).VerificationFlag
        == reference_sr(HD_SR).VerificationFlag
    )


def test_sr_root_content_has_the_rows_of_the_references_in_their_order() -> None:
    ours = sections(radai_sr())
    assert sections(reference_sr(DCMQI_SR)) == sections(reference_sr(HD_SR))
    # radai adds one TID 1500 row after them: Qualitative Evaluations with its "not verified" comment.
    assert ours == [*sections(reference_sr(DCMQI_SR)), str(QUALITATIVE_EVALUATIONS)]
    (language,) = children(radai_sr(), key(codes.DCM.LanguageOfContentItemAndDescendants))
    (their_language,) = children(reference_sr(DCMQI_SR), key(codes.DCM.LanguageOfContentItemAndDescendants))
    # Same row; the value is RFC 3066 "eng" plus a country modifier in dcmqi, RFC 5646 "en-US" in highdicom.
    assert signature(language) == signature(their_language)


def test_sr_observer_is_a_device_as_in_highdicom_where_dcmqi_names_a_person() -> None:
    def observer_types(sr: Dataset) -> set[Key]:
        return {code_key(i.ConceptCodeSequence[0]) for i in children(sr, OBSERVER_TYPE)}

    # An AI result has no human observer: radai names the algorithm's device, one of highdicom's types.
    assert observer_types(radai_sr()) == {key(codes.cid270.Device)}
    assert observer_types(radai_sr()) <= observer_types(reference_sr(HD_SR))
    assert observer_types(reference_sr(DCMQI_SR)) == {key(codes.cid270.Person)}


def test_sr_image_library_lists_the_source_images_as_dcmqi_does() -> None:
    # In both, the library lists exactly the evidence instances of the series the SEG was made on.
    for sr in (reference_sr(DCMQI_SR), radai_sr()):
        (series,) = {str(children(g, SOURCE_SERIES)[0].UID) for g in volumetric_groups(sr)}
        (library,) = children(sr, IMAGE_LIBRARY)
        (group,) = children(library)
        entries = [c for c in children(group) if c.ValueType == "IMAGE"]
        assert {str(e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for e in entries} == evidence_series(
            sr
        )[series]
        assert all(e.RelationshipType == "CONTAINS" for e in entries)
    assert evidence_series(radai_sr())[str(source_of(MULTI)[0].SeriesInstanceUID)] == {
        str(ds.SOPInstanceUID) for ds in source_of(MULTI)
    }
    their_group, our_group = (
        children(children(sr, IMAGE_LIBRARY)[0])[0] for sr in (reference_sr(DCMQI_SR), radai_sr())
    )
    descriptors = {signature(c) for c in children(our_group) if c.ValueType != "IMAGE"}
    # Group-level TID 1602 descriptors: radai writes Modality and Frame of Reference, a subset of dcmqi's
    # (which adds dates, matrix size and PET radiopharmaceutical); they are optional.
    assert descriptors and descriptors <= {
        signature(c) for c in children(their_group) if c.ValueType != "IMAGE"
    }
    # dcmqi's entries have no concept name; highdicom's (radai's) are named "Source" (SCT 260753009).
    assert {concept(c) for c in children(their_group) if c.ValueType == "IMAGE"} == {None}


def test_sr_volumetric_groups_have_the_rows_of_dcmqis_group() -> None:
    (theirs,) = volumetric_groups(reference_sr(DCMQI_SR))
    expected = {
        signature(c)
        for c in children(theirs)
        if c.ValueType != "NUM" and concept(c) not in OMITTED_GROUP_ROWS
    }
    once = {
        concept(c) for c in children(theirs) if [concept(x) for x in children(theirs)].count(concept(c)) == 1
    }
    assert {REFERENCED_SEGMENT, SOURCE_SERIES, key(codes.DCM.TrackingUniqueIdentifier)} <= {
        s[2] for s in expected
    }
    groups = volumetric_groups(radai_sr())
    assert len(groups) == len(radai_seg(MULTI).SegmentSequence) == 5
    for group in groups:
        assert expected <= {signature(c) for c in children(group)}
        for name in {concept(c) for c in children(group)} & once - {None}:
            assert len(children(group, name)) == 1, name


def test_sr_volumetric_group_rows_come_in_highdicoms_order_where_dcmqi_follows_the_template_rows() -> None:
    def order(group: Dataset) -> list[str]:
        kinds = {REFERENCED_SEGMENT: "segment", SOURCE_SERIES: "series", key(codes.DCM.Finding): "finding"}
        names = [
            kinds.get(concept(c) or ("", ""), "num" if c.ValueType == "NUM" else "") for c in children(group)
        ]
        runs = [n for n in names if n]
        return [n for i, n in enumerate(runs) if i == 0 or runs[i - 1] != n]

    # In both the finding comes first and the source series right after the segment reference. dcmqi puts the
    # references before the measurements, as TID 1411 lists its rows; highdicom (and so radai) after them.
    # highdicom's own reader finds the rows by concept name, in either order; radai keeps highdicom's order.
    # If a consumer turns out to need TID 1411's row order, this assertion is the one to change.
    assert order(volumetric_groups(reference_sr(DCMQI_SR))[0]) == ["finding", "segment", "series", "num"]
    for group in volumetric_groups(radai_sr()):
        assert order(group) == ["finding", "num", "segment", "series"]


def test_sr_groups_reference_segments_and_source_series_as_dcmqi_does() -> None:
    for sr, seg in (
        (reference_sr(DCMQI_SR), pydicom.dcmread(DCMQI_SR_SEG, stop_before_pixels=True)),
        (radai_sr(), radai_seg(MULTI)),
    ):
        numbers = []
        for group in volumetric_groups(sr):
            (segment,) = children(group, REFERENCED_SEGMENT)
            (reference,) = segment.ReferencedSOPSequence
            assert keywords(reference) == {
                "ReferencedSOPClassUID",
                "ReferencedSOPInstanceUID",
                "ReferencedSegmentNumber",
            }
            assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
                seg.SOPClassUID,
                seg.SOPInstanceUID,
            )
            numbers.append(int(reference.ReferencedSegmentNumber))
            # The group's Finding is the referenced segment's property type, in dcmqi's report and radai's.
            (segment_item,) = (
                i for i in seg.SegmentSequence if i.SegmentNumber == reference.ReferencedSegmentNumber
            )
            (finding,) = children(group, key(codes.DCM.Finding))
            assert code_key(finding.ConceptCodeSequence[0]) == code_key(
                segment_item.SegmentedPropertyTypeCodeSequence[0]
            )
            (series,) = children(group, SOURCE_SERIES)
            assert str(series.UID) == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert set(numbers) <= {int(i.SegmentNumber) for i in seg.SegmentSequence}
        assert len(set(numbers)) == len(numbers)


def test_sr_volume_is_a_num_with_dcmqis_concept_and_ucum_unit() -> None:
    def volume(group: Dataset) -> Dataset:
        (item,) = children(group, VOLUME)
        return item

    their_volume = volume(volumetric_groups(reference_sr(DCMQI_SR))[0])
    their_value = their_volume.MeasuredValueSequence[0]
    for group in volumetric_groups(radai_sr()):
        ours = volume(group)
        assert signature(ours) == signature(their_volume)
        (value,) = ours.MeasuredValueSequence
        assert keywords(their_value) <= keywords(value)
        assert code_key(value.MeasurementUnitsCodeSequence[0]) == code_key(
            their_value.MeasurementUnitsCodeSequence[0]
        )
        for num in (c for c in children(group) if c.ValueType == "NUM"):
            assert (
                num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
            )
        # dcmqi qualifies its volume with Measurement Method "Sum of segmented voxel volumes" (DCM 126030);
        # radai's is the same computation but does not say so (optional row; reported to the lead).
        assert children(ours, MEASUREMENT_METHOD) == []
    assert [code_key(c.ConceptCodeSequence[0]) for c in children(their_volume, MEASUREMENT_METHOD)] == [
        ("DCM", "126030")
    ]


def test_sr_planar_groups_outline_the_finding_as_highdicoms_planar_group_does() -> None:
    # dcmqi's report has volumetric groups only; radai adds one planar group per finding (same tracking UID)
    # because viewers that draw measurements on images need a planar region (see radai.results.sr).
    assert planar_groups(reference_sr(DCMQI_SR)) == []
    (theirs,) = planar_groups(reference_sr(HD_SR))
    (their_region,) = children(theirs, IMAGE_REGION)
    ours = planar_groups(radai_sr())
    tracking = key(codes.DCM.TrackingUniqueIdentifier)
    volumetric_uids = {children(g, tracking)[0].UID for g in volumetric_groups(radai_sr())}
    assert len(ours) == len(volumetric_uids) == 5
    for group in ours:
        assert children(group, tracking)[0].UID in volumetric_uids
        names = {signature(c) for c in children(group)}
        assert {
            signature(c) for c in children(theirs) if c.ValueType in {"TEXT", "UIDREF", "SCOORD"}
        } <= names
        (region,) = children(group, IMAGE_REGION)
        # highdicom's older file also has PixelOriginInterpretation, which is required for whole slide
        # microscopy images only (its newer file, like radai's, has none for CT).
        assert keywords(their_region) - {"PixelOriginInterpretation"} <= keywords(region)
        assert (
            "PixelOriginInterpretation"
            not in children(planar_groups(reference_sr(HD_SR_GROUPS))[0], IMAGE_REGION)[0]
        )
        # The selected-from image's concept name differs between highdicom versions; its role does not.
        assert [(c.RelationshipType, c.ValueType) for c in children(region)] == [
            (c.RelationshipType, c.ValueType) for c in children(their_region)
        ]
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in evidence(
            radai_sr()
        )


def test_sr_evidence_lists_the_seg_and_source_images_as_dcmqi_does() -> None:
    def levels(sr: Dataset) -> list[set[str]]:
        study = sr.CurrentRequestedProcedureEvidenceSequence[0]
        series = study.ReferencedSeriesSequence[0]
        return [keywords(study), keywords(series), keywords(series.ReferencedSOPSequence[0])]

    assert levels(radai_sr()) == levels(reference_sr(DCMQI_SR))
    for sr in (reference_sr(DCMQI_SR), radai_sr()):
        listed = evidence(sr)
        for group in volumetric_groups(sr):
            segment = children(group, REFERENCED_SEGMENT)[0].ReferencedSOPSequence[0]
            assert listed[str(segment.ReferencedSOPInstanceUID)] == segment.ReferencedSOPClassUID
    # dcmqi also lists its PET Real World Value Map; radai lists exactly its SEG and the source images.
    expected = {str(radai_seg(MULTI).SOPInstanceUID)} | {str(ds.SOPInstanceUID) for ds in source_of(MULTI)}
    assert set(evidence(radai_sr())) == expected


def radai_notice(source: list[Dataset]) -> Dataset:
    request = NoticeRequest(source=source, algorithm=ALGORITHM, reason="model failed", created=CREATED)
    return reread(build_notice(request))


def test_not_run_notice_is_a_tid_1500_report_with_dcmqis_rows_but_no_measurements() -> None:
    ours, theirs = radai_notice(source_of(LIVER)), reference_sr(DCMQI_SR)
    assert ours.SOPClassUID == theirs.SOPClassUID  # Comprehensive SR, as dcmqi's report
    (template,), (their_template,) = ours.ContentTemplateSequence, theirs.ContentTemplateSequence
    assert (template.MappingResource, template.TemplateIdentifier) == (
        their_template.MappingResource,
        their_template.TemplateIdentifier,
    )
    assert concept(ours) == concept(theirs)
    # TID 1500 needs Imaging Measurements or Qualitative Evaluations: the notice has only the latter.
    rows = sections(theirs)
    assert rows[-1] == str(IMAGING_MEASUREMENTS)
    assert sections(ours) == [*rows[:-1], str(QUALITATIVE_EVALUATIONS)]
    assert set(evidence(ours)) == {str(ds.SOPInstanceUID) for ds in source_of(LIVER)}


def test_not_run_notice_builds_on_a_source_with_an_empty_specific_character_set() -> None:
    # As for the SEG: the notice copies the first source image's (0008,0005); '' is refused by highdicom.
    source = _raw_source(LIVER)
    assert source[0].SpecificCharacterSet == ""
    radai_notice(source)
