"""radai: radiology AI inference server."""

__version__ = "0.1.0"
