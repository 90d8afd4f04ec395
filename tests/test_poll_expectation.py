"""The status sensor polls by expectation: a real instance and the emulator over loopback HTTP, the
sensor's ticks driven by an injected clock (15 s apart), its polls counted per request."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context, instance_for_test

from dagster_runway.emulator import Emulator
from dagster_runway.pipeline import reconcile as rc
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline import status
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.sensors import load_memory, memory_key, save_memory
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import make_defs, write_images

SENSOR = "runway_status_sensor"
INTERVAL = 15.0
# What this deployment has learnt: renders of 30 to 90 s (the quickest 36 s), a queue that gains a
# position every 20 s. 64 samples of each, so that a few polls of a stalled queue do not outvote them.
RENDERS = [30.0 + 60.0 * n / 63 for n in range(64)]
DRAINS = [0.05] * 64


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


class Sensor:
    """Ticks of the status sensor at an injected clock, counting the requests each poll asks about."""

    def __init__(
        self, tmp_path: Path, defs: Any, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.defs, self.instance = defs, instance
        self.pipeline = _pipeline(tmp_path)
        self.now = max(record.timestamp for record in _records(instance, self.pipeline))  # the last submit
        self.polls: Counter[str] = Counter()
        self.ticks: list[SensorResult] = []
        poll = status.poll_statuses

        def counted(resource: Any, ids: list[str], budget: float) -> Any:
            self.polls.update(ids)
            return poll(resource, ids, budget)

        monkeypatch.setattr(status, "poll_statuses", counted)

    @property
    def key(self) -> str:
        return memory_key(self.pipeline, SENSOR)

    def memory(self) -> dict[str, Any]:
        return load_memory(self.instance, self.key) or {}

    def teach(self) -> None:
        """Give the sensor's memory what a deployment would have learnt from earlier renders."""
        memory = rc.SensorMemory.from_json(self.memory())
        memory.learnt = rc.Learnt(list(RENDERS), list(DRAINS))
        save_memory(self.instance, self.key, memory.to_json())

    def tick(self) -> SensorResult:
        self.now += INTERVAL
        with build_sensor_context(
            instance=self.instance, resources=self.defs.resources, definitions=self.defs, sensor_name=SENSOR
        ) as context:
            result = status.StatusTick(
                self.pipeline,
                context,
                getattr(context.resources, self.pipeline.resource_key),
                sensor_name=SENSOR,
                submit_job="runway_submit_job",
                collect_job="runway_collect_job",
                submit_op="requests",
                collect_op="videos",
                clock=lambda: self.now,
            ).run()
        self.ticks.append(result)
        return result

    def collected(self, key: str, order: list[str]) -> int | None:
        """The tick (1-based) that first requested a collect run for ``key``."""
        for number, result in enumerate(self.ticks, 1):
            for request in result.run_requests or []:
                if request.job_name == "runway_collect_job" and key in rc.request_partitions(request, order):
                    return number
        return None


def _wait_for(emulator: Emulator, request_id: str, state: str) -> None:
    deadline = time.monotonic() + 60
    while emulator.request_state(request_id) != state:
        assert time.monotonic() < deadline, f"request {request_id} never became {state}"
        time.sleep(0.05)


def _wait_for_any(emulator: Emulator, request_ids: list[str], state: str) -> None:
    deadline = time.monotonic() + 60
    while all(emulator.request_state(rid) != state for rid in request_ids):
        assert time.monotonic() < deadline, f"none of {request_ids} became {state}"
        time.sleep(0.01)


