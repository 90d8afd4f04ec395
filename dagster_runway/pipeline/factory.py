"""``build_runway_pipeline``: the whole pipeline from one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dagster import Definitions, define_asset_job

from dagster_runway.media import GenerationSettings
from dagster_runway.pipeline.assets import build_requests_asset, build_videos_asset, images_spec
from dagster_runway.pipeline.config import Mode, OnChange, RunwayPipeline
from dagster_runway.pipeline.sensors import build_discovery_sensor, build_status_sensor
from dagster_runway.resource import RunComfyResource

DEFAULT_PATTERNS = ("**/*.png", "**/*.jpg", "**/*.jpeg", "**/*.webp")


def build_runway_pipeline(
    source: str,
    output: str,
    *,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    source_storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
    defaults: GenerationSettings | None = None,
    manifest: str | None = None,
    resource: RunComfyResource | None = None,
    resource_key: str = "runcomfy",
    mode: Mode = "deferred",
    key_prefix: str | Sequence[str] = "runway",
    group_name: str = "runway",
    partitions_name: str | None = None,
    on_change: OnChange = "mark_stale",
    pool: str | None = "runcomfy_api",
    submit_batch_size: int = 50,
    collect_batch_size: int = 25,
    discovery_interval_s: int = 30,
    status_interval_s: int = 15,
    sensor_budget_s: float = 40.0,
    cancel_on_termination: bool = True,
    presign_expires_s: int = 3600,
    public_base_url: str | None = None,
    duration_tolerance_s: float = 0.25,
    aspect_tolerance: float = 0.02,
) -> Definitions:
    """Build the image-to-video pipeline: assets, checks, jobs and sensors, ready to merge.

    Args:
        source: Where the images are: a local folder, ``s3://bucket/prefix``, or any fsspec URL.
        output: Where videos and poster frames go (local folder or ``s3://``).
        patterns: Glob patterns of images, relative to ``source``.
        source_storage_options / output_storage_options: fsspec options (e.g. ``endpoint_url``).
        defaults: Generation settings under every image's sidecar or manifest row. The default is the
            API's defaults except ``ratio="auto"``: each video takes the supported ratio closest to its image.
        manifest: A CSV or JSON file of per-image settings, relative to ``source`` or absolute.
        resource: A ``RunComfyResource`` to include under ``resource_key``; leave it out to supply your own.
        mode: ``deferred`` (submit, sense, collect; no worker waits) or ``blocking`` (one step waits).
        key_prefix: Asset key prefix: assets are ``<prefix>/images``, ``<prefix>/requests``, ``<prefix>/videos``.
        group_name: The asset group shown in the UI.
        partitions_name: Name of the dynamic partitions (default ``<prefix>_images``).
        on_change: When an image changes: ``mark_stale`` (the UI shows its video stale) or ``regenerate``.
        pool: Dagster concurrency pool of the submitting steps (set its limit in the UI or dagster.yaml).
        submit_batch_size / collect_batch_size: Partitions per run in sensor-launched runs and backfills.
        discovery_interval_s / status_interval_s: Sensor intervals.
        sensor_budget_s: Time budget of one sensor tick (under Dagster's 60 s tick timeout).
        cancel_on_termination: Cancel queued requests when a run that submitted them is terminated.
        presign_expires_s: Expiry of presigned URLs given to the service for object-store images.
        public_base_url: Base URL under which a local source folder is served over HTTPS, if it is.
        duration_tolerance_s / aspect_tolerance: Tolerances of the duration and aspect checks.
    """
    prefix = (key_prefix,) if isinstance(key_prefix, str) else tuple(key_prefix)
    if mode not in ("deferred", "blocking"):
        raise ValueError(f"mode must be 'deferred' or 'blocking', got {mode!r}")
    if on_change not in ("regenerate", "mark_stale"):
        raise ValueError(f"on_change must be 'regenerate' or 'mark_stale', got {on_change!r}")
    pipeline = RunwayPipeline(
        source_url=source,
        output_url=output,
        patterns=tuple(patterns),
        source_storage_options=dict(source_storage_options or {}),
        output_storage_options=dict(output_storage_options or {}),
        defaults=defaults or GenerationSettings(ratio="auto"),
        manifest=manifest,
        resource_key=resource_key,
        mode=mode,
        key_prefix=prefix,
        group_name=group_name,
        partitions_name=partitions_name or f"{'_'.join(prefix)}_images",
        on_change=on_change,
        pool=pool,
        submit_batch_size=submit_batch_size,
        collect_batch_size=collect_batch_size,
        discovery_interval_s=discovery_interval_s,
        status_interval_s=status_interval_s,
        sensor_budget_s=sensor_budget_s,
        cancel_on_termination=cancel_on_termination,
        presign_expires_s=presign_expires_s,
        public_base_url=public_base_url,
        duration_tolerance_s=duration_tolerance_s,
        aspect_tolerance=aspect_tolerance,
    )
    videos = build_videos_asset(pipeline)
    videos_job = define_asset_job(
        f"{pipeline.name}_collect_job" if mode == "deferred" else f"{pipeline.name}_videos_job",
        selection=[pipeline.videos_key],
        partitions_def=pipeline.partitions_def,
        description="Collect finished requests into videos."
        if mode == "deferred"
        else "Submit, wait, collect.",
    )
    assets: list[Any] = [images_spec(pipeline), videos]
    jobs = [videos_job]
    sensors = []
    if mode == "deferred":
        requests = build_requests_asset(pipeline)
        submit_job = define_asset_job(
            f"{pipeline.name}_submit_job",
            selection=[pipeline.requests_key],
            partitions_def=pipeline.partitions_def,
            description="Validate images and submit (or reuse) their requests.",
        )
        assets.append(requests)
        jobs.append(submit_job)
        sensors.append(build_discovery_sensor(pipeline, submit_job, requests.op.name))
        sensors.append(build_status_sensor(pipeline, videos_job, videos.op.name))
    else:
        sensors.append(build_discovery_sensor(pipeline, videos_job, videos.op.name))
    return Definitions(
        assets=assets,
        jobs=jobs,
        sensors=sensors,
        resources={resource_key: resource} if resource is not None else None,
    )
