"""The deferred pipeline end to end on a real instance: sensors tick, runs launch, checks run, money is counted."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetRecordsFilter, DagsterInstance, instance_for_test
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from dagster_runway import _compat
from dagster_runway.emulator import FaultRule
from dagster_runway.media import probe_video
from dagster_runway.media.provenance import read_tags
from dagster_runway.pipeline import metadata as md
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    CHECK_NAMES,
    PARTITIONS,
    REQUESTS,
    VIDEOS,
    check_statuses,
    failure_reasons,
    image_records,
    latest_failure,
    make_defs,
    png_bytes,
    run_until_idle,
    status_summary,
    video_materialization_count,
    video_metadata,
    write_images,
)

PASSED = {name: "SUCCEEDED" for name in CHECK_NAMES}


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


def _settle(daemon: LocalDaemon) -> list[str]:
    daemon.tick("runway_discovery_sensor")
    return run_until_idle(daemon)


def test_valid_images_become_checked_videos_and_invalid_ones_fail_before_paying(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    files = write_images(tmp_path / "images", valid=4, invalid=True)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)

    discovery = daemon.tick("runway_discovery_sensor")
    assert (
        discovery.new_partitions == 6 and discovery.run_ids == []
    )  # the status sensor decides what to submit
    failed_runs = run_until_idle(daemon)
    assert (
        len(failed_runs) == 1
    )  # the submit run fails for the two bad images, after submitting the four good ones
    assert emulator.ledger().billed_submissions == 4

    keys = instance.get_dynamic_partitions(PARTITIONS)
    good = {k for k in keys if video_metadata(instance, k)}
    assert good == set(keys) - {"too-wide.png", "not-an-image.png"}
    for key in good:
        meta = video_metadata(instance, key)
        assert Path(meta["runway/video_uri"]).exists() and Path(meta["runway/poster"]).exists()
        assert meta["runway/video_codec"] == "h264" and meta["runway/request_id"]
        assert meta["runway/cost_usd"] > 0 and meta["runway/source_sha256"]
        assert check_statuses(instance, key) == PASSED  # current: linked to this very materialization
        # The UI renders the poster inline (under ~1,000 characters) and lists the headline first.
        preview = meta["runway/poster_preview"]
        assert preview.startswith("![poster](data:image/webp;base64,") and len(preview) <= 1000
    headline = list(
        instance.fetch_materializations(VIDEOS, limit=1).records[0].asset_materialization.metadata
    )
    assert headline[:5] == [
        f"runway/{f}" for f in ("state", "request_id", "cost_usd", "poster_preview", "video_uri")
    ]
    wide = latest_failure(instance, "too-wide.png")
    assert (
        wide.failure_class == "invalid_input" and "aspect ratio 3.00" in wide.reason and "crop" in wide.reason
    )
    junk = latest_failure(instance, "not-an-image.png")
    assert str(files["not-an-image.png"]) in junk.reason
    assert set(failure_reasons(instance, failed_runs[0])) == {"too-wide.png", "not-an-image.png"}
    assert status_summary(daemon)["done"] == 4 and status_summary(daemon)["failed"] == 2

    # Materializing everything again bills nothing, rewrites nothing, and still ends materialized and checked.
    mtimes = {k: os.stat(video_metadata(instance, k)["runway/video_uri"]).st_mtime_ns for k in good}
    count = video_materialization_count(instance)
    submit, collect = defs.resolve_job_def("runway_submit_job"), defs.resolve_job_def("runway_collect_job")
    for key in sorted(good):
        assert submit.execute_in_process(instance=instance, partition_key=key).success
        assert collect.execute_in_process(instance=instance, partition_key=key).success
    assert emulator.ledger().billed_submissions == 4
    assert video_materialization_count(instance) == count + len(good)
    for key in good:
        meta = video_metadata(instance, key)
        assert meta["runway/state"] == md.VERIFIED and meta["runway/verified_unchanged"] is True
        assert os.stat(meta["runway/video_uri"]).st_mtime_ns == mtimes[key]
        assert check_statuses(instance, key) == PASSED
    reused = instance.fetch_materializations(REQUESTS, limit=1).records[0].asset_materialization
    assert reused.metadata["runway/state"].value == md.REUSED and "runway/input" in reused.metadata
    assert run_until_idle(daemon) == [] and emulator.ledger().billed_submissions == 4


def test_a_changed_image_is_regenerated_once_when_asked(tmp_path: Path, emulator, instance: DagsterInstance):
    files = write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), on_change="regenerate")
    daemon = LocalDaemon(defs, instance)
    assert _settle(daemon) == [] and emulator.ledger().billed_submissions == 3
    before = video_metadata(instance, "img01.png")["runway/request_id"]

    time.sleep(0.01)
    files["img01.png"].write_bytes(png_bytes(180, 320, (250, 10, 10)))
    assert daemon.tick("runway_discovery_sensor").new_partitions == 0
    assert run_until_idle(daemon) == []
    assert emulator.ledger().billed_submissions == 4
    assert video_metadata(instance, "img01.png")["runway/request_id"] != before
    assert _settle(daemon) == [] and emulator.ledger().billed_submissions == 4


def test_a_changed_image_marks_its_video_stale_without_paying(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    files = write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))  # on_change="mark_stale"
    daemon = LocalDaemon(defs, instance)
    assert _settle(daemon) == []

    def status(key: str) -> tuple[StaleStatus, StaleStatus]:
        resolver = get_stale_status_resolver(instance, list(defs.resolve_asset_graph().assets_defs))
        return resolver.get_status(REQUESTS, key), resolver.get_status(VIDEOS, key)

    fresh = (StaleStatus.FRESH, StaleStatus.FRESH)
    assert status("img00.png") == fresh
    time.sleep(0.01)
    files["img00.png"].write_bytes(png_bytes(320, 180, (0, 250, 0)))
    before = image_records(instance)
    daemon.tick("runway_discovery_sensor")
    assert image_records(instance) == (before[0] + 1, before[1] + 1), "the changed image is recorded again"
    assert run_until_idle(daemon) == []
    assert status("img00.png") == (StaleStatus.STALE, StaleStatus.STALE)
    assert status("img01.png") == fresh
    assert emulator.ledger().billed_submissions == 2


def test_an_edited_sidecar_prompt_counts_as_a_change(tmp_path: Path, emulator, instance: DagsterInstance):
    write_images(tmp_path / "images", valid=2, invalid=False)
    (tmp_path / "images" / "img00.txt").write_text("a slow dolly-in")
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), on_change="regenerate")
    daemon = LocalDaemon(defs, instance)
    assert _settle(daemon) == []
    assert video_metadata(instance, "img00.png")["runway/prompt_text"] == "a slow dolly-in"

    (tmp_path / "images" / "img00.txt").write_text("a fast whip pan")
    assert _settle(daemon) == []
    assert emulator.ledger().billed_submissions == 3
    assert video_metadata(instance, "img00.png")["runway/prompt_text"] == "a fast whip pan"


def test_a_fixed_bad_input_is_submitted_whatever_on_change_says(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=1, invalid=True)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))  # on_change="mark_stale"
    daemon = LocalDaemon(defs, instance)
    _settle(daemon)
    assert latest_failure(instance, "too-wide.png").failure_class == "invalid_input"
    assert _settle(daemon) == [] and emulator.ledger().billed_submissions == 1  # nothing retried as is

    (tmp_path / "images" / "too-wide.png").write_bytes(
        png_bytes(400, 200)
    )  # cropped to exactly 2:1 ... still out
    _settle(daemon)
    assert emulator.ledger().billed_submissions == 1
    (tmp_path / "images" / "too-wide.png").write_bytes(png_bytes(390, 200))  # inside 1:2..2:1 now
    assert _settle(daemon) == []
    assert emulator.ledger().billed_submissions == 2
    assert video_metadata(instance, "too-wide.png") is not None


def test_lost_sensor_memory_is_rebuilt_from_the_event_log_without_paying_or_collecting_twice(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    emulator.pause()
    daemon.tick("runway_discovery_sensor")
    daemon.tick("runway_status_sensor")  # submits; everything stays queued
    assert emulator.ledger().billed_submissions == 3
    _forget(instance)  # memory and cursors wiped, as if the instance's key-value store were lost
    emulator.resume()
    assert run_until_idle(daemon) == []
    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert all(video_metadata(instance, key) for key in keys)
    count = video_materialization_count(instance)
    _forget(instance)
    assert _settle(daemon) == []
    assert video_materialization_count(instance) == count
    assert emulator.ledger().billed_submissions == 3


def _forget(instance: DagsterInstance) -> None:
    for sensor in ("runway_discovery_sensor", "runway_status_sensor"):
        _compat.kv_set(instance, f"dagster_runway/runway_images/{sensor}", "")
        _compat.kv_set(instance, f"dagster_runway/local_daemon/cursor/{sensor}", "")


def test_many_partitions_are_batched_into_few_runs(tmp_path: Path, emulator, instance: DagsterInstance):
    write_images(tmp_path / "images", valid=12, invalid=False)
    defs = make_defs(
        emulator,
        str(tmp_path / "images"),
        str(tmp_path / "videos"),
        submit_batch_size=5,
        collect_batch_size=5,
    )
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    first = daemon.tick("runway_status_sensor")
    assert len(first.run_ids) == 3  # 12 new images, submitted in runs of 5
    time.sleep(0.3)
    second = daemon.tick("runway_status_sensor")
    assert len(second.run_ids) == 3  # 12 finished requests, collected in runs of 5
    assert run_until_idle(daemon) == []
    assert video_materialization_count(instance) == 12


def test_a_safety_rejection_fails_its_partition_with_the_fix_and_is_not_paid_again(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=3, invalid=False)
    emulator.add_fault(
        FaultRule(kind="generation_failed", endpoint="any", times=1, failure_code="SAFETY.INPUT.IMAGE")
    )
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    failed_runs = _settle(daemon)
    assert len(failed_runs) == 1
    ((bad, reason),) = failure_reasons(instance, failed_runs[0]).items()
    assert "SAFETY.INPUT.IMAGE" in reason and "change the image or its prompt" in reason
    failure = latest_failure(instance, bad)
    assert failure.failure_class == "generation_safety" and failure.request_id
    # Where the UI shows it: the partition's failure observation opens with what happened and the fix...
    observed = instance.fetch_observations(
        AssetRecordsFilter(VIDEOS, asset_partitions=[bad]), limit=1
    ).records[0]
    description = observed.asset_observation.description
    assert description.startswith("Failed: ") and "Next step: change the image or its prompt" in description
    assert list(observed.asset_observation.metadata)[:3] == [
        "runway/state",
        "runway/request_id",
        "runway/failure_class",
    ]
    # ...and each of its checks failed, saying why, instead of "execution failed" with no reason.
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(VIDEOS, name) for name in CHECK_NAMES], partition_keys=[bad]
    )
    assert {info.check_key.name: info.latest_execution_status for info in infos} == dict.fromkeys(
        CHECK_NAMES, AssetCheckExecutionRecordStatus.FAILED
    )
    (latest,) = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(VIDEOS, "video_playable")], partition_filter=PartitionKeyFilter(key=bad)
    ).values()
    evaluation = latest.event.dagster_event.asset_check_evaluation_data
    assert (
        evaluation.description.startswith("No video to check: ")
        and "SAFETY.INPUT.IMAGE" in evaluation.description
    )
    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert {k for k in keys if video_metadata(instance, k)} == set(keys) - {bad}
    # The UI's failed partitions: attempted in a failed run and not materialized since.
    attempts = instance.event_log_storage.get_latest_asset_partition_materialization_attempts_without_materializations(
        VIDEOS
    )
    assert {p for p, (run_id, _) in attempts.items() if instance.get_run_by_id(run_id).is_failure} == {bad}

    # Neither the sensor nor a plain materialization pays for the same rejected input again...
    assert _settle(daemon) == [] and emulator.ledger().billed_submissions == 3
    submit = defs.resolve_job_def("runway_submit_job")
    again = submit.execute_in_process(instance=instance, partition_key=bad, raise_on_error=False)
    assert not again.success and "force_resubmit" in failure_reasons(instance, again.run_id)[bad]
    assert emulator.ledger().billed_submissions == 3
    # ...unless asked to.
    config = {"ops": {"runway_requests": {"config": {"force_resubmit": True}}}}
    assert submit.execute_in_process(instance=instance, partition_key=bad, run_config=config).success
    assert emulator.ledger().billed_submissions == 4
    assert run_until_idle(daemon) == [] and video_metadata(instance, bad) is not None
    observed = instance.fetch_observations(REQUESTS, limit=100).records
    assert {
        r.asset_observation.metadata["runway/status"].value
        for r in observed
        if "runway/status" in r.asset_observation.metadata
    } >= {"completed"}


def test_an_internal_failure_is_retried_by_the_status_sensor_when_allowed(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=2, invalid=False)
    emulator.add_fault(
        FaultRule(
            kind="generation_failed", endpoint="any", times=1, failure_code="INTERNAL.BAD_OUTPUT.CODE01"
        )
    )
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), retry_failed_generations=1)
    daemon = LocalDaemon(defs, instance)
    failed_runs = _settle(daemon)
    assert len(failed_runs) == 1  # the collect that found the failure; the sensor then resubmitted it
    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert all(video_metadata(instance, k) for k in keys)
    assert emulator.ledger().billed_submissions == 3  # one retry, billed once
    retried = [k for k in keys if video_metadata(instance, k)["runway/attempt"] == 2]
    assert len(retried) == 1


def test_an_ambiguous_submit_is_flagged_and_never_silently_paid_again(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    emulator.add_fault(FaultRule(kind="reset", endpoint="submit", times=1, after_accept=True))
    daemon = LocalDaemon(defs, instance)
    failed = _settle(daemon)
    assert len(failed) == 1 and emulator.ledger().billed_submissions == 1  # accepted, but the answer was lost
    failure = latest_failure(instance, "img00.png")
    assert failure.failure_class == "ambiguous" and "may have been accepted and billed" in failure.reason
    assert "force_after_ambiguous: true" in failure.next_step and "seed" in failure.next_step
    # One fingerprint: every one the failure and the journal name is the one recorded on the partition.
    recorded = failure.metadata["fingerprint"]
    claims = list((tmp_path / "videos" / ".runway" / "claims").rglob("*.json"))
    named = re.findall(
        r"\b[0-9a-f]{64}\b", failure.reason + failure.next_step + "".join(c.read_text() for c in claims)
    )
    assert named and set(named) == {recorded}, (named, recorded)

    assert _settle(daemon) == []  # the sensor does not retry it
    submit = defs.resolve_job_def("runway_submit_job")
    again = submit.execute_in_process(instance=instance, partition_key="img00.png", raise_on_error=False)
    assert (
        not again.success and "force_after_ambiguous" in failure_reasons(instance, again.run_id)["img00.png"]
    )
    assert emulator.ledger().billed_submissions == 1

    config = {"ops": {"runway_requests": {"config": {"force_after_ambiguous": True}}}}
    assert submit.execute_in_process(instance=instance, partition_key="img00.png", run_config=config).success
    assert emulator.ledger().billed_submissions == 2
    assert run_until_idle(daemon) == [] and video_metadata(instance, "img00.png") is not None


def test_an_expired_request_fails_its_partition_with_the_fix(tmp_path: Path, emulator_factory, instance):
    emulator = emulator_factory(ttl_seconds=0.5)
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    emulator.pause()
    daemon.tick("runway_discovery_sensor")
    daemon.tick("runway_status_sensor")  # submitted, still queued
    emulator.resume()
    time.sleep(1.0)  # the request and its video expire before anyone collects them
    failed = run_until_idle(daemon)
    assert len(failed) == 1
    failure = latest_failure(instance, "img00.png")
    assert failure.failure_class == "expired" and "materialize runway/requests" in failure.next_step
    assert emulator.ledger().billed_submissions == 1


def test_the_spend_cap_refuses_before_paying_and_the_rest_goes_when_it_is_raised(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=4, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_spend_usd=0.5)
    daemon = LocalDaemon(defs, instance)
    _settle(daemon)
    assert emulator.ledger().billed_submissions == 2
    keys = instance.get_dynamic_partitions(PARTITIONS)
    capped = [k for k in keys if video_metadata(instance, k) is None]
    assert len(capped) == 2
    failure = latest_failure(instance, capped[0])
    assert failure.failure_class == "spend_cap" and "spend cap reached: $0.50 of $0.50" in failure.reason
    assert "raise max_spend_usd" in failure.next_step
    assert _settle(daemon) == [] and emulator.ledger().billed_submissions == 2  # nothing more while capped
    done = [k for k in keys if k not in capped]
    assert video_metadata(instance, done[0])["runway/spend_cap_usd"] == 0.5

    raised = LocalDaemon(
        make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_spend_usd=2.0), instance
    )
    assert _settle(raised) == []
    assert emulator.ledger().billed_submissions == 4
    assert all(video_metadata(instance, k) for k in keys)


def _one_call_at_a_time(tmp_path: Path, emulator, instance, **options) -> LocalDaemon:
    """A pipeline whose resource makes one API call at a time, over the images in ``tmp_path``."""
    from dagster_runway import RunComfyResource
    from dagster_runway.pipeline import build_runway_pipeline

    resource = RunComfyResource(api_token=emulator.token, base_url=emulator.base_url, max_concurrency=1)
    defs = build_runway_pipeline(
        str(tmp_path / "images"),
        str(tmp_path / "videos"),
        resource=resource,
        missing_prompt="service_default",
        **options,
    )
    return LocalDaemon(defs, instance)


def test_status_sensor_polls_round_robin_inside_its_budget(tmp_path: Path, emulator_factory, instance):
    emulator = emulator_factory(latency_seconds=0.4)
    write_images(tmp_path / "images", valid=6, invalid=False)
    daemon = _one_call_at_a_time(tmp_path, emulator, instance, sensor_budget_s=4.0)
    emulator.pause()
    daemon.tick("runway_discovery_sensor")
    daemon.tick("runway_status_sensor")  # submits the six
    daemon.tick("runway_status_sensor")
    first = status_summary(daemon)
    assert first["in_flight"] == 6 and 0 < first["polled"] < 6  # the budget cut the tick short
    daemon.tick("runway_status_sensor")
    assert status_summary(daemon)["polled"] > 0  # the next one goes on from there
    emulator.resume()
    assert run_until_idle(daemon, max_ticks=100) == []
    assert video_materialization_count(instance) == 6


def test_a_status_tick_polls_for_at_most_twice_its_interval_then_launches_what_it_found(
    tmp_path: Path, emulator, instance
):
    write_images(tmp_path / "images", valid=24, invalid=False)
    daemon = _one_call_at_a_time(tmp_path, emulator, instance, status_interval_s=1)
    daemon.tick("runway_discovery_sensor")
    daemon.tick("runway_status_sensor")  # submits the 24; the emulator renders them at once
    # 24 polls one at a time at 0.5 s each need 12 s: more than twice the interval (10 s at least), and
    # less than the tick's budget (40 s).
    emulator.add_fault(FaultRule(kind="slow", endpoint="status", delay_seconds=0.5))
    daemon.tick("runway_status_sensor")
    first = status_summary(daemon)
    assert 0 < first["polled"] < 24, first
    assert first["collect"] == first["polled"], "what the polls found finished is launched by this tick"
    assert run_until_idle(daemon, max_ticks=20) == []  # the next tick polls the rest
    assert video_materialization_count(instance) == 24 and emulator.ledger().billed_submissions == 24


def test_a_copied_or_renamed_image_reuses_the_request_of_the_same_input(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    files = write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    assert _settle(daemon) == [] and emulator.ledger().billed_submissions == 2
    original = video_metadata(instance, "img00.png")

    (tmp_path / "images" / "copy-of-img00.png").write_bytes(files["img00.png"].read_bytes())
    files["img01.png"].rename(tmp_path / "images" / "renamed.png")
    assert _settle(daemon) == []
    assert emulator.ledger().billed_submissions == 2  # same bytes, same settings: the same paid generation
    copy = video_metadata(instance, "copy-of-img00.png")
    assert copy["runway/request_id"] == original["runway/request_id"]
    assert copy["runway/fingerprint"] == original["runway/fingerprint"]
    assert video_metadata(instance, "renamed.png") is not None
    # The same video, each copy tagged with the image it stands for (runway_source_path).
    copied, first = read_tags(str(copy["runway/video_uri"])), read_tags(str(original["runway/video_uri"]))
    assert copied == {**first, "source_path": str(tmp_path / "images" / "copy-of-img00.png")}
    assert (
        probe_video(str(copy["runway/video_uri"])).frames
        == probe_video(str(original["runway/video_uri"])).frames
    )


def corrupt_pixel_png(width: int = 320, height: int = 180) -> bytes:
    """A PNG whose header, chunk CRCs and end marker are intact, but whose compressed pixel data is broken."""
    import struct
    import zlib

    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, "PNG")
    data = bytearray(out.getvalue())
    tag = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[tag - 4 : tag])
    start = tag + 4
    data[start + length // 2 : start + length // 2 + 64] = bytes(64)
    data[start + length : start + length + 4] = struct.pack(">I", zlib.crc32(data[tag : start + length]))
    return bytes(data)


def test_corrupt_pixel_data_behind_an_intact_header_fails_before_paying(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=2, invalid=False)
    (tmp_path / "images" / "broken.png").write_bytes(corrupt_pixel_png())
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    failed_runs = _settle(LocalDaemon(defs, instance))
    assert len(failed_runs) == 1
    assert emulator.ledger().billed_submissions == 2  # the two good ones; nothing for the broken one
    failure = latest_failure(instance, "broken.png")
    assert failure.failure_class == "invalid_input"
    assert "broken.png" in failure.reason and "image data is corrupt" in failure.reason
    assert "re-export" in failure.reason


def test_a_discovery_tick_past_its_time_budget_records_the_rest_at_the_next_ticks(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), sensor_budget_s=0.001)
    daemon = LocalDaemon(defs, instance)
    ticks = [daemon.tick("runway_discovery_sensor") for _ in range(4)]
    # Each tick records one image (at least one, so that a slow listing still makes progress).
    assert [t.new_partitions for t in ticks] == [1, 1, 1, 0]
    assert [json.loads(t.cursor or "{}")["deferred"] for t in ticks] == [2, 1, 0, 0]
    assert image_records(instance) == (3, 3)


def test_a_large_drop_is_recorded_a_batch_per_tick_and_finished_without_loss(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=5, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), discovery_batch_size=2)
    daemon = LocalDaemon(defs, instance)
    ticks, recorded = [], []
    for _ in range(4):
        ticks.append(daemon.tick("runway_discovery_sensor"))
        recorded.append(image_records(instance))
    assert [t.new_partitions for t in ticks] == [2, 2, 1, 0]
    assert recorded == [(2, 2), (4, 4), (5, 5), (5, 5)], (
        "a materialization and an observation per recorded image"
    )
    assert [json.loads(t.cursor or "{}")["deferred"] for t in ticks] == [3, 1, 0, 0]
    assert sorted(instance.get_dynamic_partitions(PARTITIONS)) == [f"img{i:02d}.png" for i in range(5)]
    # A changed image beyond the batch is found again at the next tick, not forgotten.
    for i, name in enumerate(("img00.png", "img01.png", "img02.png")):
        (tmp_path / "images" / name).write_bytes(png_bytes(320, 200, (1, 2, i)))
    changed = [json.loads(daemon.tick("runway_discovery_sensor").cursor or "{}") for _ in range(3)]
    # "deferred" counts the images listed but not judged yet, changed or not (img02 to img04 here).
    assert [(c["changed"], c["deferred"], c["pass_done"]) for c in changed] == [
        (2, 3, False),
        (1, 0, True),
        (0, 0, True),
    ]
    assert run_until_idle(daemon) == [] and emulator.ledger().billed_submissions == 5


def test_a_run_that_ends_during_a_status_tick_is_not_launched_again_by_that_tick(
    tmp_path: Path, emulator, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick reads the runs in progress before the event log: a run that ends between the two reads
    still covers its partitions in that tick (the other order launched them again, ~20% of the
    partitions at 1,000 images on the real daemon)."""
    from dagster import DagsterRunStatus
    from dagster._core.test_utils import create_run_for_test

    from dagster_runway.pipeline import status as sensors

    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    (key,) = instance.get_dynamic_partitions(PARTITIONS)
    run = create_run_for_test(
        instance,
        job_name="runway_submit_job",
        status=DagsterRunStatus.STARTED,
        tags={_compat.PARTITION_NAME_TAG: key},
    )
    assert daemon.tick("runway_status_sensor").run_ids == []  # the run in progress covers the partition

    ingest = sensors.StatusTick.ingest

    def ingest_then_the_run_ends(self: sensors.StatusTick, budget_s: float) -> None:
        ingest(self, budget_s)
        instance.report_run_failed(run)  # it ends, having recorded nothing, while the tick goes on

    monkeypatch.setattr(sensors.StatusTick, "ingest", ingest_then_the_run_ends)
    assert daemon.tick("runway_status_sensor").run_ids == []
    monkeypatch.setattr(sensors.StatusTick, "ingest", ingest)
    relaunched = daemon.tick("runway_status_sensor")  # the next tick sees it ended: the partition is owed
    assert len(relaunched.run_ids) == 1 and emulator.ledger().billed_submissions == 1


