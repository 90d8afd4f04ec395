"""Collect finished requests: fetch the result, store the video, probe it, check it, record lineage."""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec
from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetMaterialization,
    MetadataValue,
    PreviewWarning,
)

from dagster_runway._redact import redact_url
from dagster_runway.client import RunComfyClient, failure_error
from dagster_runway.errors import RequestNotFoundError, RunComfyError
from dagster_runway.media import MediaError, extract_poster, probe_video, sha256_of, store_video
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipeline
from dagster_runway.schema import RequestResult, ratio_size
from dagster_runway.version import __version__

PLAYABLE = "video_playable"
DURATION = "duration_matches_request"
ASPECT = "aspect_matches_ratio"
CHECKSUM = "checksum_at_rest"
SOURCE_UNCHANGED = "source_unchanged"

_CHECKS: dict[str, tuple[bool, str]] = {
    PLAYABLE: (True, "The video decodes, is H.264, and has frames."),
    DURATION: (True, "The video lasts as long as the request asked, within a tolerance."),
    ASPECT: (True, "The video's pixel aspect matches the requested ratio."),
    CHECKSUM: (False, "The stored object's sha256 still matches the one recorded when it was written."),
    SOURCE_UNCHANGED: (False, "The source image has not changed since the video was made."),
}

CHECK_NAMES = tuple(_CHECKS)


def check_specs(pipeline: RunwayPipeline) -> list[AssetCheckSpec]:
    # Partitioned checks (one result per video) are a preview feature of Dagster 1.13; we rely on it
    # knowingly, so its warning is not passed on to every user at load time.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return _check_specs(pipeline)


def _check_specs(pipeline: RunwayPipeline) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(
            name,
            asset=pipeline.videos_key,
            blocking=blocking,
            description=description,
            partitions_def=pipeline.partitions_def,
        )
        for name, (blocking, description) in _CHECKS.items()
    ]


@dataclass(frozen=True)
class Collected:
    key: str
    events: list[Any]
    failed_checks: list[str]


class CollectFailure(Exception):
    """A partition that could not be collected; the message says why and what to do."""


def _poster_markdown(poster_bytes: bytes) -> str:
    encoded = base64.b64encode(poster_bytes).decode()
    return f"![poster](data:image/jpeg;base64,{encoded})"


def _thumbnail(poster_uri: str, storage_options: dict[str, Any]) -> bytes:
    from PIL import Image

    with fsspec.open(poster_uri, "rb", **storage_options) as handle:
        image = Image.open(io.BytesIO(handle.read()))
        image.thumbnail((160, 160))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=70)
        return out.getvalue()


