"""The pipeline's options: one pydantic model, the single source for the factory, the Component and the docs."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from dagster import AssetKey, DynamicPartitionsDefinition
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dagster_runway import _compat
from dagster_runway._redact import redact_url
from dagster_runway.media import DEFAULT_PATTERNS, GenerationSettings, ImageSource, poster_uri_for
from dagster_runway.media.overlap import inside
from dagster_runway.models import DEFAULT_MODEL, ModelSpec

Mode = Literal["deferred", "blocking"]
OnChange = Literal["regenerate", "mark_stale"]
MissingPrompt = Literal["fail", "warn", "service_default"]


class RunwayPipelineConfig(BaseModel):
    """Everything that shapes one image-to-video pipeline. ``build_runway_pipeline`` and the ``dg``
    Component take these fields; the README's option table is generated from them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        description="Where the images are: a local folder, `s3://bucket/prefix`, or any fsspec URL."
    )
    output: str = Field(
        description="Where videos, poster frames and the journal go (a local folder or `s3://`)."
    )
    patterns: tuple[str, ...] = Field(
        default=DEFAULT_PATTERNS,
        description="Glob patterns of images, relative to `source`, matched case-insensitively.",
    )
    source_storage_options: dict[str, Any] = Field(
        default_factory=dict, description='fsspec options of the source, e.g. `{"endpoint_url": ...}`.'
    )
    output_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the output (and of the journal by default)."
    )
    defaults: GenerationSettings = Field(
        default_factory=lambda: GenerationSettings(ratio="auto"),
        description="Settings under every sidecar and manifest row. The API's defaults, except "
        "`ratio: auto`: each video takes the supported ratio closest to its image.",
    )
    manifest: str | None = Field(
        default=None,
        description="A CSV or JSON file of per-image settings, relative to `source` or absolute.",
    )
    missing_prompt: MissingPrompt = Field(
        default="fail",
        description="When no prompt is given for an image: `fail` its partition before paying, `warn` and "
        "submit, or `service_default` (accept the service's default prompt, a scene of a car in a forest).",
    )
    resource_key: str = Field(default="runcomfy", description="Resource key of the `RunComfyResource`.")
    mode: Mode = Field(
        default="deferred",
        description="`deferred`: submit, sense, collect; no worker waits while a video renders. `blocking`: "
        "one step submits, waits and collects.",
    )
    key_prefix: tuple[str, ...] = Field(
        default=("runway",),
        description="Asset key prefix: `<prefix>/images`, `<prefix>/requests`, `<prefix>/videos`.",
    )
    group_name: str = Field(default="runway", description="The asset group shown in the UI.")
    partitions_name: str | None = Field(
        default=None, description="Name of the dynamic partitions (default `<prefix>_images`)."
    )
    on_change: OnChange = Field(
        default="mark_stale",
        description="A changed image (or sidecar) whose video exists: `mark_stale` shows the video stale in "
        "the UI; `regenerate` submits it again. A partition with no video is always submitted again.",
    )
    pool: str | None = Field(
        default="runcomfy_api", description="Dagster concurrency pool of the steps that submit (paid calls)."
    )
    submit_batch_size: int = Field(
        default=200, ge=1, description="Partitions per submit run (sensors, backfills)."
    )
    collect_batch_size: int = Field(
        default=100, ge=1, description="Partitions per collect run (sensors, backfills)."
    )
    discovery_batch_size: int = Field(
        default=1000,
        ge=1,
        description="New or changed images one discovery tick records at most (two events each, and none past "
        "the tick's time budget); the rest wait for the next tick, so a tick stays short when thousands of images "
        "arrive at once.",
    )
    discovery_list_per_tick: int = Field(
        default=20_000,
        ge=1000,
        description="Objects one discovery tick reads from the source at most (S3 listing entries; locally "
        "directory entries, plus the rest of the folder being read); the next tick resumes after the last path "
        "judged. A pass over the source takes about objects / this many ticks, and a change or a deletion is "
        "noticed within one pass.",
    )
    discovery_interval_s: int = Field(default=30, ge=1, description="Seconds between discovery sensor ticks.")
    status_interval_s: int = Field(
        default=15,
        ge=1,
        description="Seconds between status sensor ticks. A tick polls for at most twice this (10 s at least), "
        "then launches the collects it found owed.",
    )
    sensor_budget_s: float = Field(
        default=40.0, gt=0, le=55, description="Time budget of one sensor tick, under Dagster's 60 s timeout."
    )
    cancel_on_termination: bool = Field(
        default=True, description="When a run is terminated, cancel the queued requests it submitted."
    )
    presign_expires_s: int = Field(
        default=4 * 3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Expiry of presigned URLs given to the service for object-store images; longer than "
        "`max_render_s`, so that a request the service starts late can still fetch its image.",
    )
    max_render_s: float = Field(
        default=3 * 3600,
        gt=0,
        description="Seconds after its submit that a request may stay queued or rendering. Past it, the status "
        "sensor cancels a queued request (refunded), reports one still rendering with what it may cost, and "
        "fails the partition as `render_timeout`.",
    )
    max_video_bytes: int = Field(
        default=1024**3,
        ge=1024,
        description="Largest video a download accepts (by `Content-Length` and by bytes received); a 10 s clip "
        "is a few MB.",
    )
    download_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Total deadline of one video download, retries included: a body that drips slower fails "
        "the download (retried at the next collect), it cannot hold the step.",
    )
    public_base_url: str | None = Field(
        default=None, description="HTTPS base URL under which a local source folder is served, if it is."
    )
    duration_tolerance_s: float = Field(default=0.25, ge=0, description="Tolerance of the duration check.")
    aspect_tolerance: float = Field(default=0.02, ge=0, description="Relative tolerance of the aspect check.")
    journal: str | None = Field(
        default=None,
        description="Where the submission journal lives (default `<output>/.runway`). Every paid submit is "
        "claimed there before it is sent; keep it on storage that every run and host shares.",
    )
    journal_storage_options: dict[str, Any] | None = Field(
        default=None, description="fsspec options of the journal (default: `output_storage_options`)."
    )
    adopt_output: bool = Field(
        default=False,
        description="Take over an output whose videos were made from another image source (its journal says "
        "which). By default a submit run refuses such an output (`output_mismatch`), so two sources never mix.",
    )
    max_spend_usd: float | None = Field(
        default=None,
        gt=0,
        description="Spend cap in USD, checked atomically before each submit; none by default.",
    )
    spend_window_h: float | None = Field(
        default=None,
        gt=0,
        description="Make `max_spend_usd` a rolling cap over this many hours (else all-time).",
    )
    estimated_usd_per_second: float = Field(
        default=0.05,
        ge=0,
        description="Price per output second used when the service's catalog gives none (or cannot be read); "
        "a submit run prices its spend-cap reservations and estimates at the catalog's price otherwise.",
    )
    accept_schema_changes: tuple[str, ...] = Field(
        default=(),
        description="Breaking changes of the model's live input schema to accept, by the id the "
        "`schema_drift` failure names (e.g. `duration.enum`); a submit run refuses any other breaking change.",
    )
    retry_failed_generations: int = Field(
        default=0,
        ge=0,
        description="Resubmit a generation that failed with a retryable code (`INTERNAL.*`) up to this many "
        "times, from the status sensor. Each attempt is billed.",
    )
    max_run_attempts: int = Field(
        default=3,
        ge=1,
        description="Runs launched for one partition and stage (submit or collect), by the status sensor or the "
        "submit schedule, that end without a result before the partition is recorded as failed (`runs_exhausted`).",
    )

    submit_schedule: str | None = Field(
        default=None,
        description="A cron string: discover and submit only at these times (e.g. `0 22 * * *` nightly, or "
        "`0 9-17 * * 1-5` hourly in business hours) instead of as soon as the sensors see an image. The status "
        "sensor still polls, and collects each paid video as soon as it is done.",
    )
    verify_schedule: str | None = Field(
        default="0 3 * * *",
        description="A cron string for the verify schedule, which runs all five checks of every stored video "
        "again without regenerating; None leaves it out.",
    )
    schedule_timezone: str = Field(default="UTC", description="The time zone of the cron schedules.")

    @field_validator("submit_schedule", "verify_schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not _compat.is_valid_cron_string(value):
            raise ValueError(
                f"{value!r} is not a cron string such as '0 22 * * *' (minute hour day month weekday)"
            )
        return value

    @field_validator("key_prefix", mode="before")
    @classmethod
    def _prefix(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> RunwayPipelineConfig:
        if not self.key_prefix or not all(self.key_prefix):
            raise ValueError("key_prefix must be a non-empty string or sequence of non-empty strings")
        if self.spend_window_h is not None and self.max_spend_usd is None:
            raise ValueError("spend_window_h needs max_spend_usd: set the cap the window applies to")
        if self.presign_expires_s <= self.max_render_s:
            raise ValueError(
                f"presign_expires_s={self.presign_expires_s} must be longer than max_render_s={self.max_render_s:g}: "
                "the service may fetch the image any time before the render deadline; raise presign_expires_s "
                "or lower max_render_s"
            )
        self._check_layout()
        return self

    def _check_layout(self) -> None:
        """Refuse an output, journal or review page that the source would list (and pay for) as input."""
        source, source_opts = self.source, self.source_storage_options
        places = [
            ("output", self.output, self.output_storage_options),
            ("journal", self.journal_url, self.journal_options),
        ]
        for name, url, options in places:
            if inside(url, source, inner_options=options, outer_options=source_opts):
                raise ValueError(
                    f"{name} {redact_url(url)!r} is inside source {redact_url(source)!r}: every file written there "
                    "(videos, poster frames, the journal, the review page) would be listed as a new image and paid "
                    f"for again on every discovery. Put the {name} outside the source folder or bucket prefix, "
                    f"e.g. beside it."
                )
            if inside(source, url, inner_options=source_opts, outer_options=options):
                raise ValueError(
                    f"source {redact_url(source)!r} is inside {name} {redact_url(url)!r}: the pipeline's own files "
                    f"would be mixed with its input. Put the {name} outside the source, e.g. beside it."
                )

    # Derived names and objects

    @property
    def dynamic_partitions_name(self) -> str:
        """The name of the dynamic partitions: one per image."""
        return self.partitions_name or f"{self.name}_images"

    @cached_property
    def partitions_def(self) -> DynamicPartitionsDefinition:
        return DynamicPartitionsDefinition(name=self.dynamic_partitions_name)

    @property
    def images_key(self) -> AssetKey:
        return AssetKey([*self.key_prefix, "images"])

    @property
    def requests_key(self) -> AssetKey:
        return AssetKey([*self.key_prefix, "requests"])

    @property
    def videos_key(self) -> AssetKey:
        return AssetKey([*self.key_prefix, "videos"])

    @property
    def name(self) -> str:
        return "_".join(self.key_prefix)

    @property
    def submit_key(self) -> AssetKey:
        """The asset that a submit materializes: the requests asset, or in blocking mode the videos."""
        return self.requests_key if self.mode == "deferred" else self.videos_key

    @property
    def journal_url(self) -> str:
        return self.journal or f"{self.output.rstrip('/')}/.runway"

    @property
    def journal_options(self) -> dict[str, Any]:
        options = (
            self.output_storage_options
            if self.journal_storage_options is None
            else self.journal_storage_options
        )
        return dict(options)

    def image_source(self, model: ModelSpec = DEFAULT_MODEL) -> ImageSource:
        """The source, its settings checked against ``model`` (the resource's)."""
        return ImageSource(
            self.source,
            patterns=self.patterns,
            storage_options=dict(self.source_storage_options),
            defaults=self.defaults,
            manifest=self.manifest,
            model=model,
        )

    def video_uri(self, partition_key: str) -> str:
        return f"{self.output.rstrip('/')}/{partition_key}.mp4"

    def poster_uri(self, partition_key: str) -> str:
        return poster_uri_for(self.video_uri(partition_key))


def options_table() -> str:
    """The README's table of pipeline options, generated from the model's fields."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for name, field in RunwayPipelineConfig.model_fields.items():
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            default = (
                f"`{value!r}`"
                if not isinstance(value, GenerationSettings)
                else "`GenerationSettings(ratio='auto')`"
            )
        else:
            default = f"`{field.default!r}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {default} | {description} |")
    return "\n".join(rows)
