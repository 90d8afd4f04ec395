"""Blocking mode, run termination, S3 sources and outputs, definitions loading, large listings."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test, materialize

from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    PARTITIONS,
    VIDEOS,
    image_records,
    make_defs,
    run_until_idle,
    video_metadata,
    write_images,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


def _assets(defs):
    return [a for a in defs.assets if hasattr(a, "keys")]


def test_blocking_mode_submits_waits_and_collects_in_one_step(
    tmp_path: Path, emulator, instance: DagsterInstance
):
    write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), mode="blocking")
    instance.add_dynamic_partitions(PARTITIONS, ["img00.png", "img01.png"])
    result = materialize(
        _assets(defs),
        partition_key="img01.png",
        instance=instance,
        resources=defs.resources,
        selection=[VIDEOS],
    )
    assert result.success
    meta = video_metadata(instance, "img01.png")
    assert meta is not None and Path(meta["runway/video_uri"]).exists()
    assert emulator.ledger().billed_submissions == 1
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 5 and all(c.passed for c in checks)

    # Materializing again re-attaches to the same request: nothing billed, nothing rewritten.
    mtime = os.stat(meta["runway/video_uri"]).st_mtime_ns
    again = materialize(
        _assets(defs),
        partition_key="img01.png",
        instance=instance,
        resources=defs.resources,
        selection=[VIDEOS],
    )
    assert again.success
    assert emulator.ledger().billed_submissions == 1
    assert os.stat(meta["runway/video_uri"]).st_mtime_ns == mtime


def _interrupt_once_submitted(emulator) -> None:
    """Interrupt this process (what Dagster delivers to a step whose run is terminated) once a submit is billed."""

    def interrupt() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and emulator.ledger().submissions == 0:
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()


@pytest.mark.parametrize(("cancel_on_termination", "state_after"), [(True, "cancelled"), (False, "in_queue")])
def test_terminating_a_blocking_run_cancels_its_queued_request_unless_switched_off(
    tmp_path: Path, emulator, instance: DagsterInstance, cancel_on_termination: bool, state_after: str
):
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(
        emulator,
        str(tmp_path / "images"),
        str(tmp_path / "videos"),
        mode="blocking",
        cancel_on_termination=cancel_on_termination,
    )
    instance.add_dynamic_partitions(PARTITIONS, ["img00.png"])
    emulator.pause()  # the request stays queued

    _interrupt_once_submitted(emulator)
    result = materialize(
        _assets(defs),
        partition_key="img00.png",
        instance=instance,
        resources=defs.resources,
        selection=[VIDEOS],
        raise_on_error=False,
    )
    assert not result.success
    ledger = emulator.ledger()
    assert ledger.submissions == 1
    assert emulator.request_state(ledger.entries[0].request_id) == state_after
    # A request cancelled while queued is refunded.
    assert ledger.billed_submissions == (0 if cancel_on_termination else 1)


def test_s3_source_and_output_through_moto(tmp_path: Path, emulator, s3, instance: DagsterInstance):
    images = write_images(tmp_path / "images", valid=2, invalid=True)
    for name, path in images.items():
        s3.put(f"stills/{name}", path.read_bytes(), content_type="image/png")
    defs = make_defs(
        emulator,
        s3.url("stills"),
        s3.url("videos"),
        source_storage_options=s3.storage_options,
        output_storage_options=s3.storage_options,
    )
    daemon = LocalDaemon(defs, instance)
    discovery = daemon.tick("runway_discovery_sensor")
    assert discovery.new_partitions == 4
    assert len(run_until_idle(daemon)) == 1  # the submit run fails for the two bad images
    assert emulator.ledger().billed_submissions == 2
    made = [k for k in instance.get_dynamic_partitions(PARTITIONS) if video_metadata(instance, k)]
    assert len(made) == 2
    for key in made:
        link = video_metadata(instance, key)[
            "runway/video_uri"
        ]  # opens from the UI: the object on the endpoint
        assert link.startswith(f"{s3.endpoint_url}/{s3.bucket}/videos/")
        head = s3.client.head_object(Bucket=s3.bucket, Key=link.split(s3.bucket + "/", 1)[1])
        assert head["ContentType"] == "video/mp4" and head["ContentLength"] > 1000


def test_discovery_of_20000_images_records_one_batch_per_tick(tmp_path: Path, emulator, instance):
    """What a tick must do, counted, not what it managed in its time budget: the deadline is given."""
    from dagster_runway._compat import storage_connections_held
    from dagster_runway.pipeline import RunwayPipelineConfig
    from dagster_runway.pipeline.discovery import discover

    folder = tmp_path / "many"
    for i in range(200):
        sub = folder / f"batch{i:03d}"
        sub.mkdir(parents=True)
        for j in range(100):
            (sub / f"frame {j:03d}.png").write_bytes(b"\x89PNG")
    pipeline = RunwayPipelineConfig(source=str(folder), output=str(tmp_path / "videos"))
    with storage_connections_held(instance):
        started = time.monotonic()
        found = discover(pipeline, instance, "memory", deadline=math.inf)
    print(
        f"discovery over 20,000 images: {time.monotonic() - started:.2f}s"
    )  # the figure is bench/scale.py's
    # It lists a bounded part (discovery_list_per_tick objects at most, stopping once discovery_batch_size
    # is recorded) and records the first 1,000: the rest at the next ticks.
    assert (found.recorded, len(set(found.new))) == (1_000, 1_000)
    assert found.images < 20_000 and found.read <= pipeline.discovery_list_per_tick and not found.pass_done
    assert image_records(instance) == (1_000, 1_000), (
        "a materialization and an observation per recorded image"
    )


def test_a_tick_past_its_deadline_still_records_one_image(tmp_path: Path, instance):
    from dagster_runway._compat import storage_connections_held
    from dagster_runway.pipeline import RunwayPipelineConfig
    from dagster_runway.pipeline.discovery import discover

    folder = tmp_path / "some"
    folder.mkdir()
    for j in range(30):
        (folder / f"frame {j:03d}.png").write_bytes(b"\x89PNG")
    pipeline = RunwayPipelineConfig(source=str(folder), output=str(tmp_path / "videos"))
    with storage_connections_held(instance):
        late = discover(
            pipeline, instance, "memory", deadline=time.monotonic() - 1
        )  # every tick makes progress
    assert (late.images, late.recorded, late.deferred) == (30, 1, 29)


def test_the_discovery_sensor_adds_the_partitions_it_recorded_and_keeps_a_small_cursor(
    tmp_path: Path, emulator, instance
):
    folder = tmp_path / "some"
    folder.mkdir()
    for j in range(30):
        (folder / f"frame {j:03d}.png").write_bytes(b"\x89PNG")
    defs = make_defs(emulator, str(folder), str(tmp_path / "videos"), discovery_batch_size=10)
    sensor = defs.resolve_sensor_def("runway_discovery_sensor")
    from dagster import build_sensor_context
    from dagster._core.definitions.partitions.context import partition_loading_context

    with (
        build_sensor_context(instance=instance, definitions=defs) as context,
        partition_loading_context(dynamic_partitions_store=instance),
    ):
        result = sensor.evaluate_tick(context)
    cursor = json.loads(result.cursor)
    added = result.dynamic_partitions_requests[0].partition_keys
    assert len(added) == cursor["new"] == image_records(instance)[0] >= 1  # at least one, whatever the speed
    assert (
        cursor["images"] == 30
        and cursor["new"] + cursor["deferred"] == 30
        and cursor["manifest_unmatched"] == 0
    )
    assert result.run_requests == []  # the status sensor submits what is owed
    assert len(result.cursor) < 200  # a summary: the sensor's memory is in the instance's key-value store


def test_definitions_py_validates_with_the_dagster_cli(tmp_path: Path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "DAGSTER_DISABLE_TELEMETRY": "1"}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-f", str(ROOT / "definitions.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr


def _run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
    for name in ("RUNCOMFY_API_TOKEN", "RUNCOMFY_BASE_URL", "DAGSTER_HOME"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "dagster_runway.cli", "demo", *args,
        "--output", str(tmp_path / "videos"), "--dagster-home", str(tmp_path / "home"), "--time-scale", "0",
    ]  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_the_demo_runs_end_to_end_and_reports_every_partition(tmp_path: Path):
    done = _run_demo(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 of 4 partitions produced a passing video; 0 used the service's default prompt." in done.stdout
    assert "Started the RunComfy emulator" in done.stdout
    assert f"dagster-runway dev --dagster-home {tmp_path / 'home'}" in done.stdout
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 4
    assert len(list((tmp_path / "videos").glob("*.poster.jpg"))) == 4


def test_the_demo_exits_non_zero_and_says_why_when_an_image_is_bad(tmp_path: Path):
    write_images(tmp_path / "images", valid=1, invalid=True)
    done = _run_demo(tmp_path, "--images", str(tmp_path / "images"))
    assert done.returncode == 1
    # The one good image has no prompt: against the emulator it takes the service's default, and says so.
    assert "1 of 3 partitions produced a passing video; 1 used the service's default prompt." in done.stdout
    assert 'missing_prompt="service_default"' in done.stdout
    assert "too-wide.png: " in done.stdout and "aspect ratio 3.00" in done.stdout
    assert " - INFO - " not in done.stderr  # the sensors' tick lines stay out of the console
    # A re-run pays nothing more and still shows each failure's reason, read back from the event log.
    again = _run_demo(tmp_path, "--images", str(tmp_path / "images"))
    assert again.returncode == 1 and "discovery: 0 new image(s)" in again.stdout
    assert "too-wide.png: " in again.stdout and "aspect ratio 3.00" in again.stdout
    assert "no video was produced" not in again.stdout
