"""Bytes of event JSON per image (issue 18, S4), counted in the event log of a real instance after a real run.

The per-partition events (materializations, observations, check results) of one image do not depend on
timing or on batch sizes, only on what the pipeline records, so their bytes are bounded here; the run and
step events, spread over a run's partitions, are left to ``bench/event_bytes.py``.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

from dagster import instance_for_test

from dagster_runway.pipeline import metadata as md
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import CHECK_NAMES, VIDEOS, check_statuses, make_defs, run_until_idle, write_images

IMAGES = 4
# Measured by this test: 31.5 KB per image before issue 18 (5 check results of 2.1 KB each), 29.7 KB after
# the check results were cut to what their rules measured, 27.7 KB after the video and the image observation
# stopped repeating the request's figures, 28.1 KB with runway/price_source. Lower these as cuts land.
MAX_PARTITION_BYTES_PER_IMAGE = 28_500
MAX_CHECK_RESULT_BYTES = 1_800
MAX_STATUS_OBSERVATION_BYTES = 1_200


def _partition_events(database: Path) -> list[tuple[str, str, int, dict]]:
    """(event type and asset, partition, bytes, event) of every stored event about one partition."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT dagster_event_type, event FROM event_logs").fetchall()
    found = []
    for event_type, text in rows:
        event = json.loads(text)
        data = (event.get("dagster_event") or {}).get("event_specific_data") or {}
        inner = data.get("materialization") or data.get("asset_observation") or data
        partition = inner.get("partition") if isinstance(inner, dict) else None
        if isinstance(partition, str):
            kind = f"{event_type} {'/'.join(inner['asset_key']['path'])}"
            found.append((kind, partition, len(text.encode()), event))
    return found


def test_an_image_costs_a_bounded_number_of_event_bytes_with_the_ui_metadata_and_five_checks(
    tmp_path: Path, emulator
) -> None:
    events_dir = tmp_path / "events"
    storage = {
        "module": "dagster._core.storage.event_log",
        "class": "ConsolidatedSqliteEventLogStorage",
        "config": {"base_dir": str(events_dir)},
    }
    with instance_for_test(overrides={"event_log_storage": storage}) as instance:
        write_images(tmp_path / "images", valid=IMAGES, invalid=False)
        daemon = LocalDaemon(
            make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos")), instance
        )
        daemon.tick("runway_discovery_sensor")
        assert run_until_idle(daemon) == []
        keys = instance.get_dynamic_partitions("runway_images")
        assert len(keys) == IMAGES
        for key in keys:  # the five checks per partition, current and passed
            assert check_statuses(instance, key) == {name: "SUCCEEDED" for name in CHECK_NAMES}
        video = instance.fetch_materializations(VIDEOS, limit=1).records[0].asset_materialization
        assert video is not None
        meta = md.read_metadata(video.metadata)
        # The UI's headline, and the lineage: what went in, what came out, cost, request id.
        for name in ("state", "request_id", "cost_usd", "poster_preview", "video_uri", "video_sha256",
                     "source_path", "source_sha256", "prompt_text", "model"):  # fmt: skip
            assert meta.get(name) is not None, name

    events = _partition_events(next(events_dir.glob("*.db")))
    per_image = Counter(partition for _, partition, _, _ in events)
    assert set(per_image) == set(keys)
    checks = [
        (partition, size, event)
        for kind, partition, size, event in events
        if kind.startswith("ASSET_CHECK_EVALUATION ")
    ]
    assert Counter(partition for partition, _, _ in checks) == {key: len(CHECK_NAMES) for key in keys}
    for _, size, event in checks:
        data = event["dagster_event"]["event_specific_data"]
        assert size <= MAX_CHECK_RESULT_BYTES, (data["check_name"], size)
        assert (
            "partition" not in data["metadata"] and data["description"] is None
        )  # both are the result's own
    # The status sensor records each state it sees (in_queue, in_progress, completed): how many depends on
    # when it polled, so those are bounded one by one and the rest per image.
    by_kind: Counter[str] = Counter()
    for kind, _, size, _ in events:
        if kind == "ASSET_OBSERVATION runway/requests":
            assert size <= MAX_STATUS_OBSERVATION_BYTES, size
        else:
            by_kind[kind] += size // IMAGES
    assert sum(by_kind.values()) <= MAX_PARTITION_BYTES_PER_IMAGE, by_kind
