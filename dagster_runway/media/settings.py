"""Per-image generation settings: defaults, sidecar and manifest values, ``auto`` ratio, derived seeds.

Precedence, lowest first: the user's defaults (``GenerationSettings``), the source's manifest row,
then the image's sidecar files. Every layer may set any of ``promptText`` (or ``prompt``), ``ratio``,
``duration`` and ``seed``, whatever the model calls them; unknown keys are errors (a typo must not be
silently ignored). The values are checked against the model's rules (its :class:`ModelSpec`, passed
as the validation context ``{"model": spec}``; Runway Gen-4 Turbo's when none is given).

Seed derivation: when no layer gives a seed, :func:`derive_seed` derives one from the sha256 of the
image's bytes. The seed therefore depends on the picture only: a re-run, a backfill, a copy of the
bucket or a renamed file all reproduce the same seed, while replacing the picture gives a new one.
The derived seed is always returned (and so recorded); ``seed_derived`` says where it came from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from dagster_runway.models import DEFAULT_MODEL, ModelSpec
from dagster_runway.schema import (
    DEFAULT_DURATION,
    DEFAULT_RATIO,
    RATIOS,
    SEED_MAX,
    ratio_size,
)

from .errors import SettingsError

AUTO_RATIO = "auto"

_SEED_DOMAIN = b"dagster-runway/seed/v1\x00"

# Accepted spellings of each field in sidecars and manifests, mapped to the model's field names.
FIELD_ALIASES: dict[str, str] = {
    "promptText": "prompt_text",
    "prompt_text": "prompt_text",
    "prompt": "prompt_text",
    "ratio": "ratio",
    "duration": "duration",
    "seed": "seed",
}


def shown_value(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message names a bad value, never quotes a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce_int(value: Any, field: str) -> Any:
    """Accept an int, a whole float, or a string of digits (CSV cells are strings); refuse booleans."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an integer, got a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{field} must be a whole number, got {shown_value(value)}")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("+").isdigit():
            raise ValueError(f"{field} must be an integer, got {shown_value(value)}")
        return int(text)
    return value


class GenerationSettings(BaseModel):
    """Generation settings for one image, or the defaults for a whole source.

    ``prompt_text=None`` leaves the prompt to the service's default. ``ratio="auto"`` picks the
    supported ratio closest to the image's own aspect. ``seed=None`` derives a seed from the image.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    prompt_text: str | None = Field(
        default=None,
        alias="promptText",
        description="What should happen in the video, at most 1000 characters. None keeps the service default.",
    )
    ratio: str = Field(
        default=DEFAULT_RATIO,
        description=f"Output size as width:height, one of {', '.join(RATIOS)}, or 'auto' for the supported "
        "ratio closest to the image's aspect.",
    )
    duration: int = Field(default=DEFAULT_DURATION, description="Video length in seconds: 5 or 10.")
    seed: int | None = Field(
        default=None,
        description="Random seed 0..4294967295. None derives a stable seed from the image's content.",
    )

    @classmethod
    def for_model(cls, model: ModelSpec, **values: Any) -> GenerationSettings:
        """Settings checked against ``model``'s rules; ratio and duration default to the model's."""
        base = {"ratio": model.default_ratio, "duration": model.default_duration}
        return cls.model_validate({**base, **values}, context={"model": model})

    @field_validator("prompt_text", mode="before")
    @classmethod
    def _prompt(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"promptText must be a string, got {type(value).__name__}")
        model = _model(info)
        if model.prompt_field is None:
            raise ValueError(f"{model.model_id} takes no prompt; remove it")
        if model.prompt_max is not None and len(value) > model.prompt_max:
            raise ValueError(f"promptText is {len(value)} characters, at most {model.prompt_max}")
        return value

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"ratio must be a string, got {type(value).__name__}")
        text = value.strip()
        if text.lower() == AUTO_RATIO:
            return AUTO_RATIO
        ratios = _model(info).ratios
        if text not in ratios:
            raise ValueError(f"ratio {shown_value(value)} is not one of {', '.join(ratios)} or 'auto'")
        return text

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: ValidationInfo) -> Any:
        value = _coerce_int(value, "duration")
        durations = _model(info).durations
        if value not in durations:
            raise ValueError(
                f"duration {shown_value(value)} is not one of {', '.join(map(str, durations))} (seconds)"
            )
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        value = _coerce_int(value, "seed")
        model = _model(info)
        if model.seed_max is None:
            raise ValueError(f"{model.model_id} takes no seed; remove it")
        if not 0 <= value <= model.seed_max:
            raise ValueError(f"seed {shown_value(value)} is outside 0..{model.seed_max}")
        return value


def _model(info: ValidationInfo) -> ModelSpec:
    context = info.context if isinstance(info.context, Mapping) else {}
    model = context.get("model")
    return model if isinstance(model, ModelSpec) else DEFAULT_MODEL


class ResolvedSettings(BaseModel):
    """The settings that will be submitted for one image: concrete ratio, always a seed.

    ``sources`` lists where the values came from, lowest precedence first (``defaults``, a manifest
    row, sidecar files), for the UI's lineage metadata; ``prompt_source`` says which of them gave the
    prompt (``service default`` when none did).
    """

    model_config = ConfigDict(frozen=True)

    prompt_text: str | None
    ratio: str
    duration: int
    seed: int | None  # None for a model that takes no seed
    ratio_auto: bool = False
    seed_derived: bool = False
    sources: tuple[str, ...] = ("defaults",)
    prompt_source: str = "defaults"  # where the prompt came from: "sidecar <path>", "manifest <path>", ...

    def request_fields(self, model: ModelSpec = DEFAULT_MODEL) -> dict[str, Any]:
        """The input fields under the model's names (the prompt only when set)."""
        return model.request_fields(
            prompt=self.prompt_text, ratio=self.ratio, duration=self.duration, seed=self.seed
        )


