"""Named DIMSE status codes (DICOM PS3.7 Annex C, PS3.4 Table B.2-1) and their categories."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """DIMSE statuses that the router sends or interprets.

    C-STORE ranges: 0xA7xx refused (out of resources), 0xA9xx error (data set does not match the SOP
    class), 0xCxxx error (cannot understand), 0xB0xx warnings; the 0x01xx/0x02xx codes are general.
    """

    SUCCESS = 0x0000
    # Warnings: the instance was stored.
    WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
    # Failures.
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213


def is_success(status: int) -> bool:
    """True for 0x0000."""
    return status == Status.SUCCESS


def is_warning(status: int) -> bool:
    """True for the C-STORE warning range (0xB000-0xBFFF) and 0x0001 (general warning)."""
    return 0xB000 <= status <= 0xBFFF or status == 0x0001


def is_stored(status: int) -> bool:
    """True when a C-STORE response means the peer kept the instance (success or warning)."""
    return is_success(status) or is_warning(status)


def is_failure(status: int) -> bool:
    """True when a C-STORE response means the instance was not stored (anything but success/warning;
    0xFF00/0xFF01 pending codes never answer a C-STORE and are treated as failures here)."""
    return not is_stored(status)


def describe(status: int) -> str:
    """A short human-readable name for a status code, e.g. ``'0xA700 OUT_OF_RESOURCES'``."""
    try:
        name = Status(status).name
    except ValueError:
        if 0xA700 <= status <= 0xA7FF:
            name = "OUT_OF_RESOURCES"
        elif 0xA900 <= status <= 0xA9FF:
            name = "DATASET_DOES_NOT_MATCH_SOP_CLASS"
        elif 0xC000 <= status <= 0xCFFF:
            name = "CANNOT_UNDERSTAND"
        elif is_warning(status):
            name = "WARNING"
        else:
            name = "UNKNOWN"
    return f"0x{status:04X} {name}"
