"""Layer 1: the model's input schema and the API's response shapes.

``ImageToVideoInput`` mirrors the input schema on the vendor's page for
``runwayml/runway-gen-4/turbo/image-to-video`` exactly: the same required field, types, enums,
bounds and defaults. JSON types are checked strictly (``"5"`` is not an integer, ``true`` is not a
number), as a JSON-schema validator would. Python names and the API's JSON names are both accepted.

The response models are tolerant: they ignore unknown fields, accept ``cancelled`` and ``canceled``,
and take an ``error`` that is a string, an object or a list.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_ID = "runwayml/runway-gen-4/turbo/image-to-video"

RATIOS: tuple[str, ...] = ("1584:672", "1280:720", "1104:832", "960:960", "832:1104", "720:1280")
DURATIONS: tuple[int, ...] = (5, 10)
SEED_MAX = 4294967295
PROMPT_TEXT_MAX = 1000
DEFAULT_RATIO: Final = "1280:720"
DEFAULT_DURATION: Final = 5
DEFAULT_SEED = 936116745
DEFAULT_PROMPT_TEXT = (
    "The subject sits in the driver's seat of a parked car in the forest. She starts the engine and slowly "
    "begins to drive forward along the narrow dirt path. Sunlight flickers through the trees as the car "
    "moves. The camera remains inside the car, handheld and steady, subtly tracking the subject's profile "
    "as she drives. Cinematic live-action, warm forest tones, shallow depth of field. "
)

# The image rules from the schema's ``promptImage`` validations.
IMAGE_MAX_BYTES = 16 * 1024 * 1024
IMAGE_MAX_SIDE = 8000
IMAGE_MIN_ASPECT = 0.5
IMAGE_MAX_ASPECT = 2.0

Ratio = Literal["1584:672", "1280:720", "1104:832", "960:960", "832:1104", "720:1280"]

# The input schema the vendor page publishes for this model, verbatim: what this package was built for
# (the catalog's live ``input_schema`` is compared with it), and what the emulator's catalog serves.
INPUT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "title": "Input",
    "required": ["promptImage"],
    "properties": {
        "promptText": {
            "title": "Prompt",
            "description": "",
            "type": "string",
            "maxLength": PROMPT_TEXT_MAX,
            "default": DEFAULT_PROMPT_TEXT,
        },
        "promptImage": {
            "title": "Image",
            "description": "Use images under 16MB, with dimensions below 8000x8000 pixels and an aspect "
            "ratio between 1:2 and 2:1.",
            "type": "string",
            "validations": [
                {
                    "validation_rule": "width_pixels<",
                    "validation_value": IMAGE_MAX_SIDE,
                    "validation_error": "The uploaded image width and height must not exceed 8000 pixels.",
                },
                {
                    "validation_rule": "height_pixels<",
                    "validation_value": IMAGE_MAX_SIDE,
                    "validation_error": "The uploaded image width and height must not exceed 8000 pixels.",
                },
                {
                    "validation_rule": "width/height>",
                    "validation_value": IMAGE_MIN_ASPECT,
                    "validation_error": "The aspect ratio range should be 1:2 to 2:1.",
                },
                {
                    "validation_rule": "width/height<",
                    "validation_value": 2,
                    "validation_error": "The aspect ratio range should be 1:2 to 2:1.",
                },
                {
                    "validation_rule": "file_size_mb<",
                    "validation_value": 16,
                    "validation_error": "File size must be less than 16 MB.",
                },
            ],
            "default": "https://playgrounds-storage-public.runcomfy.net/tools/7026/media-files/usecase1-1-input.png",
        },
        "ratio": {
            "title": "Aspect Ratio (W:H)",
            "description": "",
            "type": "string",
            "enum": list(RATIOS),
            "default": DEFAULT_RATIO,
        },
        "duration": {
            "title": "Duration",
            "description": "",
            "type": "integer",
            "enum": list(DURATIONS),
            "default": DEFAULT_DURATION,
        },
        "seed": {
            "title": "Seed",
            "description": "",
            "maximum": SEED_MAX,
            "minimum": 0,
            "type": "integer",
            "default": DEFAULT_SEED,
        },
    },
}


def ratio_size(ratio: str) -> tuple[int, int]:
    """``"1280:720"`` -> ``(1280, 720)``."""
    width, height = ratio.split(":")
    return int(width), int(height)


def _json_string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a JSON string, got {type(value).__name__}")
    return value


def _json_integer(value: Any, field: str) -> int:
    # JSON schema's "integer": any number with no fraction, but never a boolean or a string.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must be a JSON integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{field} must be a whole number, got {value}")
        return int(value)
    return value


class ImageToVideoInput(BaseModel):
    """The input of ``runwayml/runway-gen-4/turbo/image-to-video``, field for field."""

    model_config = ConfigDict(populate_by_name=True, extra="allow", frozen=True)

    prompt_image: str = Field(
        alias="promptImage",
        description="The input image: an HTTPS URL the service can fetch, or a data URI. Under 16 MB, "
        "under 8000x8000 pixels, aspect ratio between 1:2 and 2:1.",
    )
    prompt_text: str = Field(
        default=DEFAULT_PROMPT_TEXT,
        alias="promptText",
        max_length=PROMPT_TEXT_MAX,
        description="What should happen in the video, at most 1000 characters.",
    )
    ratio: Ratio = Field(default=DEFAULT_RATIO, description="Output size as width:height in pixels.")
    duration: Literal[5, 10] = Field(default=DEFAULT_DURATION, description="Video length in seconds.")
    seed: int = Field(
        default=DEFAULT_SEED,
        ge=0,
        le=SEED_MAX,
        description="Random seed, 0..4294967295, for reproducible output.",
    )

    @field_validator("prompt_image", "prompt_text", "ratio", mode="before")
    @classmethod
    def _strings(cls, value: Any, info: Any) -> str:
        return _json_string(value, info.field_name)

    @field_validator("duration", "seed", mode="before")
    @classmethod
    def _integers(cls, value: Any, info: Any) -> int:
        return _json_integer(value, info.field_name)

    def to_request(self) -> dict[str, Any]:
        """The JSON body to submit: API names, and only the fields that were set."""
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")

    def to_full(self) -> dict[str, Any]:
        """Every field with its effective value (defaults filled in), under the API's names."""
        return self.model_dump(by_alias=True, mode="json")


