"""The one exception tree of radai. Adapters translate foreign exceptions into these at their boundary."""

from __future__ import annotations


class RadaiError(Exception):
    """Base of every error radai raises on purpose; its message is one line fit for a user."""


class ConfigError(RadaiError):
    """The configuration file or an environment override is invalid."""


class ModelPackageError(RadaiError):
    """A model package or card is invalid, or its files do not match the card."""


class NotAVolumeError(RadaiError):
    """A series cannot be assembled into a regular 3-D volume (tilt, gaps, mixed orientation...)."""


class InferenceError(RadaiError):
    """A model failed to run or returned something unusable."""


class OutOfMemoryError(InferenceError):
    """The device ran out of memory for a batch (the scheduler splits the batch and retries)."""


class InferenceTimeoutError(InferenceError):
    """A batch did not come back within `scheduler.inference_timeout_seconds`."""


class EncodingError(RadaiError):
    """A result object could not be built or failed validation."""


class DeliveryError(RadaiError):
    """A result could not be delivered to a destination."""


class NotFoundError(RadaiError):
    """A requested study, job or model does not exist."""


class AuditTamperedError(RadaiError):
    """The audit log's hash chain is broken: a record was changed or removed outside radai."""
