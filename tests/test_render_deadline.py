"""The render deadline end to end: the deferred pipeline on a real instance against the emulator, with a
tiny ``max_render_s`` and the emulator paused so that a request stays where the test wants it.

A request still queued past the deadline is cancelled and refunded (the emulator's ledger and the
journal both say so), its partition fails as ``render_timeout`` with the next step, and no later
tick submits it again; one already rendering is reported with what it may cost, and its video is
collected if it finishes after all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance, MetadataValue, instance_for_test

from dagster_runway import journal as jn
from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline.gallery import GalleryIndex
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    REQUESTS,
    latest_failure,
    make_defs,
    run_until_idle,
    status_summary,
    video_metadata,
    write_images,
)

KEY = "img00.png"


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


def _submitted(daemon: LocalDaemon, emulator: Emulator) -> str:
    """Discover the one image and let the status sensor submit it; return the request id."""
    daemon.tick("runway_discovery_sensor")
    outcome = daemon.tick("runway_status_sensor")
    assert len(outcome.run_ids) == 1, outcome  # the submit run
    [entry] = emulator.ledger().entries
    return entry.request_id


def _journal(tmp_path: Path) -> jn.Journal:
    return jn.Journal(str(tmp_path / "videos" / ".runway"))


def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_a_queued_request_past_the_deadline_is_cancelled_refunded_and_not_resubmitted(
    tmp_path: Path, emulator_factory: Callable[..., Emulator], instance: DagsterInstance
) -> None:
    emulator = emulator_factory(paused=True)  # every request stays in the queue
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_render_s=0.001)
    daemon = LocalDaemon(defs, instance)
    request_id = _submitted(daemon, emulator)
    assert emulator.request_state(request_id) == "in_queue"
    assert _journal(tmp_path).spent_usd() > 0  # its estimate is reserved

    assert run_until_idle(daemon) == []

    ledger = emulator.ledger()
    assert ledger.submissions == 1 and ledger.billed_submissions == 0 and ledger.total_cost_usd == 0
    assert ledger.entries[0].state == "cancelled"
    assert _journal(tmp_path).spent_usd() == 0  # the claim is settled at 0: the cap counts nothing for it
    failure = latest_failure(instance, KEY)
    assert (
        failure is not None
        and failure.failure_class == fl.RENDER_TIMEOUT
        and failure.request_id == request_id
    )
    assert (
        "still queued" in failure.reason
        and "max_render_s=0.001" in failure.reason
        and "refunded" in failure.reason
    )
    assert "not submitted again by itself" in failure.next_step
    assert "materialize runway/requests for this partition" in failure.next_step
    assert status_summary(daemon)["failed"] == 1 and video_metadata(instance, KEY) is None
    row = GalleryIndex(str(tmp_path / "videos")).rows()[KEY]
    assert row["s"] == "failed" and "past the render deadline" in row["w"]  # not pending
    observed = [r.asset_observation.metadata for r in instance.fetch_observations(REQUESTS, limit=20).records]
    assert any(m.get("runway/status") == MetadataValue.text("cancelled") for m in observed)  # shown cancelled

    # Later ticks launch nothing and pay nothing, even once the service would run it.
    emulator.resume()
    for _ in range(5):
        outcome = daemon.tick("runway_status_sensor")
        assert outcome.run_ids == [] and outcome.failed_run_ids == []
    assert emulator.ledger().submissions == 1

    # The next step works: a new submit by hand, collected by the sensor.
    submit = defs.resolve_job_def("runway_submit_job")
    assert submit.execute_in_process(instance=instance, partition_key=KEY).success
    _until(
        lambda: bool(daemon.tick("runway_status_sensor")) and video_metadata(instance, KEY) is not None,
        "the video",
    )
    ledger = emulator.ledger()
    assert ledger.submissions == 2 and ledger.billed_submissions == 1
    assert video_metadata(instance, KEY)["runway/request_id"] == ledger.entries[1].request_id


def test_a_rendering_request_past_the_deadline_is_reported_with_its_cost_and_collected_if_it_finishes(
    tmp_path: Path, emulator_factory: Callable[..., Emulator], instance: DagsterInstance
) -> None:
    emulator = emulator_factory(
        paused=True, time_scale=1.0, queue_seconds=(0.0, 0.0), render_seconds=(3.0, 3.0)
    )
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_render_s=0.001)
    daemon = LocalDaemon(defs, instance)
    request_id = _submitted(daemon, emulator)
    emulator.resume()  # it starts at once (no queue wait) ...
    _until(lambda: emulator.request_state(request_id) != "in_queue", "the render to start")
    emulator.pause()  # ... and stays rendering while the emulator clock stands still
    assert emulator.request_state(request_id) == "in_progress"
    estimate = _journal(tmp_path).spent_usd()

    assert run_until_idle(daemon) == []
    failure = latest_failure(instance, KEY)
    assert (
        failure is not None
        and failure.failure_class == fl.RENDER_TIMEOUT
        and failure.request_id == request_id
    )
    assert "still rendering" in failure.reason and "cannot be cancelled" in failure.reason
    assert (
        f"about {estimate:.2f} USD" in failure.reason and failure.metadata["estimated_cost_usd"] == estimate
    )
    assert (
        "collects the video if it finishes" in failure.next_step
        and "not submitted again" in failure.next_step
    )
    assert emulator.ledger().billed_submissions == 1 and emulator.request_state(request_id) == "in_progress"
    assert _journal(tmp_path).spent_usd() == estimate  # it may be billed: the estimate stays counted
    for _ in range(3):
        assert daemon.tick("runway_status_sensor").run_ids == []  # polled now and then, never resubmitted

    # It finishes after all: a late poll sees it, and the video already paid for is collected.
    emulator.resume()
    _until(lambda: emulator.request_state(request_id) == "succeeded", "the render to finish")

    def collected() -> bool:
        daemon.tick("runway_status_sensor")
        return video_metadata(instance, KEY) is not None

    _until(collected, "the late video to be collected")
    assert video_metadata(instance, KEY)["runway/request_id"] == request_id
    assert emulator.ledger().submissions == 1
    daemon.tick("runway_status_sensor")
    assert status_summary(daemon)["done"] == 1


def test_a_cancel_that_fails_is_made_again_while_the_request_is_still_queued(
    tmp_path: Path, emulator_factory: Callable[..., Emulator], instance: DagsterInstance
) -> None:
    emulator = emulator_factory(paused=True)
    write_images(tmp_path / "images", valid=1, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_render_s=0.001)
    daemon = LocalDaemon(defs, instance)
    request_id = _submitted(daemon, emulator)
    emulator.add_fault(FaultRule(kind="server_error", endpoint="cancel", times=3))  # every try of one cancel

    daemon.tick("runway_status_sensor")
    failure = latest_failure(instance, KEY)
    assert failure is not None and failure.failure_class == fl.RENDER_TIMEOUT
    assert "could not be cancelled" in failure.reason and "may still be billed" in failure.reason
    assert emulator.ledger().billed_submissions == 1

    # A late poll finds it still queued: the cancel is made again, and this time it is refunded.
    _until(
        lambda: bool(daemon.tick("runway_status_sensor")) and emulator.ledger().billed_submissions == 0,
        "the refund",
    )
    failure = latest_failure(instance, KEY)
    assert failure is not None and "cancelled, and a cancelled request is refunded" in failure.reason
    assert emulator.request_state(request_id) == "cancelled" and _journal(tmp_path).spent_usd() == 0
    assert run_until_idle(daemon) == [] and emulator.ledger().submissions == 1
