"""SIA image service: a gRPC gateway to image-generation providers."""

from __future__ import annotations

__version__ = "1.0.0"
