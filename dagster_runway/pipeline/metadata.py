"""Every ``runway/*`` metadata key the pipeline writes, in one typed set. Users query these keys.

Write with ``{**RunwayMetadata(request_id=..., ...)}`` (unset fields are left out); read with
``read_metadata(event.metadata)``, which returns plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from dagster import (
    JsonMetadataValue,
    MarkdownMetadataValue,
    MetadataValue,
    PathMetadataValue,
    TimestampMetadataValue,
    UrlMetadataValue,
)

from dagster_runway._compat import NamespacedMetadataSet

# Values of ``runway/state``.
SUBMITTED = "submitted"  # a request was submitted and billed in this run
REUSED = "reused"  # an earlier request with the same fingerprint stands for this partition
COLLECTED = "collected"  # the video was downloaded, stored and checked
VERIFIED = "verified"  # the stored video was found intact and is re-recorded unchanged
FAILED = "failed"  # the partition failed; failure_class, next_step say why and what to do


class RunwayMetadata(NamespacedMetadataSet):
    """The metadata of requests, videos, images and failures (keys ``runway/<field>``)."""

    # What was asked, and which request made it
    state: str | None = None
    request_id: str | None = None
    fingerprint: str | None = None
    attempt: int | None = None
    model: str | None = None
    input: JsonMetadataValue | None = None
    prompt_text: str | None = None
    prompt_source: str | None = None
    prompt_warning: str | None = (
        None  # missing_prompt="warn": no prompt was given, the service's default applied
    )
    ratio: str | None = None
    duration_s: int | None = None
    seed: str | None = None  # text: GraphQL's Int is 32-bit and seeds go to 2^32 - 1
    settings_from: str | None = None
    prompt_image: str | None = None
    submitted_at: TimestampMetadataValue | None = None
    estimated_cost_usd: float | None = None
    price_source: str | None = (
        None  # catalog, estimate (estimated_usd_per_second) or result (the result's cost)
    )
    spend_usd: float | None = None
    spend_cap_usd: float | None = None
    journal_entry: str | None = None
    # What went in
    source_path: PathMetadataValue | UrlMetadataValue | None = None
    source_sha256: str | None = None
    source_change_token: str | None = None
    source_version_id: str | None = None  # the S3 VersionId the presigned URL was pinned to
    source_version: str | None = None
    source_size_bytes: int | None = None
    source_pixels: str | None = None
    manifest_unmatched: JsonMetadataValue | None = None  # manifest rows that matched no image, on discovery
    # Progress, from the status sensor
    status: str | None = None
    queue_position: int | None = None
    # What came out
    video_uri: PathMetadataValue | UrlMetadataValue | None = None
    video_size_bytes: int | None = None
    video_sha256: str | None = None
    result_url: UrlMetadataValue | None = None
    probe: JsonMetadataValue | None = None
    video_codec: str | None = None
    video_size: str | None = None
    video_fps: float | None = None
    video_duration_s: float | None = None
    video_frames: int | None = None
    poster: PathMetadataValue | UrlMetadataValue | None = None
    poster_preview: MarkdownMetadataValue | None = None
    gallery: PathMetadataValue | UrlMetadataValue | None = None
    verified_unchanged: bool | None = None
    cost_usd: float | None = None
    started_at: TimestampMetadataValue | None = None
    finished_at: TimestampMetadataValue | None = None
    queue_s: float | None = None
    render_s: float | None = None
    # Why it failed, and what to do
    failure_code: str | None = None
    failure_class: str | None = None
    retryable: bool | None = None
    next_step: str | None = None
    retry_at: TimestampMetadataValue | None = None
    schema_changes: JsonMetadataValue | None = None  # schema_drift: the breaking changes' ids
    package_version: str | None = None

    @classmethod
    def namespace(cls) -> str:
        return "runway"


def key(field: str) -> str:
    """The full metadata key of a field, e.g. ``runway/request_id``; fails on a name that is not a field."""
    if field not in RunwayMetadata.model_fields:
        raise KeyError(f"{field!r} is not a RunwayMetadata field")
    return f"runway/{field}"


# What the UI shows first on an event: what happened, which request, what it cost, and what came out or why not.
HEADLINE = ("state", "request_id", "cost_usd", "poster_preview", "video_uri", "failure_class", "failure_code",
            "retryable", "next_step")  # fmt: skip


def headline_first(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with the HEADLINE entries first (the UI lists entries in order)."""
    first = {key(name): metadata[key(name)] for name in HEADLINE if key(name) in metadata}
    return first | {k: v for k, v in metadata.items() if k not in first}


def read_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``runway/*`` entries of an event's metadata as plain values, keyed by field name."""
    found = {}
    for name in RunwayMetadata.model_fields:
        value = metadata.get(f"runway/{name}")
        if value is None:
            continue
        found[name] = value.value if isinstance(value, MetadataValue) else value
    return found


def uri_value(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> PathMetadataValue | UrlMetadataValue:
    """Something the UI can open: an ``s3://`` object as a link to the AWS console (or to the object on a
    custom ``endpoint_url``), an ``http(s)`` URL as a link; a local file as a path to copy."""
    if uri.startswith(("http://", "https://")):
        return MetadataValue.url(uri)
    if uri.startswith("s3://"):
        bucket, _, object_key = uri[len("s3://") :].partition("/")
        endpoint = (storage_options or {}).get("endpoint_url") or (storage_options or {}).get(
            "client_kwargs", {}
        ).get("endpoint_url")
        if endpoint:
            return MetadataValue.url(f"{str(endpoint).rstrip('/')}/{bucket}/{quote(object_key)}")
        return MetadataValue.url(
            f"https://s3.console.aws.amazon.com/s3/object/{bucket}?prefix={quote(object_key)}"
        )
    return MetadataValue.path(uri)
