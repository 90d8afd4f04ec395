"""Cron scheduling: submission at set times, and the checks of stored videos run again on their own."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test
from pydantic import ValidationError

from dagster_runway.pipeline import RunwayPipelineConfig
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    CHECK_NAMES,
    PARTITIONS,
    check_statuses,
    latest_failure,
    make_defs,
    png_bytes,
    run_until_idle,
    status_summary,
    video_materialization_count,
    video_metadata,
    write_images,
)


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


def test_with_a_submit_schedule_images_are_submitted_at_its_ticks_only(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(
        emulator, str(tmp_path / "images"), str(tmp_path / "videos"), submit_schedule="0 22 * * *"
    )
    assert {s.name for s in defs.sensors} == {"runway_status_sensor"}  # no discovery sensor
    assert {s.name for s in defs.schedules} == {"runway_submit_schedule", "runway_verify_schedule"}
    daemon = LocalDaemon(defs, instance)

    skipped = daemon.tick_schedule("runway_submit_schedule")
    assert skipped.run_ids == []  # the status sensor has not read the event log yet: nothing is sent
    assert len(instance.get_dynamic_partitions(PARTITIONS)) == 3  # but the images are discovered
    daemon.tick("runway_status_sensor")
    assert status_summary(daemon)["scheduled"] == 3 and emulator.ledger().submissions == 0

    sent = daemon.tick_schedule("runway_submit_schedule")
    assert len(sent.run_ids) == 1 and emulator.ledger().billed_submissions == 3
    # Another tick before the status sensor's next one: the schedule reads what that run recorded
    # (the sensor's memory is a tick old) and sends nothing again.
    assert daemon.tick_schedule("runway_submit_schedule").run_ids == []
    assert run_until_idle(daemon) == []  # the status sensor collects as soon as they are done
    assert all(video_metadata(instance, k) for k in instance.get_dynamic_partitions(PARTITIONS))

    (tmp_path / "images" / "late.png").write_bytes(
        (tmp_path / "images" / "img00.png").read_bytes()[:-1] + b"\x00"
    )
    assert run_until_idle(daemon) == [] and emulator.ledger().submissions == 3  # nothing before the tick
    assert daemon.tick_schedule("runway_submit_schedule").run_ids == []  # a broken copy: fails, pays nothing
    assert emulator.ledger().billed_submissions == 3


def test_the_verify_schedule_rechecks_stored_videos_without_regenerating(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []
    count = video_materialization_count(instance)
    with open(video_metadata(instance, "img01.png")["runway/video_uri"], "ab") as video:
        video.write(b"bit rot")  # silent corruption at rest

    outcome = daemon.tick_schedule("runway_verify_schedule")
    assert len(outcome.run_ids) == 1 and outcome.failed_run_ids == []
    assert video_materialization_count(instance) == count and emulator.ledger().billed_submissions == 3
    assert check_statuses(instance, "img00.png") == dict.fromkeys(CHECK_NAMES, "SUCCEEDED")
    rotten = check_statuses(instance, "img01.png")
    assert rotten["checksum_at_rest"] == "FAILED" and rotten["video_playable"] == "SUCCEEDED"


def test_a_bad_cron_string_is_refused_with_the_option_named() -> None:
    with pytest.raises(ValidationError, match="(?s)submit_schedule.*not a cron string"):
        RunwayPipelineConfig(source="a", output="b", submit_schedule="every night")


def test_the_source_check_says_whether_an_image_changed_or_was_deleted(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    from dagster import DagsterEventType

    write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []
    (tmp_path / "images" / "img00.png").write_bytes(png_bytes(320, 180, (0, 250, 0)))
    (tmp_path / "images" / "img02.png").unlink()

    (run_id,) = daemon.tick_schedule("runway_verify_schedule").run_ids
    why = {}
    for record in instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
    ).records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data  # type: ignore[union-attr]
        if evaluation.check_name == "source_unchanged":
            why[evaluation.partition] = (evaluation.passed, evaluation.metadata.get("why"))
    assert why["img01.png"] == (True, None)
    assert why["img00.png"][0] is False and "changed after it was hashed" in why["img00.png"][1].value
    assert why["img02.png"][0] is False and why["img02.png"][1].value.startswith("deleted")
    assert emulator.ledger().billed_submissions == 3  # judged, never paid again


@pytest.mark.parametrize("launcher", ["status sensor", "submit schedule"])
def test_submit_runs_that_keep_dying_stop_at_max_run_attempts_whichever_launches_them(
    tmp_path: Path, emulator, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch, launcher: str
):
    """The status sensor and the submit schedule share one decider of what is owed: both launch a dying
    submit run at most ``max_run_attempts`` times, then fail the partition as runs_exhausted, and a new
    version of the image is owed again."""
    from dagster_runway.pipeline import assets

    write_images(tmp_path / "images", valid=2, invalid=False)
    scheduled = launcher == "submit schedule"
    defs = make_defs(
        emulator,
        str(tmp_path / "images"),
        str(tmp_path / "videos"),
        max_run_attempts=2,
        **({"submit_schedule": "0 22 * * *"} if scheduled else {}),
    )
    daemon = LocalDaemon(defs, instance)

    def worker_dies(*args, **kwargs):
        raise RuntimeError("the worker died before recording anything")

    monkeypatch.setattr(assets, "SubmitBatch", worker_dies)

    def tick() -> list[str]:
        """One launcher tick; the failed runs it started."""
        if scheduled:
            return daemon.tick_schedule("runway_submit_schedule").failed_run_ids
        return daemon.tick("runway_status_sensor").failed_run_ids

    if scheduled:
        daemon.tick_schedule("runway_submit_schedule")  # discovers; the sensor has not read the log yet
    else:
        daemon.tick("runway_discovery_sensor")
    first = daemon.tick(
        "runway_status_sensor"
    ).failed_run_ids  # the sensor launches at once; the schedule waits
    failed = [first if not scheduled else tick(), *(tick() for _ in range(3))]
    assert [len(ids) for ids in failed] == [1, 1, 0, 0]  # one run for both partitions, twice, then none
    keys = instance.get_dynamic_partitions(PARTITIONS)
    for key in keys:
        failure = latest_failure(instance, key)
        assert failure is not None and failure.failure_class == "runs_exhausted", key
        assert "2 submit runs launched" in failure.reason
    daemon.tick("runway_status_sensor")
    assert status_summary(daemon)["failed"] == 2 and emulator.ledger().submissions == 0

    monkeypatch.undo()
    changed = tmp_path / "images" / "img00.png"
    changed.write_bytes(png_bytes(320, 180, (10, 200, 30)))
    if scheduled:
        daemon.tick("runway_status_sensor")
        assert daemon.tick_schedule("runway_submit_schedule").run_ids  # a new version: owed again
    else:
        daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []
    assert emulator.ledger().billed_submissions == 1  # only the changed image; the other stays failed
    assert video_metadata(instance, "img00.png") is not None
    assert latest_failure(instance, "img01.png").failure_class == "runs_exhausted"


def test_the_schedules_launch_memory_applies_only_to_partitions_without_progress_and_survives_garbage() -> (
    None
):
    from dagster_runway.pipeline import reconcile as rc
    from dagster_runway.pipeline.schedules import _overlay_launches

    memory = rc.SensorMemory()
    for key in ("same", "new-request", "garbage", "odd-key"):
        memory.state(key).image_version = "v1"
    memory.state("new-request").request_id = "r2"
    entries = {
        "same": {"of": "v1|None", "runs": 2, "key": "scheduled:x", "at": 50.0},
        "new-request": {"of": "v1|None", "runs": 2, "key": "scheduled:x", "at": 50.0},  # a request since
        "garbage": {"of": "v1|None", "runs": "many", "at": None},
        "odd-key": {"of": "v1|None", "runs": 1, "key": ["not", "a", "key"], "at": 1},
        "gone": {"of": "v1|None", "runs": 2},  # no longer a partition
        "not-a-dict": [1, 2],
    }
    kept = _overlay_launches(entries, memory)
    assert kept == {"same", "odd-key"}
    assert (memory.state("same").submit_runs, memory.state("same").run_key) == (2, "scheduled:x")
    assert memory.state("new-request").submit_runs == 0 and memory.state("garbage").submit_runs == 0
    assert memory.state("odd-key").run_key is None and memory.state("odd-key").submit_runs == 1
