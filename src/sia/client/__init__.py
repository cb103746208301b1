"""sia.client: a typed Python client for SIA's image.v1.ImageService.

    from sia.client import Client

    with Client("localhost:8080", api_key="sia_...") as sia:
        result = sia.generate_image("a lighthouse at dusk", size="2K")
        result.images[0].save("lighthouse.jpg")

Client is blocking, AsyncClient is asyncio; both take the same arguments and have the
same methods. The package needs grpcio, protobuf and grpcio-status only, never the
server's dependencies. Errors: sia.client.errors (one root, SiaError).
"""

from __future__ import annotations

from sia.client._channel import IDEMPOTENT_METHODS, service_config
from sia.client._requests import ImageInput, Period, ResponseFormat, image_reference
from sia.client.aio import AsyncClient
from sia.client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    DownloadError,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    SiaError,
    Unauthenticated,
    Unavailable,
)
from sia.client.results import (
    Completed,
    Health,
    Image,
    ImageFailure,
    ModelUsage,
    Result,
    StreamEvent,
    Task,
    TaskPage,
    TaskStatus,
    Usage,
    UsageReport,
)
from sia.client.sync import Client

__all__ = [
    "IDEMPOTENT_METHODS",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "Completed",
    "DeadlineExceeded",
    "DownloadError",
    "FailedPrecondition",
    "FieldViolation",
    "Health",
    "Image",
    "ImageFailure",
    "ImageInput",
    "Internal",
    "InvalidArgument",
    "ModelUsage",
    "NotFound",
    "Period",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "ResponseFormat",
    "Result",
    "SiaError",
    "StreamEvent",
    "Task",
    "TaskPage",
    "TaskStatus",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "UsageReport",
    "image_reference",
    "service_config",
]
