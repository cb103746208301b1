"""Generated images on their way to the caller: into the blob store, and back as links or bytes.

`ImageKeeper` moves image bytes a provider returned into the blob store
(linking each image to its blob), one image as it arrives or a whole result,
and fills stored images back in as URLs or bytes when a result is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from sia.domain import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ImageError,
    ResponseFormat,
)
from sia.errors import ImageStoreUnavailable, NotFound
from sia.logs import get_logger

if TYPE_CHECKING:
    from sia.storage.base import BlobStore

log = get_logger("sia.images")

_EXPIRED = ImageError("IMAGE_EXPIRED", "the stored image has expired")
#: Waits (seconds) before a task's store attempts after the first. A blip keeps the
#: billed images; the total stays well inside the 30 s a Redis job has past IMAGE_TIMEOUT.
STORE_RETRY_DELAYS = (1.0, 3.0, 8.0)


class ImageKeeper:
    """Stores image bytes in the blob store and reads stored images back."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    async def keep(self, image: GeneratedImage) -> GeneratedImage:
        """`image` with its bytes moved to the blob store (unchanged when it has none)."""
        if not image.data:
            return image
        key = await self.store.put(image.data, image.content_type)
        return dataclasses.replace(image, blob_key=key, url=self.store.url(key), data=b"")

    async def keep_all(
        self, result: GenerationResult, *, retry_delays: tuple[float, ...] = ()
    ) -> GenerationResult:
        """`result` with every image's bytes in the blob store.

        After an `ImageStoreUnavailable` the images not yet stored are tried
        again after each of `retry_delays` (seconds); then the error is raised.
        """
        if not any(image.data for image in result.images):
            return result  # URL results, or kept already: nothing to store
        images = list(result.images)
        for delay in (*retry_delays, None):
            outcomes = await asyncio.gather(*map(self.keep, images), return_exceptions=True)
            failure: ImageStoreUnavailable | None = None
            for index, outcome in enumerate(outcomes):
                if isinstance(outcome, ImageStoreUnavailable):
                    failure = outcome  # keep the bytes; the next round tries this image again
                elif isinstance(outcome, BaseException):
                    raise outcome  # anything else is not the store's fault to wait out
                else:
                    images[index] = outcome
            if failure is None:
                break
            if delay is None:
                raise failure
            log.warning("image_store_retry", delay_seconds=delay, error=failure.message)
            await asyncio.sleep(delay)
        return dataclasses.replace(result, images=tuple(images))

    async def materialize(
        self, result: GenerationResult, response_format: ResponseFormat
    ) -> GenerationResult:
        """Fill in each stored image's URL, or its bytes for B64_JSON."""

        async def fill(image: GeneratedImage) -> GeneratedImage:
            if not image.blob_key:
                return image
            if response_format is ResponseFormat.URL:
                return dataclasses.replace(image, url=self.store.url(image.blob_key))
            try:
                data = await self.store.get(image.blob_key)
            except NotFound:
                return dataclasses.replace(image, error=_EXPIRED)
            return dataclasses.replace(image, url="", data=data)

        images = await asyncio.gather(*(fill(image) for image in result.images))
        return dataclasses.replace(result, images=tuple(images))


def as_bytes(request: GenerationRequest) -> GenerationRequest:
    """The same request, asking the provider for image bytes instead of its URLs."""
    return dataclasses.replace(request, response_format=ResponseFormat.B64_JSON)


def with_images(result: GenerationResult, kept: dict[int, GeneratedImage]) -> GenerationResult:
    """`result` with the images already kept (by index) in place of its own."""
    if not kept:
        return result
    images = tuple(kept.get(image.index, image) for image in result.images)
    return dataclasses.replace(result, images=images)