def _submitted(
    tmp_path: Path, emulator: Emulator, instance: DagsterInstance, count: int
) -> tuple[Any, dict[str, str]]:
    """``count`` images submitted by the pipeline; returns the definitions and each partition's request id."""
    write_images(tmp_path / "images", valid=count, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    daemon.tick(SENSOR)  # the submit run
    ids = {record.partition: record.request_id for record in _records(instance, _pipeline(tmp_path))}
    assert len(ids) == count
    return defs, ids


def _records(instance: DagsterInstance, pipeline: RunwayPipelineConfig) -> list[rec.RequestRecord]:
    page = rec.page_after(
        instance,
        requests_key=pipeline.requests_key,
        videos_key=pipeline.videos_key,
        images_key=pipeline.images_key,
        after=0,
    )
    return list(page.requests)


def _pipeline(tmp_path: Path) -> RunwayPipelineConfig:
    return RunwayPipelineConfig(
        source=str(tmp_path / "images"), output=str(tmp_path / "videos"), missing_prompt="service_default"
    )


def test_requests_are_polled_when_they_may_be_done_queued_ones_by_their_position(
    tmp_path: Path, emulator_factory: Callable[..., Emulator], instance: DagsterInstance, monkeypatch
) -> None:
    # One request renders at a time; each takes 8 s of the emulator's clock, which stands still while paused.
    emulator = emulator_factory(
        paused=True, time_scale=1.0, queue_seconds=(0.0, 0.0), render_seconds=(8.0, 8.0), max_concurrency=1
    )
    defs, ids = _submitted(tmp_path, emulator, instance, 4)
    order = sorted(ids)
    emulator.resume()
    _wait_for_any(
        emulator, list(ids.values()), "in_progress"
    )  # the first submitted (the run sends them at once)
    emulator.pause()  # it renders; the three others wait in the queue at positions 1 to 3
    sensor = Sensor(tmp_path, defs, instance, monkeypatch)
    sensor.teach()

    # Nothing is polled before the quickest render seen here (36 s) could have ended after its submit.
    sensor.tick(), sensor.tick()
    assert sensor.polls == Counter()
    sensor.tick()  # 45 s after the submits: all four are due
    assert sensor.polls == Counter(ids.values())
    states = rc.SensorMemory.from_json(sensor.memory()).partitions
    first = next(key for key in order if states[key].status == "in_progress")
    queued = sorted((key for key in order if key != first), key=lambda key: states[key].queue_position or 0)
    assert [states[key].queue_position for key in queued] == [1, 2, 3]

    # 20 ticks (5 minutes) later: the one rendering is polled every (84 - 36) / 2 = 24 s once past its
    # quickest end; the queued ones when those ahead should have gone (20 s a position, predicted short
    # by 0.8) and a render could have ended: position 3 is due every 84 s, so far less often than each tick.
    for _ in range(20):
        sensor.tick()
    deep = ids[queued[-1]]
    assert sensor.polls[deep] <= 5 < 23
    assert sensor.polls[ids[first]] > sensor.polls[ids[queued[0]]] >= sensor.polls[deep]
    state = rc.SensorMemory.from_json(sensor.memory()).partitions[queued[-1]]
    assert state.status == "in_queue" and state.queue_position == 3 and state.poll_at > sensor.now

    # The first finishes: past its expected end, it is noticed (its collect requested) within 2 ticks.
    emulator.resume()
    _wait_for(emulator, ids[first], "succeeded")
    emulator.pause()
    finished_after = len(sensor.ticks)
    for _ in range(3):
        sensor.tick()
    noticed = sensor.collected(first, order)
    assert noticed is not None and noticed - finished_after <= 2
    assert all(sensor.collected(key, order) is None for key in queued)
    learnt = rc.SensorMemory.from_json(sensor.memory()).learnt
    assert learnt.renders[:64] != RENDERS  # it learnt from this render too


def test_sensor_memory_from_before_polling_by_expectation_is_used_as_it_is(
    tmp_path: Path, emulator_factory: Callable[..., Emulator], instance: DagsterInstance, monkeypatch
) -> None:
    emulator = emulator_factory(paused=True)
    defs, ids = _submitted(tmp_path, emulator, instance, 3)
    sensor = Sensor(tmp_path, defs, instance, monkeypatch)
    sensor.tick()
    assert sensor.polls == Counter(ids.values())  # nothing learnt: polled at once, as before
    # The memory as the sensor wrote it before: no learnt times, no poll schedule, a round-robin offset.
    old = sensor.memory()
    del old["l"]
    old["rr"] = 2
    for state in old["p"].values():
        for name in ("poll_at", "polled_at", "started_at"):
            state.pop(name, None)
    save_memory(instance, sensor.key, old)
    sensor.polls.clear()
    result = sensor.tick()
    assert sensor.polls == Counter(ids.values())  # every request is due, as it was
    assert "rebuilding" not in (result.cursor or "")
    memory = rc.SensorMemory.from_json(sensor.memory())
    assert all(memory.partitions[key].poll_at > sensor.now for key in ids)  # and scheduled from now on
