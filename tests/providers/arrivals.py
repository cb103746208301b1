"""A recording `on_image` callback for provider tests."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sia.domain import GeneratedImage


class Arrivals:
    """An `on_image` callback recording each image with when it came (`time.monotonic()`).

    With `error` it raises that, after recording, at the first image.
    """

    def __init__(self, error: Exception | None = None) -> None:
        self.images: list[GeneratedImage] = []
        self.times: list[float] = []
        self._error = error

    async def __call__(self, image: GeneratedImage) -> None:
        self.images.append(image)
        self.times.append(time.monotonic())
        if self._error is not None:
            raise self._error

    @property
    def indexes(self) -> list[int]:
        """The index of each image, in the order they came."""
        return [image.index for image in self.images]