def resolve_auto_ratio(width: int, height: int, ratios: tuple[str, ...] = RATIOS) -> str:
    """The supported ratio closest to ``width:height``, compared on a log scale (so 2:1 and 1:2 are
    symmetric). ``resolve_auto_ratio(4000, 3000) == "1104:832"``. Give the size as viewers show the
    picture (``ImageInfo.displayed_size``, which applies EXIF orientation), not as it is stored."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio_size(ratio)
        return abs(math.log(w / h) - aspect)

    return min(ratios, key=distance)


def derive_seed(content_sha256: str, seed_max: int = SEED_MAX) -> int:
    """A seed in ``0..seed_max`` derived from the sha256 (hex) of the image's bytes.

    The first four bytes of ``sha256("dagster-runway/seed/v1\\0" + digest)``, big-endian, modulo
    ``seed_max + 1`` (for Gen-4 Turbo's 2**32 - 1, the four bytes as they are): stable across runs,
    machines and renames, and different for different pictures.
    """
    digest = content_sha256.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("derive_seed expects the 64-character hex sha256 of the image's bytes")
    return int.from_bytes(hashlib.sha256(_SEED_DOMAIN + digest.encode()).digest()[:4], "big") % (seed_max + 1)


def normalise_fields(raw: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Map sidecar/manifest keys to model field names, refusing unknown keys. Empty values are dropped
    (an empty CSV cell means "not set")."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = FIELD_ALIASES.get(str(key).strip())
        if name is None:
            allowed = "promptText (or prompt), ratio, duration, seed"
            raise SettingsError(
                source, f"unknown field {shown_value(str(key))}; use {allowed}", field=str(key)
            )
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if name in out:
            raise SettingsError(source, f"field {name!r} is given twice (under different names)", field=name)
        out[name] = value
    return out


def merge_settings(
    base: GenerationSettings, layers: list[tuple[str, dict[str, Any]]], model: ModelSpec = DEFAULT_MODEL
) -> GenerationSettings:
    """Apply each ``(source, fields)`` layer over ``base`` in order, validating each one against
    ``model``'s rules so that an error names the file and the field that broke them."""
    current = base
    for source, fields in layers:
        if not fields:
            continue
        try:
            layer = GenerationSettings.model_validate(fields, context={"model": model})
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first.get("loc", ())) or None
            message = first.get("msg", str(exc)).removeprefix("Value error, ")
            raise SettingsError(
                source, f"{message}; fix the {field or ''} value there", field=field
            ) from None
        current = current.model_copy(update={name: getattr(layer, name) for name in fields})
    return current


def defaults_for_model(
    defaults: GenerationSettings | Mapping[str, Any] | None, model: ModelSpec = DEFAULT_MODEL
) -> GenerationSettings:
    """A source's defaults checked against ``model``'s rules, with the model's own ratio and duration
    where none is set; a broken one raises :class:`SettingsError` naming ``defaults`` and the field."""
    if defaults is None:
        return GenerationSettings.for_model(model)
    given = (
        defaults.model_dump(exclude_unset=True)
        if isinstance(defaults, GenerationSettings)
        else normalise_fields(defaults, source="defaults")
    )
    return merge_settings(GenerationSettings.for_model(model), [("defaults", given)], model)