def _iso(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def evaluate_checks(
    pipeline: RunwayPipeline,
    key: str,
    *,
    probe: Any,
    fields: dict[str, Any],
    recorded_sha256: str,
    video_uri: str,
    source_change_token: str | None,
    current_change_token: str | None,
) -> list[AssetCheckEvaluation]:
    """The five checks of one stored video, each with what it measured."""
    options = dict(pipeline.output_storage_options)
    want_duration = float(fields["duration"])
    want_w, want_h = ratio_size(fields["ratio"])
    want_aspect = want_w / want_h
    aspect = probe.width / probe.height if probe.height else 0.0
    aspect_error = abs(aspect - want_aspect) / want_aspect
    try:
        at_rest = sha256_of(video_uri, options)
    except (MediaError, OSError) as exc:
        at_rest = f"unreadable: {exc}"

    results = {
        PLAYABLE: (
            probe.decodable and probe.codec == "h264" and probe.frames > 0,
            {
                "codec": probe.codec,
                "frames": probe.frames,
                "decodable": probe.decodable,
                "container": probe.container,
            },
        ),
        DURATION: (
            abs(probe.duration_s - want_duration) <= pipeline.duration_tolerance_s,
            {
                "duration_s": round(probe.duration_s, 3),
                "requested_s": want_duration,
                "tolerance_s": pipeline.duration_tolerance_s,
            },
        ),
        ASPECT: (
            aspect_error <= pipeline.aspect_tolerance,
            {
                "width": probe.width,
                "height": probe.height,
                "aspect": round(aspect, 4),
                "requested_ratio": fields["ratio"],
                "relative_error": round(aspect_error, 4),
            },
        ),
        CHECKSUM: (
            at_rest == recorded_sha256,
            {"recorded_sha256": recorded_sha256, "sha256_at_rest": at_rest},
        ),
        SOURCE_UNCHANGED: (
            source_change_token is not None and source_change_token == current_change_token,
            {
                "change_token_at_submit": source_change_token or "(unknown)",
                "change_token_now": current_change_token or "(image missing)",
            },
        ),
    }
    return [
        AssetCheckEvaluation(
            asset_key=pipeline.videos_key,
            check_name=name,
            passed=passed,
            metadata={"partition": key, **metadata},
            partition=key,
            severity=AssetCheckSeverity.ERROR if _CHECKS[name][0] else AssetCheckSeverity.WARN,
            blocking=_CHECKS[name][0],
            description=_CHECKS[name][1],
        )
        for name, (passed, metadata) in results.items()
    ]


def fetch_result(client: RunComfyClient, request_id: str) -> RequestResult:
    """The finished result of a request, or ``CollectFailure`` saying why there is none."""
    try:
        result = client.result(request_id)
    except RequestNotFoundError as exc:
        raise CollectFailure(
            f"request {request_id} has expired or is unknown ({exc.message}); materialize the "
            "requests partition again to resubmit."
        ) from None
    if result.status.is_pending:
        raise CollectFailure(
            f"request {request_id} is still {result.status.value}; the status sensor will "
            "collect it when it finishes."
        )
    error = failure_error(result)
    if error is not None:
        raise CollectFailure(f"{error} To retry, materialize the requests partition again.")
    return result


def collect_one(
    pipeline: RunwayPipeline,
    instance: Any,
    key: str,
    record: rec.RequestRecord,
    result: RequestResult,
    *,
    current_change_token: str | None,
) -> Collected:
    """Store, probe and check the video of one finished request; return the events to log."""
    options = dict(pipeline.output_storage_options)
    video_uri = pipeline.video_uri(key)
    poster_uri = pipeline.poster_uri(key)
    assert result.video_url is not None
    try:
        stored = store_video(result.video_url, video_uri, storage_options=options)
        probe = probe_video(video_uri, options)
        extract_poster(video_uri, poster_uri, options)
        thumbnail = _thumbnail(poster_uri, options)
    except (MediaError, OSError) as exc:
        raise CollectFailure(f"request {record.request_id}: {exc}") from None

    meta = record.metadata
    fields = dict(meta.get(rec.INPUT) or {})
    created = _iso(result.created_at)
    started = _iso(result.started_at)
    finished = _iso(result.finished_at)
    submitted = meta.get(rec.SUBMITTED_AT)
    timings: dict[str, Any] = {}
    if submitted is not None:
        timings["runway/submitted_at"] = MetadataValue.timestamp(submitted)
    if started is not None:
        timings["runway/started_at"] = MetadataValue.timestamp(started)
        if created is not None:
            timings["runway/queue_s"] = round(started - created, 3)
    if finished is not None:
        timings["runway/finished_at"] = MetadataValue.timestamp(finished)
        if started is not None:
            timings["runway/render_s"] = round(finished - started, 3)

    metadata: dict[str, Any] = {
        "dagster/uri": MetadataValue.path(video_uri),
        rec.REQUEST_ID: record.request_id,
        rec.FINGERPRINT: record.fingerprint,
        "runway/model": meta.get("runway/model"),
        rec.INPUT: MetadataValue.json(fields),
        "runway/prompt_text": fields.get("promptText", "(service default)"),
        "runway/ratio": fields.get("ratio"),
        "runway/duration_s": fields.get("duration"),
        "runway/seed": fields.get("seed"),
        rec.SOURCE_PATH: MetadataValue.path(str(meta.get(rec.SOURCE_PATH))),
        rec.SOURCE_SHA256: meta.get(rec.SOURCE_SHA256),
        rec.SOURCE_CHANGE_TOKEN: meta.get(rec.SOURCE_CHANGE_TOKEN),
        "runway/video_uri": MetadataValue.path(video_uri),
        "runway/video_size_bytes": stored.size,
        rec.VIDEO_SHA256: stored.sha256,
        "runway/result_url": MetadataValue.url(redact_url(result.video_url)),
        "runway/probe": MetadataValue.json(
            {
                "codec": probe.codec,
                "width": probe.width,
                "height": probe.height,
                "fps": probe.fps,
                "duration_s": probe.duration_s,
                "frames": probe.frames,
                "container": probe.container,
            }
        ),
        "runway/video_codec": probe.codec,
        "runway/video_size": f"{probe.width}x{probe.height}",
        "runway/video_fps": round(probe.fps, 3),
        "runway/video_duration_s": round(probe.duration_s, 3),
        "runway/video_frames": probe.frames,
        "runway/poster": MetadataValue.path(poster_uri),
        "runway/poster_preview": MetadataValue.md(_poster_markdown(thumbnail)),
        "runway/cost_usd": result.cost if result.cost is not None else "(not reported)",
        "runway/package_version": __version__,
        **timings,
    }
    materialization = AssetMaterialization(
        asset_key=pipeline.videos_key,
        partition=key,
        description=f"Video of request {record.request_id}",
        metadata={k: v for k, v in metadata.items() if v is not None},
        tags=_provenance(pipeline, instance, key, record, stored.sha256),
    )
    checks = evaluate_checks(
        pipeline,
        key,
        probe=probe,
        fields=fields,
        recorded_sha256=stored.sha256,
        video_uri=video_uri,
        source_change_token=meta.get(rec.SOURCE_CHANGE_TOKEN),
        current_change_token=current_change_token,
    )
    failed = [c.check_name for c in checks if not c.passed and c.blocking]
    return Collected(key, [materialization, *checks], failed)


def _provenance(
    pipeline: RunwayPipeline, instance: Any, key: str, record: rec.RequestRecord, video_sha256: str
) -> dict[str, str]:
    """The video's inputs: its source image (so a changed image shows it stale) and, when deferred, its request."""
    inputs = {
        pipeline.images_key: (
            str(record.metadata.get(rec.SOURCE_VERSION)),
            rec.latest_observation_storage_id(instance, pipeline.images_key, key),
        )
    }
    if pipeline.mode == "deferred":
        inputs[pipeline.requests_key] = ((record.fingerprint or "")[:16], record.storage_id)
    return rec.provenance_tags(inputs, video_sha256[:16])


def already_collected(pipeline: RunwayPipeline, instance: Any, key: str, request_id: str) -> bool:
    """Whether the latest video of ``key`` came from ``request_id`` and is still intact at rest."""
    latest = rec.latest_materialization_metadata(instance, pipeline.videos_key, key)
    if not latest or latest.get(rec.REQUEST_ID) != request_id:
        return False
    try:
        return sha256_of(pipeline.video_uri(key), dict(pipeline.output_storage_options)) == latest.get(
            rec.VIDEO_SHA256
        )
    except (MediaError, OSError):
        return False


def iter_collect(
    pipeline: RunwayPipeline,
    instance: Any,
    client: RunComfyClient,
    keys: list[str],
    change_tokens: dict[str, str | None],
    failures: list[tuple[str, str]],
    log: Any,
) -> Iterator[Any]:
    """Collect each key whose latest request finished; append ``(key, reason)`` for those that cannot be."""
    for key in keys:
        record = rec.latest_request_record(instance, pipeline.submit_key, key)
        if record is None or not record.request_id:
            failures.append(
                (
                    key,
                    "no request was submitted for this partition; materialize the requests partition first.",
                )
            )
            continue
        if already_collected(pipeline, instance, key, record.request_id):
            log.info(
                f"{key}: video of request {record.request_id} is already stored and intact; nothing rewritten"
            )
            continue
        try:
            result = fetch_result(client, record.request_id)
            collected = collect_one(
                pipeline, instance, key, record, result, current_change_token=change_tokens.get(key)
            )
        except (CollectFailure, RunComfyError) as exc:
            failures.append((key, str(exc)))
            continue
        yield from collected.events
        if collected.failed_checks:
            log.warning(f"{key}: blocking checks failed: {', '.join(collected.failed_checks)}")
