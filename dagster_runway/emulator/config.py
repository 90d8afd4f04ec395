"""The emulator's configuration."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from dagster_runway.emulator.catalog import CatalogEntry, PriceUnit
from dagster_runway.emulator.faults import FaultRule
from dagster_runway.schema import INPUT_SCHEMA, MODEL_ID


class EmulatorConfig(BaseModel):
    """How the local RunComfy emulator behaves: accounts, timings, rendering, prices and faults."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[str] = Field(
        default_factory=lambda: ["emulator-token"],
        min_length=1,
        description="API tokens the emulator accepts; each token is its own account.",
    )
    model_id: str = Field(default=MODEL_ID, description="The one model id the emulator serves.")
    time_scale: float = Field(
        default=1.0,
        ge=0.0,
        description="Factor on every queue and render time: 1 is realistic, 0 finishes each request as soon "
        "as its video is rendered.",
    )
    queue_seconds: tuple[float, float] = Field(
        default=(0.0, 5.0),
        description="Range of the uniform queue wait before a request may start, in seconds.",
    )
    render_seconds: tuple[float, float] = Field(
        default=(30.0, 90.0),
        description="Range of the uniform in-progress time of a 5 s video, in seconds; a 10 s video takes "
        "long_render_factor times as long.",
    )
    long_render_factor: float = Field(
        default=1.6, gt=0.0, description="How much longer a 10 s video stays in progress than a 5 s one."
    )
    max_concurrency: int = Field(
        default=4,
        ge=1,
        description="Requests of one account in progress at once; the rest wait in the queue.",
    )
    paused: bool = Field(
        default=False, description="Start paused: requests stay where they are until resume()."
    )
    video_scale: float = Field(
        default=0.25,
        gt=0.0,
        le=1.0,
        description="Output size as a fraction of the ratio's pixel size (0.25 renders 1280:720 as 320x180).",
    )
    fps: int = Field(default=8, ge=1, le=60, description="Frames per second of the rendered videos.")
    reuse_renders: bool = Field(
        default=False,
        description="Render one clip per ratio and duration (from the first image that asks) and serve each "
        "later request a copy of it: for benchmarks at 10,000 images, where rendering is the emulator's cost, "
        "not the client's. Images are still fetched and checked; every video of a size is then the same clip.",
    )
    price_usd: float = Field(
        default=0.05,
        ge=0.0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("price_usd", "price_per_second"),
        description="USD charged per price_unit, and the catalog's base_price_usd (price_per_second is its "
        "older name).",
    )
    price_unit: PriceUnit = Field(
        default="second",
        description="What price_usd is per: 'second' of output video (a 10 s video costs twice a 5 s one) or "
        "'output' (one price per video).",
    )
    bill_failed: bool = Field(
        default=True,
        description="Whether a failed generation stays charged. RunComfy does not document it (reference "
        "§10, §14); Runway's web app returns the credits of failed generations, fal does not bill 5xx "
        "failures and Replicate does not charge aborted runs, but none of that binds RunComfy. True, the "
        "default, is the assumption that never lets a spend cap overshoot. Either way the ledger and "
        "/result?include_cost=true agree: a failed result states the cost the ledger keeps (0 when "
        "refunded).",
    )
    input_schema: dict[str, Any] = Field(
        default_factory=lambda: copy.deepcopy(INPUT_SCHEMA),
        description="The served model's input_schema in the catalog: the seed's published schema by default. "
        "Another one changes what the catalog says, not what the emulator accepts (to test schema drift).",
    )
    catalog: list[CatalogEntry] = Field(
        default_factory=list,
        description="Other models the catalog lists (see load_catalog_file); those whose input_schema is an "
        "image-to-video model's are served too, at their own price (see emulator/catalog_models.py).",
    )
    balance_usd: float | None = Field(
        default=None,
        ge=0.0,
        description="Credit of each account in USD; a submit that would exceed it is refused. None is unlimited.",
    )
    latency_seconds: float = Field(
        default=0.0,
        ge=0.0,
        description="Delay added to every API and file answer, to model an internet round trip.",
    )
    ttl_seconds: float = Field(
        default=7 * 86400,
        gt=0.0,
        description="How long requests and their videos are kept, on the emulator clock; then they are 404.",
    )
    faults: list[FaultRule] = Field(default_factory=list, description="Fault rules active from the start.")
    state_dir: str | None = Field(
        default=None,
        description="Directory that keeps the requests, the ledger, the clock and the videos across restarts "
        "(emulator.sqlite3 and files/), written before each answer; one emulator at a time. None keeps "
        "them in memory and a temporary directory, gone at stop.",
    )
    random_seed: int | None = Field(
        default=None, description="Seed for timings and fault draws; None draws a fresh one."
    )
    auth_error_status: int = Field(
        default=401, ge=400, le=499, description="HTTP status for a missing or unknown token (code 400004)."
    )
    insufficient_balance_status: int = Field(
        default=402, ge=400, le=499, description="HTTP status when the balance is too low (code 400002)."
    )
    allow_any_http: bool = Field(
        default=False,
        description="Accept http:// image URLs on any host; by default only loopback hosts may use http.",
    )
    fetch_timeout_seconds: float = Field(
        default=10.0, gt=0.0, description="Timeout for fetching a promptImage URL."
    )

    @model_validator(mode="after")
    def _check_catalog(self) -> EmulatorConfig:
        ids = [self.model_id, *(entry.model_id for entry in self.catalog)]
        twice = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
        if twice:
            raise ValueError(
                f"catalog lists {', '.join(twice)} more than once (the served model's entry is made from "
                "price_usd, price_unit and input_schema: leave it out of the catalog)"
            )
        return self

    @field_validator("queue_seconds", "render_seconds")
    @classmethod
    def _check_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if low < 0 or high < low:
            raise ValueError(f"range {value} must be (low, high) with 0 <= low <= high")
        return value
