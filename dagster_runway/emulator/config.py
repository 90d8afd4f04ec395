"""The emulator's configuration."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dagster_runway.emulator.faults import FaultRule
from dagster_runway.schema import MODEL_ID


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
    price_per_second: float = Field(default=0.05, ge=0.0, description="USD charged per second of video.")
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

    @field_validator("queue_seconds", "render_seconds")
    @classmethod
    def _check_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if low < 0 or high < low:
            raise ValueError(f"range {value} must be (low, high) with 0 <= low <= high")
        return value
