"""UID validation and DIMSE status helpers."""

from __future__ import annotations

import pytest

from dicom_router.statuses import Status, describe, is_failure, is_stored, is_warning
from dicom_router.uids import is_valid_uid, uid_fingerprint


@pytest.mark.parametrize(
    "uid",
    [
        "0",
        "1.2",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.0.3",
        "2.25.329800735698586629295641978511506172918",
        "1." + "1" * 62,
    ],
)
def test_valid_uids_are_accepted(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1..2",
        ".1.2",
        "1.2.",
        "1.02",
        "01.2",
        "1.2a",
        "1.2\n",
        "../../etc/passwd",
        "1/2",
        "1.2 ",
        "1." + "1" * 63,  # 65 characters
    ],
)
def test_invalid_uids_are_rejected(uid: str) -> None:
    assert not is_valid_uid(uid)


def test_uid_fingerprint_is_stable_short_and_does_not_contain_the_uid() -> None:
    uid = "1.2.840.113619.2.55.3.1234"
    assert uid_fingerprint(uid) == uid_fingerprint(uid)
    assert len(uid_fingerprint(uid)) == 12
    assert "1.2.840" not in uid_fingerprint(uid)
    assert uid_fingerprint(uid) != uid_fingerprint(uid + "1")


def test_named_statuses_have_their_standard_codes() -> None:
    assert int(Status.SUCCESS) == 0x0000
    assert int(Status.OUT_OF_RESOURCES) == 0xA700
    assert int(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS) == 0xA900
    assert int(Status.CANNOT_UNDERSTAND) == 0xC000
    assert int(Status.PROCESSING_FAILURE) == 0x0110


@pytest.mark.parametrize(
    ("code", "stored", "warning"),
    [
        (0x0000, True, False),
        (0xB000, True, True),
        (0xB007, True, True),
        (0xA700, False, False),
        (0xA7FF, False, False),
        (0xC123, False, False),
        (0x0110, False, False),
        (0xFF00, False, False),
    ],
)
def test_status_categories(code: int, stored: bool, warning: bool) -> None:
    assert is_stored(code) is stored
    assert is_failure(code) is not stored
    assert is_warning(code) is warning


def test_describe_names_ranges_and_exact_codes() -> None:
    assert describe(0xA700) == "0xA700 OUT_OF_RESOURCES"
    assert describe(0xA7FE) == "0xA7FE OUT_OF_RESOURCES"
    assert describe(0xC211) == "0xC211 CANNOT_UNDERSTAND"
    assert describe(0x1234) == "0x1234 UNKNOWN"
