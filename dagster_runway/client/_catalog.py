"""The catalog's answers: ``GET /v1/models/{model_id}`` and ``GET /v1/models``.

Tolerant like the other response models: unknown fields are kept, optional fields may be missing, and
a ``price_unit`` other than ``second`` or ``output`` is kept as sent (``estimate_usd`` then gives no
estimate rather than a wrong one). Only what cannot be read safely is refused: a price that is not a
finite number of 0 or more.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ModelInfo(BaseModel):
    """One model as the catalog describes it: its price and its input schema."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model_id: str = Field(min_length=1)
    display_name: str | None = None
    categories: list[str] = Field(default_factory=list)
    base_price_usd: float | None = Field(default=None, description="USD per price_unit.")
    price_unit: str | None = Field(default=None, description="'second' (of output video) or 'output'.")
    pricing_note: str | None = None
    input_schema: dict[str, Any] | None = None
    model_url: str | None = None

    @field_validator("base_price_usd", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Any:
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"base_price_usd must be a finite JSON number of 0 or more, got {value!r:.40}")
        return float(value)

    def estimate_usd(self, duration: int) -> float | None:
        """What one video of ``duration`` seconds costs at this price; None when the price or its unit is
        unknown."""
        if self.base_price_usd is None:
            return None
        if self.price_unit == "second":
            return round(self.base_price_usd * duration, 6)
        if self.price_unit == "output":
            return self.base_price_usd
        return None


class ModelPage(BaseModel):
    """One page of ``GET /v1/models``: the models, and how many match in all."""

    model_config = ConfigDict(extra="allow", frozen=True)

    models: list[ModelInfo]
    total: int | None = Field(default=None, ge=0)
    limit: int | None = None
    offset: int | None = None
