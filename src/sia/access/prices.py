"""What an image costs, by model: the estimate budgets and usage are counted in.

The defaults are the providers' list prices per generated image
(docs/access-control.md#prices says where each comes from); MODEL_PRICES
overrides or extends them. Providers bill generated images only: a failed
image costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sia.access.base import MICROS

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Price per generated image, in the provider's billing currency (Ark: CNY, OpenAI: USD).
DEFAULT_PRICES: dict[str, float] = {
    "doubao-seedream-4-0-250828": 0.20,
    "doubao-seedream-4-5-251128": 0.25,
    "doubao-seedream-3-0-t2i-250415": 0.259,
    "doubao-seededit-3-0-i2i-250628": 0.30,
    "gpt-image-1": 0.042,
    "gpt-image-1-mini": 0.011,
    "dall-e-3": 0.04,
    "dall-e-2": 0.02,
}


class PriceTable:
    """Per-image prices in micros; a model missing from the table costs 0."""

    def __init__(self, overrides: Mapping[str, float] | None = None) -> None:
        prices = {**DEFAULT_PRICES, **(overrides or {})}
        self._micros = {model: round(price * MICROS) for model, price in prices.items()}

    def cost_micros(self, model: str, images: int) -> int:
        """The price of `images` images of `model`, in micros."""
        return self._micros.get(model, 0) * images
