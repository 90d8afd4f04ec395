"""The deferred pipeline end to end on a real instance: sensors tick, runs launch, checks run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from dagster_runway.pipeline import LocalDaemon
from dagster_runway.pipeline.sensors import decode_cursor

from .pipeline_helpers import (
    CHECK_NAMES,
    PARTITIONS,
    REQUESTS,
    VIDEOS,
    check_statuses,
    failure_reasons,
    make_defs,
    png_bytes,
    run_until_idle,
    video_materialization_count,
    video_metadata,
    write_images,
)


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


def test_end_to_end_valid_images_become_checked_videos_and_invalid_ones_fail_before_submit(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    files = write_images(tmp_path / "images", valid=4, invalid=True)
    out = tmp_path / "videos"
    defs = make_defs(emulator, str(tmp_path / "images"), str(out))
    daemon = LocalDaemon(defs, instance)

    discovery = daemon.tick("runway_discovery_sensor")
    assert discovery.new_partitions == 6
    # The submit run fails (two bad images), but only after submitting the four good ones.
    assert len(discovery.failed_run_ids) == 1
    assert emulator.ledger().billed_submissions == 4

    failed = run_until_idle(daemon)
    assert failed == []

    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert len(keys) == 6
    videos = {key: video_metadata(instance, key) for key in keys}
    good = {k for k, v in videos.items() if v is not None}
    assert len(good) == 4
    for key in good:
        meta = videos[key]
        assert Path(meta["runway/video_uri"]).exists()
        assert Path(meta["runway/poster"]).exists()
        assert meta["runway/video_codec"] == "h264"
        assert meta["runway/request_id"]
        assert meta["runway/source_sha256"]
        assert isinstance(meta["runway/cost_usd"], float) and meta["runway/cost_usd"] > 0
        assert check_statuses(instance, key) == {name: "SUCCEEDED" for name in CHECK_NAMES}
    assert set(keys) - good == {"too-wide.png", "not-an-image.png"}
    requested = {r.partition_key for r in instance.fetch_materializations(REQUESTS, limit=100).records}
    assert requested == good
    reasons = failure_reasons(instance, discovery.failed_run_ids[0])
    assert set(reasons) == {"too-wide.png", "not-an-image.png"}
    assert "aspect ratio 3.00" in reasons["too-wide.png"] and "crop" in reasons["too-wide.png"]
    assert str(files["not-an-image.png"]) in reasons["not-an-image.png"]

    # Re-running everything bills nothing and rewrites nothing.
    mtimes = {key: os.stat(videos[key]["runway/video_uri"]).st_mtime_ns for key in good}
    count = video_materialization_count(instance)
    submit = defs.resolve_job_def("runway_submit_job")
    collect = defs.resolve_job_def("runway_collect_job")
    for key in good:
        assert submit.execute_in_process(instance=instance, partition_key=key).success
        assert collect.execute_in_process(instance=instance, partition_key=key).success
    assert emulator.ledger().billed_submissions == 4
    assert video_materialization_count(instance) == count
    assert {key: os.stat(videos[key]["runway/video_uri"]).st_mtime_ns for key in good} == mtimes


def test_changed_image_bills_exactly_one_new_submission(tmp_path: Path, emulator, instance: DagsterInstance):
    files = write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), on_change="regenerate")
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []
    assert emulator.ledger().billed_submissions == 3

    time.sleep(0.01)
    files["img01.png"].write_bytes(png_bytes(180, 320, (250, 10, 10)))
    outcome = daemon.tick("runway_discovery_sensor")
    assert outcome.new_partitions == 0 and len(outcome.run_ids) == 1
    assert run_until_idle(daemon) == []
    assert emulator.ledger().billed_submissions == 4

    # A tick with nothing new changes nothing.
    outcome = daemon.tick("runway_discovery_sensor")
    assert outcome.run_ids == [] and outcome.failed_run_ids == []
    assert emulator.ledger().billed_submissions == 4


def test_status_sensor_cursor_is_rebuilt_from_the_event_log(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    emulator.pause()
    daemon.tick("runway_discovery_sensor")
    first = daemon.tick("runway_status_sensor")
    assert first.run_ids == []
    daemon.cursors["runway_status_sensor"] = "not a cursor"  # lost or corrupt
    emulator.resume()
    assert run_until_idle(daemon) == []
    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert all(video_metadata(instance, key) for key in keys)
    # Losing the cursor again, after everything was collected, collects nothing twice.
    count = video_materialization_count(instance)
    daemon.cursors["runway_status_sensor"] = None
    assert run_until_idle(daemon) == []
    assert video_materialization_count(instance) == count
    assert emulator.ledger().billed_submissions == 3


def test_many_completions_are_batched_into_few_runs(tmp_path: Path, emulator, instance: DagsterInstance):
    write_images(tmp_path / "images", valid=12, invalid=False)
    defs = make_defs(
        emulator,
        str(tmp_path / "images"),
        str(tmp_path / "videos"),
        submit_batch_size=5,
        collect_batch_size=5,
    )
    daemon = LocalDaemon(defs, instance)
    discovery = daemon.tick("runway_discovery_sensor")
    assert len(discovery.run_ids) == 3  # 12 new images in batches of 5
    time.sleep(0.2)
    outcome = daemon.tick("runway_status_sensor")
    assert len(outcome.run_ids) == 3  # 12 completions, 3 collection runs
    assert run_until_idle(daemon) == []
    assert video_materialization_count(instance) == 12


def test_failed_generation_fails_its_partition_visibly_and_others_go_on(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    from dagster_runway.emulator import FaultRule

    write_images(tmp_path / "images", valid=3, invalid=False)
    emulator.add_fault(
        FaultRule(kind="generation_failed", endpoint="any", times=1, failure_code="SAFETY.INPUT.IMAGE")
    )
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    failed_runs = run_until_idle(daemon)
    assert len(failed_runs) == 1
    reasons = failure_reasons(instance, failed_runs[0])
    assert len(reasons) == 1
    ((bad_key, reason),) = reasons.items()
    assert "SAFETY.INPUT.IMAGE" in reason and "do not retry" in reason
    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert {k for k in keys if video_metadata(instance, k)} == set(keys) - {bad_key}
    # The UI's "failed" partitions: attempted in a failed run and not materialized since.
    attempts = instance.event_log_storage.get_latest_asset_partition_materialization_attempts_without_materializations(
        VIDEOS
    )
    failed = {p for p, (run_id, _) in attempts.items() if instance.get_run_by_id(run_id).is_failure}
    assert failed == {bad_key}
    # Running the partition again is how a user asks for a new attempt: a failed request is not reused.
    submit = defs.resolve_job_def("runway_submit_job")
    assert submit.execute_in_process(instance=instance, partition_key=bad_key).success
    assert emulator.ledger().billed_submissions == 4
    assert run_until_idle(daemon) == []
    assert video_metadata(instance, bad_key) is not None
    # The status sensor recorded the request's progress on the requests asset.
    observed = instance.fetch_observations(REQUESTS, limit=100).records
    assert {r.asset_observation.metadata["runway/status"].value for r in observed} >= {"completed"}


def test_a_changed_image_marks_its_video_stale_without_paying(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    files = write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))  # on_change="mark_stale"
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []

    def status(key: str) -> tuple[StaleStatus, StaleStatus]:
        resolver = get_stale_status_resolver(instance, list(defs.resolve_asset_graph().assets_defs))
        return resolver.get_status(REQUESTS, key), resolver.get_status(VIDEOS, key)

    fresh = (StaleStatus.FRESH, StaleStatus.FRESH)
    assert status("img00.png") == fresh
    time.sleep(0.01)
    files["img00.png"].write_bytes(png_bytes(320, 180, (0, 250, 0)))
    outcome = daemon.tick("runway_discovery_sensor")
    assert outcome.run_ids == [] and outcome.events == 1
    assert status("img00.png") == (StaleStatus.STALE, StaleStatus.STALE)
    assert status("img01.png") == fresh
    assert emulator.ledger().billed_submissions == 2


def test_an_ambiguous_submit_is_recorded_and_never_silently_paid_again(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    from dagster_runway.emulator import FaultRule

    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    emulator.add_fault(FaultRule(kind="reset", endpoint="submit", times=1, after_accept=True))
    daemon = LocalDaemon(defs, instance)
    outcome = daemon.tick("runway_discovery_sensor")
    assert len(outcome.failed_run_ids) == 1
    assert emulator.ledger().billed_submissions == 1  # accepted, but the answer was lost
    reason = failure_reasons(instance, outcome.failed_run_ids[0])["img00.png"]
    assert "may have been accepted and billed" in reason

    submit = defs.resolve_job_def("runway_submit_job")
    again = submit.execute_in_process(instance=instance, partition_key="img00.png", raise_on_error=False)
    assert not again.success
    assert "force_after_ambiguous" in failure_reasons(instance, again.run_id)["img00.png"]
    assert emulator.ledger().billed_submissions == 1

    forced = submit.execute_in_process(
        instance=instance,
        partition_key="img00.png",
        run_config={"ops": {"runway_requests": {"config": {"force_after_ambiguous": True}}}},
    )
    assert forced.success
    assert emulator.ledger().billed_submissions == 2
    assert run_until_idle(daemon) == []
    assert video_metadata(instance, "img00.png") is not None


def test_an_edited_sidecar_prompt_counts_as_a_change(tmp_path: Path, emulator, instance: DagsterInstance):
    write_images(tmp_path / "images", valid=2, invalid=False)
    (tmp_path / "images" / "img00.txt").write_text("a slow dolly-in")
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), on_change="regenerate")
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []
    assert video_metadata(instance, "img00.png")["runway/prompt_text"] == "a slow dolly-in"

    (tmp_path / "images" / "img00.txt").write_text("a fast whip pan")
    outcome = daemon.tick("runway_discovery_sensor")
    assert len(outcome.run_ids) == 1
    assert run_until_idle(daemon) == []
    assert emulator.ledger().billed_submissions == 3
    assert video_metadata(instance, "img00.png")["runway/prompt_text"] == "a fast whip pan"


def test_an_expired_request_fails_its_partition_with_the_fix(tmp_path: Path, emulator_factory, instance):
    emulator = emulator_factory(ttl_seconds=0.5)
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    time.sleep(1.0)  # the request and its video expire before anyone collects them
    failed = run_until_idle(daemon)
    assert len(failed) == 1
    reason = failure_reasons(instance, failed[0])["img00.png"]
    assert "expired" in reason and "materialize the requests partition again" in reason
    observed = instance.fetch_observations(REQUESTS, limit=10).records
    assert observed[0].asset_observation.metadata["runway/status"].value == "expired"


def test_status_sensor_polls_round_robin_inside_its_budget(tmp_path: Path, emulator_factory, instance):
    from dagster_runway import RunComfyResource
    from dagster_runway.pipeline import build_runway_pipeline

    emulator = emulator_factory(latency_seconds=0.4)
    write_images(tmp_path / "images", valid=6, invalid=False)
    resource = RunComfyResource(api_token=emulator.token, base_url=emulator.base_url, max_concurrency=1)
    defs = build_runway_pipeline(
        str(tmp_path / "images"), str(tmp_path / "videos"), resource=resource, sensor_budget_s=1.0
    )
    daemon = LocalDaemon(defs, instance)
    emulator.pause()
    daemon.tick("runway_discovery_sensor")
    daemon.tick("runway_status_sensor")
    first = decode_cursor(daemon.cursors["runway_status_sensor"], None)
    assert len(first["inflight"]) == 6
    assert 0 < first["rr"] < 6  # the budget cut the tick short; the next one starts where it stopped
    daemon.tick("runway_status_sensor")
    second = decode_cursor(daemon.cursors["runway_status_sensor"], None)
    assert second["rr"] > first["rr"]
    emulator.resume()
    assert run_until_idle(daemon, max_ticks=100) == []
    assert video_materialization_count(instance) == 6
