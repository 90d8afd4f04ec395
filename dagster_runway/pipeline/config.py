"""The settings of one pipeline, shared by its assets, sensors and checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from dagster import AssetKey, DynamicPartitionsDefinition

from dagster_runway.media import GenerationSettings, ImageSource, poster_uri_for

Mode = Literal["deferred", "blocking"]
OnChange = Literal["regenerate", "mark_stale"]


@dataclass(frozen=True)
class RunwayPipeline:
    """Everything the factory was told; the definitions are built from it."""

    source_url: str
    output_url: str
    patterns: tuple[str, ...]
    source_storage_options: Mapping[str, Any]
    output_storage_options: Mapping[str, Any]
    defaults: GenerationSettings
    manifest: str | None
    resource_key: str
    mode: Mode
    key_prefix: tuple[str, ...]
    group_name: str
    partitions_name: str
    on_change: OnChange
    pool: str | None
    submit_batch_size: int
    collect_batch_size: int
    discovery_interval_s: int
    status_interval_s: int
    sensor_budget_s: float
    cancel_on_termination: bool
    presign_expires_s: int
    public_base_url: str | None
    duration_tolerance_s: float
    aspect_tolerance: float

    @cached_property
    def partitions_def(self) -> DynamicPartitionsDefinition:
        return DynamicPartitionsDefinition(name=self.partitions_name)

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
        """The asset whose events carry the request records: the requests asset, or in blocking mode the videos."""
        return self.requests_key if self.mode == "deferred" else self.videos_key

    def source(self) -> ImageSource:
        return ImageSource(
            self.source_url,
            patterns=self.patterns,
            storage_options=dict(self.source_storage_options),
            defaults=self.defaults,
            manifest=self.manifest,
        )

    def video_uri(self, partition_key: str) -> str:
        return f"{self.output_url.rstrip('/')}/{partition_key}.mp4"

    def poster_uri(self, partition_key: str) -> str:
        return poster_uri_for(self.video_uri(partition_key))