def test_runs_a_tick_requested_before_its_process_died_are_launched_by_the_next_tick(
    tmp_path: Path, emulator, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the daemon resumes an interrupted tick: without it, the status sensor would hold the
    partitions for the run it requested (whose creation it waits for) until its grace ran out."""
    import socket

    from dagster import JobDefinition

    write_images(tmp_path / "images", valid=3, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    dead = LocalDaemon(defs, instance)
    dead.driver = f"{socket.gethostname()}:{_reaped_pid()}"
    dead.tick("runway_discovery_sensor")

    class Died(Exception):
        pass

    def die(*args: object, **kwargs: object) -> None:
        raise Died  # the process is killed after the tick, before its run is created

    with monkeypatch.context() as patch:
        patch.setattr(JobDefinition, "execute_in_process", die)
        with pytest.raises(Died):
            dead.tick("runway_status_sensor")
    assert emulator.ledger().submissions == 0 and instance.get_runs() == []

    again = LocalDaemon(defs, instance)
    resumed = again.tick("runway_status_sensor")  # first the dead tick's submit run, then its own requests
    assert instance.get_run_by_id(resumed.run_ids[0]).job_name == "runway_submit_job"
    assert emulator.ledger().billed_submissions == 3
    assert run_until_idle(again) == []  # settles at once: no wait for a run that will never be created
    assert video_materialization_count(instance) == 3 and emulator.ledger().billed_submissions == 3


def _reaped_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
