"""Helpers for the pipeline tests: images on disk, a pipeline against the emulator, and its outcomes."""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import AssetKey, DagsterEventType, DagsterInstance, Definitions, MetadataValue
from PIL import Image, ImageDraw

from dagster_runway import RunComfyResource
from dagster_runway.pipeline import build_runway_pipeline
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.checks import CHECK_NAMES
from dagster_runway.pipeline.status import summary
from dagster_runway.testing import LocalDaemon

VIDEOS = AssetKey(["runway", "videos"])
REQUESTS = AssetKey(["runway", "requests"])
IMAGES = AssetKey(["runway", "images"])
PARTITIONS = "runway_images"


def png_bytes(
    width: int, height: int, color: tuple[int, int, int] = (200, 120, 40), fmt: str = "PNG"
) -> bytes:
    image = Image.new("RGB", (width, height), color)
    ImageDraw.Draw(image).ellipse(
        [width // 4, height // 4, width * 3 // 4, height * 3 // 4], fill=(20, 90, 200)
    )
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def write_images(folder: Path, valid: int = 4, invalid: bool = True) -> dict[str, Path]:
    """``valid`` good images (landscape, portrait, square, ...) and, optionally, two bad ones."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(320, 180), (180, 320), (240, 240), (300, 200), (200, 300), (256, 192)]
    files = {}
    for i in range(valid):
        w, h = sizes[i % len(sizes)]
        path = folder / f"img{i:02d}.png"
        path.write_bytes(png_bytes(w, h, (40 * i % 255, 100, 150)))
        files[path.name] = path
    if invalid:
        (folder / "too-wide.png").write_bytes(png_bytes(600, 200))  # aspect 3.0: outside 1:2..2:1
        (folder / "not-an-image.png").write_bytes(b"this is a text file, not a PNG\n" * 10)
        files["too-wide.png"] = folder / "too-wide.png"
        files["not-an-image.png"] = folder / "not-an-image.png"
    return files


def make_defs(emulator: Any, source: str, output: str, **options: Any) -> Definitions:
    options.setdefault("missing_prompt", "service_default")
    resource = RunComfyResource(
        api_token=emulator.token,
        base_url=emulator.base_url,
        poll_interval=0.05,
        backoff_initial=0.01,
        max_attempts=3,
    )
    return build_runway_pipeline(source, output, resource=resource, **options)


def status_summary(daemon: LocalDaemon) -> dict[str, Any]:
    return summary(daemon.cursor("runway_status_sensor"))


def run_until_idle(daemon: LocalDaemon, max_ticks: int = 200) -> list[str]:
    """Tick the status sensor until nothing is in flight, owed or launched; return failed run ids."""
    failed: list[str] = []
    for _ in range(max_ticks):
        outcome = daemon.tick("runway_status_sensor")
        failed += outcome.failed_run_ids
        counts = status_summary(daemon)
        busy = counts.get("rebuilding") or any(
            counts.get(k) for k in ("in_flight", "submit", "collect", "running")
        )
        if not busy and not outcome.run_ids and not outcome.failed_run_ids:
            return failed
        time.sleep(0.02)
    raise AssertionError(f"the pipeline did not settle: {status_summary(daemon)}")


def video_metadata(instance: DagsterInstance, key: str) -> dict[str, Any] | None:
    """The latest video materialization's ``runway/*`` metadata as plain values, with full keys."""
    video = rec.latest_video(instance, VIDEOS, key)
    return None if video is None else {f"runway/{k}": v for k, v in video.metadata.items()}


def check_statuses(instance: DagsterInstance, key: str) -> dict[str, str]:
    """Per-partition check status as the UI's check Partitions tab counts it (current results only)."""
    return rec.current_check_statuses(instance, VIDEOS, list(CHECK_NAMES), key)


def failure_reasons(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """Why each partition of a failed run failed, from its step failures' ``failed_partitions``."""
    reasons: dict[str, str] = {}
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records:
        data = record.event_log_entry.dagster_event.step_failure_data  # type: ignore[union-attr]
        failure_metadata = (
            data.user_failure_data.metadata if data and data.user_failure_data else None
        ) or {}
        value = failure_metadata.get("failed_partitions")
        found = value.value if isinstance(value, MetadataValue) else value
        if isinstance(found, Mapping):
            reasons.update({str(k): str(v) for k, v in found.items()})
    return reasons


def latest_failure(instance: DagsterInstance, key: str) -> rec.FailureRecord | None:
    return rec.latest_failure(instance, (REQUESTS, VIDEOS), key)


def image_records(instance: DagsterInstance) -> tuple[int, int]:
    """The image records in the instance: (materializations, observations) of ``runway/images``."""
    return (
        len(instance.fetch_materializations(IMAGES, limit=10_000).records),
        len(instance.fetch_observations(IMAGES, limit=10_000).records),
    )


def video_materialization_count(instance: DagsterInstance) -> int:
    return len(instance.fetch_materializations(VIDEOS, limit=10_000).records)
