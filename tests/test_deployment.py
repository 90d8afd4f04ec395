"""The pipeline on Dagster's own deployment: PostgreSQL storage, the real daemon and the webserver.

Everything here goes through the processes a user runs (``dagster-daemon run``, ``dagster-webserver``)
and GraphQL, never in-process Dagster APIs, so it proves what the unit tests cannot: the definitions
load in a code server, the sensors tick in the daemon, runs launch through the queued run coordinator
as separate processes, and Postgres storage holds the records.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dagster_runway.pipeline.checks import CHECK_NAMES
from tests.graphql_client import DOCUMENTS
from tests.pipeline_helpers import write_images

VIDEOS = "runway/videos"


def test_graphql_documents_match_dagster_graphql_schema() -> None:
    """Every document the harness sends is valid against the installed dagster-graphql (no server)."""
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    schema = create_schema().graphql_schema
    problems = {
        name: [error.message for error in errors]
        for name, document in DOCUMENTS.items()
        if (errors := validate(schema, parse(document)))
    }
    assert not problems


@pytest.mark.deployment
def test_images_become_videos_on_a_real_deployment(deploy, tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", valid=6, invalid=False)
    deployment = deploy(
        source=tmp_path / "images",
        output=tmp_path / "videos",
        time_scale=0.01,
        env={"RUNWAY_MISSING_PROMPT": "service_default", "RUNWAY_OPTIONS": '{"status_interval_s": 5}'},
    )
    gql = deployment.graphql
    started = time.monotonic()

    gql.start_sensor("runway_discovery_sensor")
    gql.start_sensor("runway_status_sensor")
    statuses = gql.wait_for_partitions(VIDEOS, count=6, timeout=240, on_poll=deployment.assert_alive)
    elapsed = time.monotonic() - started
    # The checks are reported after their partition's materialization, by the same step: let it end.
    runs = gql.wait_for_runs_finished(timeout=120, on_poll=deployment.assert_alive)
    assert {run["status"] for run in runs} == {"SUCCESS"}, runs
    print(f"startup {deployment.timings}; sensors on -> 6 videos in {elapsed:.1f}s")

    assert statuses["materialized"] == sorted(images)
    videos = sorted((tmp_path / "videos").rglob("*.mp4"))
    assert len(videos) == 6, videos
    assert all(video.stat().st_size > 0 for video in videos)
    ledger = deployment.ledger()
    assert ledger.billed_submissions == 6
    assert len(ledger.by_fingerprint) == 6
    assert all(total.billed_submissions == 1 for total in ledger.by_fingerprint.values())
    for check in CHECK_NAMES:
        latest: dict[str, str] = {}
        for execution in gql.check_executions(VIDEOS, check):  # newest first
            latest.setdefault(execution["partition"], execution["status"])
        assert latest == dict.fromkeys(sorted(images), "SUCCEEDED"), check
    metadata = gql.latest_materialization_metadata(VIDEOS, sorted(images)[0])
    assert metadata is not None
    assert metadata["runway/request_id"] in {entry.request_id for entry in ledger.entries}
