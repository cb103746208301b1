"""The provider seam: what the service needs from an image-generation upstream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sia.domain import GenerationRequest, GenerationResult, OnImage
    from sia.models import ModelSpec


class ImageProvider(Protocol):
    """An upstream that turns a validated request into images.

    A provider returns each image either as a URL it hosts or as bytes; the
    service decides how to hand them to the caller. Failures are raised as
    `sia.errors.SiaError` subclasses; per-image failures of a group come back
    as images with an `error`.
    """

    @property
    def name(self) -> str:
        """Short name shown in health answers and metrics, e.g. "offline"."""
        ...

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        """The models this provider serves, by id."""
        ...

    async def generate(
        self, request: GenerationRequest, *, timeout: float, on_image: OnImage | None = None
    ) -> GenerationResult:
        """Generate the images of `request`, giving up after `timeout` seconds.

        `on_image` is awaited with each image (or per-image error) as soon as the
        provider has it, in the order produced, before `generate` returns them all:
        a streamed group as each event arrives, others as they are made. It is
        never called for an attempt that is then retried.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; idempotent."""
        ...