class RequestState(enum.StrEnum):
    """A request's state as ``/status`` or ``/result`` reports it.

    ``/status`` says ``completed`` for a finished request; only ``/result`` tells ``succeeded`` from
    ``failed``.
    """

    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def _missing_(cls, value: object) -> RequestState | None:
        if isinstance(value, str):
            normal = value.strip().lower()
            alias = _STATE_ALIASES.get(normal, normal)
            for member in cls:
                if member.value == alias:
                    return member
        return None

    @property
    def is_terminal(self) -> bool:
        return self in (
            RequestState.COMPLETED,
            RequestState.SUCCEEDED,
            RequestState.FAILED,
            RequestState.CANCELLED,
        )

    @property
    def is_pending(self) -> bool:
        return self in (RequestState.IN_QUEUE, RequestState.IN_PROGRESS)


_STATE_ALIASES = {
    "canceled": "cancelled",
    "queued": "in_queue",
    "pending": "in_queue",
    "waiting": "in_queue",
    "starting": "in_queue",
    "processing": "in_progress",
    "running": "in_progress",
}

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Submission(_Response):
    """The answer to a submit: the new request's id and its URLs."""

    request_id: str
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None

    @field_validator("request_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not REQUEST_ID_PATTERN.match(value):
            raise ValueError(f"request_id {value[:40]!r} is not 1-128 characters of [A-Za-z0-9_-]")
        return value


class RequestStatus(_Response):
    """The answer of ``/status``. ``queue_position`` is sent only while queued."""

    request_id: str
    status: RequestState
    queue_position: int | None = None
    status_url: str | None = None
    result_url: str | None = None


class RequestResult(_Response):
    """The answer of ``/result``: outputs on success, ``error`` on failure, else the current state."""

    request_id: str
    status: RequestState
    output: dict[str, Any] | None = None
    error: str | dict[str, Any] | list[Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cost: float | None = None
    model_id: str | None = None

    @property
    def video_urls(self) -> list[str]:
        """Every video URL in ``output``: ``video`` first, then ``videos``."""
        out = self.output or {}
        urls: list[str] = []
        if isinstance(out.get("video"), str):
            urls.append(out["video"])
        videos = out.get("videos")
        if isinstance(videos, list):
            urls.extend(url for url in videos if isinstance(url, str) and url not in urls)
        return urls

    @property
    def video_url(self) -> str | None:
        urls = self.video_urls
        return urls[0] if urls else None

    @property
    def failure_code(self) -> str | None:
        """A machine-readable failure code (``SAFETY.INPUT.IMAGE``, ...) if the error carries one."""
        for item in _error_items(self.error):
            for key in ("failure_code", "failureCode", "code", "type", "errorCode", "error_code"):
                if item.get(key) not in (None, ""):
                    return str(item[key])
        return None

    @property
    def failure_message(self) -> str | None:
        """The error's human-readable text, whatever its shape."""
        if isinstance(self.error, str):
            return self.error
        parts = []
        for item in _error_items(self.error):
            for key in ("message", "error_message", "failure", "error", "detail", "debugInfo"):
                if isinstance(item.get(key), str) and item[key]:
                    parts.append(item[key])
                    break
        return "; ".join(parts) or None


def _error_items(error: Any) -> list[dict[str, Any]]:
    if isinstance(error, dict):
        return [error]
    if isinstance(error, list):
        return [item for item in error if isinstance(item, dict)]
    return []


class CancelResult(_Response):
    """The answer of ``/cancel``. ``outcome`` is ``cancelled`` or ``not_cancellable``."""

    request_id: str
    status: str | None = None
    outcome: str | None = None

    @property
    def cancelled(self) -> bool:
        values = {(self.outcome or "").lower(), (self.status or "").lower()}
        return bool(values & {"cancelled", "canceled"})
