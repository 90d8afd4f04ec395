"""The status sensor's decisions, as plain functions: what each partition is owed, and what runs cover."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from dagster import AssetKey

from dagster_runway import _compat
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline.reconcile import (
    POLL_CAP_S,
    Coverage,
    KnownFailure,
    Learnt,
    PartitionState,
    Policy,
    SensorMemory,
    batch_run_requests,
    covered,
    due_polls,
    hold_collects,
    late_poll,
    late_poll_interval,
    observe,
    owed,
    poll_due,
    request_partitions,
    stage,
)

POLICY = Policy(on_change="mark_stale", retry_failed_generations=0, spend_cap_usd=None)
ORDER = [f"p{i}" for i in range(6)]


def _state(**values: object) -> PartitionState:
    state = PartitionState(image_version="v1")
    for name, value in values.items():
        setattr(state, name, value)
    return state


def _failure(cls: str, storage_id: int = 10, **values: object) -> KnownFailure:
    return KnownFailure(**{"failure_class": cls, "source_version": "v1", "storage_id": storage_id, **values})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "policy", "expected"),
    [
        (_state(), POLICY, "submit"),  # new: no request, no failure
        (_state(request_id="r", request_version="v1", request_storage_id=5), POLICY, "in_flight"),
        (_state(request_id="r", request_version="v1", request_storage_id=5, status="completed"), POLICY, "collect"),
        (_state(request_id="r", request_version="v1", request_storage_id=5, video_request_id="r"), POLICY, "done"),
        # a changed image with a video: stale, unless regenerate
        (_state(request_id="r", request_version="v0", request_storage_id=5, video_request_id="r"), POLICY, "done"),
        (
            _state(request_id="r", request_version="v0", request_storage_id=5, video_request_id="r"),
            Policy("regenerate", 0, None),
            "submit",
        ),
        # a changed image without a video is always submitted again
        (_state(request_id="r", request_version="v0", request_storage_id=5), POLICY, "submit"),
        # failures: final, retried by the sensor, or over once the image changes
        (_state(failure=_failure(fl.INVALID_INPUT)), POLICY, "failed"),
        (_state(failure=_failure(fl.INVALID_INPUT, source_version="v0")), POLICY, "submit"),
        (_state(failure=_failure(fl.SERVICE_UNAVAILABLE)), POLICY, "submit"),
        (_state(failure=_failure(fl.AMBIGUOUS)), POLICY, "failed"),
        (
            _state(request_id="r", request_version="v1", request_storage_id=5, failure=_failure(fl.CANCELLED, request_id="r")),
            POLICY,
            "submit",
        ),
        (
            _state(request_id="r", request_version="v1", request_storage_id=5, failure=_failure(fl.DOWNLOAD, request_id="r")),
            POLICY,
            "collect",
        ),
        (
            _state(
                request_id="r", request_version="v1", request_storage_id=5, attempt=1,
                failure=_failure(fl.GENERATION_INTERNAL, request_id="r"),
            ),
            POLICY,
            "failed",
        ),
        (
            _state(
                request_id="r", request_version="v1", request_storage_id=5, attempt=1,
                failure=_failure(fl.GENERATION_INTERNAL, request_id="r"),
            ),
            Policy("mark_stale", 1, None),
            "submit",
        ),
        (
            _state(
                request_id="r", request_version="v1", request_storage_id=5, attempt=2,
                failure=_failure(fl.GENERATION_INTERNAL, request_id="r"),
            ),
            Policy("mark_stale", 1, None),
            "failed",
        ),
    ],
)  # fmt: skip
def test_stage(state: PartitionState, policy: Policy, expected: str) -> None:
    assert stage(state, policy) == expected


def test_a_schema_drift_failure_is_owed_again_once_accepted_or_at_its_hourly_look() -> None:
    drift = _state(
        failure=_failure(fl.SCHEMA_DRIFT, retry_at=1000.0, schema_changes=["duration.enum", "seed.maximum"])
    )
    assert stage(drift, POLICY, now=999.0) == "failed"
    assert stage(drift, POLICY, now=1001.0) == "submit"  # the catalog may be back to what was built for
    some = Policy("mark_stale", 0, None, accept_schema_changes=frozenset({"duration.enum"}))
    assert stage(drift, some, now=999.0) == "failed"  # one of the two is not accepted
    both = Policy("mark_stale", 0, None, accept_schema_changes=frozenset({"duration.enum", "seed.maximum"}))
    assert stage(drift, both, now=999.0) == "submit"


def test_an_output_mismatch_is_owed_again_only_once_the_output_is_adopted() -> None:
    mismatch = _state(failure=_failure(fl.OUTPUT_MISMATCH))
    assert stage(mismatch, POLICY) == "failed"
    assert stage(mismatch, Policy("mark_stale", 0, None, adopt_output=True)) == "submit"


def test_a_spend_cap_failure_is_owed_again_when_the_window_allows_or_the_cap_is_raised() -> None:
    capped = _state(failure=_failure(fl.SPEND_CAP, retry_at=1000.0, cap_usd=5.0))
    assert stage(capped, Policy("mark_stale", 0, 5.0), now=999.0) == "failed"
    assert stage(capped, Policy("mark_stale", 0, 5.0), now=1001.0) == "submit"
    no_window = _state(failure=_failure(fl.SPEND_CAP, cap_usd=5.0))
    assert stage(no_window, Policy("mark_stale", 0, 5.0)) == "failed"
    assert stage(no_window, Policy("mark_stale", 0, 6.0)) == "submit"


def test_a_newer_request_clears_an_older_failure_and_its_run_counter() -> None:
    state = _state(submit_runs=2, failure=_failure(fl.SERVICE_UNAVAILABLE, storage_id=10))
    state.saw_request("r", 1, "v1", storage_id=11)
    assert state.failure is None and state.submit_runs == 0 and state.request_id == "r"
    state.saw_request("old", 1, "v1", storage_id=3)  # an older record read late changes nothing
    assert state.request_id == "r"


DEADLINE = Policy("mark_stale", 0, None, max_render_s=3 * 3600.0)


def _submitted(at: float = 1000.0, **values: object) -> PartitionState:
    return _state(request_id="r", request_version="v1", request_storage_id=5, submitted_at=at, **values)


def test_a_request_past_the_render_deadline_is_overdue_from_its_submit_time() -> None:
    queued = _submitted(status="in_queue")
    assert stage(queued, DEADLINE, now=1000.0 + 3 * 3600) == "in_flight"  # at the deadline, not past it
    assert stage(queued, DEADLINE, now=1001.0 + 3 * 3600) == "overdue"
    assert stage(_submitted(status="in_progress"), DEADLINE, now=1e9) == "overdue"
    assert stage(queued, POLICY, now=1e9) == "in_flight"  # no deadline configured
    assert stage(_submitted(at=0.0), DEADLINE, now=1e9) == "in_flight"  # submit time unknown: never early
    assert (
        stage(_submitted(status="completed"), DEADLINE, now=1e9) == "collect"
    )  # finished: collect, late or not
    # Cancelled past the deadline with no failure recorded (a tick that ran out of time): the deadline
    # pass records it (refunded, not resubmitted), rather than a collect that would resubmit it.
    assert stage(_submitted(status="cancelled"), DEADLINE, now=1e9) == "overdue"
    assert (
        stage(_submitted(status="cancelled"), DEADLINE, now=2000.0) == "collect"
    )  # before it: a plain cancel
    # The submit time is the request's, kept from its record, and reset by a new request only.
    state = _state()
    state.saw_request("r", 1, "v1", storage_id=5, submitted_at=1234.5)
    state.saw_request("r", 1, "v1", storage_id=6, submitted_at=9999.0)  # the same request reused later
    assert state.submitted_at == 1234.5
    state.saw_request("r2", 2, "v1", storage_id=7, submitted_at=5000.0)
    assert state.submitted_at == 5000.0


def test_a_render_timeout_is_final_unless_the_request_finishes_after_all() -> None:
    timeout = _failure(fl.RENDER_TIMEOUT, request_id="r")
    now = 1e9
    cancelled = _submitted(status="cancelled", failure=timeout)
    assert stage(cancelled, DEADLINE, now) == "failed"  # refunded, and never resubmitted by the sensor
    assert not late_poll(cancelled, DEADLINE, now)  # nothing more to learn
    rendering = _submitted(status="in_progress", failure=timeout)
    assert stage(rendering, DEADLINE, now) == "failed"
    assert late_poll(rendering, DEADLINE, now)  # checked again, at a low rate
    rendering.late_poll_at = now + late_poll_interval(DEADLINE)
    assert not late_poll(rendering, DEADLINE, now) and late_poll(rendering, DEADLINE, rendering.late_poll_at)
    assert (
        late_poll_interval(DEADLINE) == 600.0
        and late_poll_interval(Policy("mark_stale", 0, None, 5.0)) == 5.0
    )
    for status in ("completed", "succeeded", "failed"):  # it ended: collect what it made (it was billed)
        assert stage(_submitted(status=status, failure=timeout), DEADLINE, now) == "collect"
    assert stage(_submitted(status="expired", failure=timeout), DEADLINE, now) == "failed"
    # A changed image (or settings) is owed a submit of its own: the timeout was about the old one.
    changed = _submitted(status="cancelled", failure=timeout)
    changed.image_version = "v2"
    assert stage(changed, DEADLINE, now) == "submit"
    # Running it again by hand (a new request) clears the failure: a fresh deadline.
    again = _submitted(status="cancelled", failure=timeout)
    again.saw_request("r2", 2, "v1", storage_id=11, submitted_at=now)
    assert again.failure is None and stage(again, DEADLINE, now) == "in_flight"


def test_memory_round_trips_through_json() -> None:
    memory = SensorMemory(high_water=42, caught_up=True, learnt=Learnt([30.0, 41.5], [2.5]))
    memory.state("a").failure = _failure(fl.DOWNLOAD, request_id="r")
    memory.state("b").request_id = "x"
    memory.state("b").submitted_at, memory.state("b").late_poll_at = 1234.5, 2000.0
    memory.state("b").poll_at, memory.state("b").polled_at, memory.state("b").started_at = (
        1300.0,
        1250.0,
        1240.0,
    )
    again = SensorMemory.from_json(memory.to_json())
    assert again == memory
    assert SensorMemory.from_json({"v": 99}) == SensorMemory()  # an unknown version starts afresh


def _run(
    job: str,
    tags: dict[str, str],
    *,
    config: dict | None = None,
    selection: set | None = None,
    age: float = 0,
):
    started = datetime.now(UTC).timestamp() - age
    run = SimpleNamespace(job_name=job, tags=tags, run_config=config or {}, asset_selection=selection)
    return SimpleNamespace(
        dagster_run=run, start_time=started, create_timestamp=datetime.fromtimestamp(started, UTC)
    )


def test_runs_in_progress_cover_their_partitions_per_stage() -> None:
    requests, videos = AssetKey(["runway", "requests"]), AssetKey(["runway", "videos"])
    range_tags = {_compat.ASSET_PARTITION_RANGE_START_TAG: "p1", _compat.ASSET_PARTITION_RANGE_END_TAG: "p3"}
    runs = [
        _run("submit", range_tags, config={"ops": {"op": {"config": {"partitions": ["p1", "p3"]}}}}),
        _run("collect", {_compat.PARTITION_NAME_TAG: "p5"}),
        _run(
            "__ASSET_JOB", {_compat.PARTITION_NAME_TAG: "p0"}, selection={requests, videos}
        ),  # a backfill run
        _run("collect", {_compat.PARTITION_NAME_TAG: "p4"}, age=7200),  # lost: stale
    ]
    coverage = covered(
        runs, order=ORDER, requests_key=requests, videos_key=videos, submit_job="submit", collect_job="collect",
        stale_after_s=3600,
    )  # fmt: skip
    assert coverage.submit == {"p0", "p1", "p3"}
    assert coverage.collect == {"p0", "p5"}


def test_owed_partitions_are_batched_in_gapless_ranges_with_a_key_per_attempt() -> None:
    def make(attempt: int) -> list:
        return batch_run_requests(
            ["p0", "p1", "p3", "p4", "p5"], ORDER, max_batch=2, prefix="submit", identity=lambda k: f"{k}|{attempt}",
            config_for=lambda batch: {"ops": {"op": {"config": {"partitions": batch}}}}, job_name="submit_job",
        )  # fmt: skip

    first = make(1)
    assert [request_partitions(r, ORDER) for r in first] == [["p0", "p1"], ["p3", "p4"], ["p5"]]
    assert first[2].partition_key == "p5" and first[0].partition_key is None  # a range goes by its tags
    assert all(r.job_name == "submit_job" for r in first)
    assert [r.run_key for r in make(1)] == [
        r.run_key for r in first
    ]  # a repeated tick asks for the same runs
    assert not {r.run_key for r in make(2)} & {r.run_key for r in first}  # a retry gets keys of its own


def test_one_decider_says_what_is_owed_for_the_sensor_and_the_schedule() -> None:
    states = {
        "p0": _state(),  # owed a submit
        "p1": _state(submit_runs=3),  # owed a submit, its runs spent
        "p2": _state(run_key="submit:k", launched_at=100.0),  # its run just requested, not created yet
        "p3": _state(run_key="submit:k", launched_at=0.0),  # requested long ago, never created: owed again
        "p4": _state(request_id="r", request_version="v1", request_storage_id=5, status="completed"),
        "p5": _state(request_id="r", request_version="v1", request_storage_id=5, video_request_id="r"),
    }
    coverage = Coverage(collect=frozenset({"p4"}))
    decide = dict(
        max_run_attempts=3, uncreated={"submit:k"}, grace_s=60.0, now=120.0, wall_now=120.0
    )  # fmt: skip
    sensor = owed(ORDER, states, POLICY, coverage, launches=frozenset({"submit", "collect"}), **decide)
    assert (sensor.submit, sensor.collect, sensor.exhausted) == (["p0", "p3"], [], [("p1", "submit", 3)])
    assert sensor.counts == {**sensor.counts, "submit": 2, "running": 2, "failed": 1, "done": 1}
    # With a submit schedule, the sensor counts the submits as scheduled; the schedule decides them alike.
    collects_only = owed(ORDER, states, POLICY, coverage, launches=frozenset({"collect"}), **decide)
    assert collects_only.submit == [] and collects_only.counts["scheduled"] == 4
    schedule = owed(ORDER, states, POLICY, Coverage(), launches=frozenset({"submit"}), **decide)
    assert (schedule.submit, schedule.exhausted) == (sensor.submit, sensor.exhausted)
    assert schedule.collect == [] and schedule.counts["collect"] == 1


def test_a_part_batch_of_finished_requests_waits_for_the_collect_run_in_progress_then_goes() -> None:
    ready = [PartitionState(request_id=f"r{i}", status="completed", ready_at=1000.0 + i) for i in range(3)]
    wait = {"batch_size": 10, "now": 1030.0, "max_wait_s": 60.0}
    assert hold_collects(
        ready, collect_running=True, **wait
    )  # a run is going: the next tick sends more at once
    assert not hold_collects(ready, collect_running=False, **wait)  # nothing going: send now
    assert not hold_collects(ready, collect_running=True, **{**wait, "now": 1061.0})  # waited long enough
    assert not hold_collects(ready * 4, collect_running=True, **wait)  # a full batch goes at once
    # A request whose finish no poll saw (a recollect after a failure, memory rebuilt) is never held.
    assert not hold_collects([*ready, PartitionState(request_id="r9")], collect_running=True, **wait)
    assert not hold_collects([], collect_running=True, **wait)


# Polling by expectation

T0 = 1_000_000.0
STEP_CAP = 30.0  # twice a 15 s status interval
# Renders of 30 to 90 s (10th percentile 36, 90th 84), and a queue that drains 10 positions a second.
LEARNT = [float(x) for x in range(30, 91, 6)]


def _learnt(drains: tuple[float, ...] = (10.0, 10.0, 10.0)) -> Learnt:
    return Learnt(list(LEARNT), list(drains))


def _flight(**values: object) -> PartitionState:
    return _state(
        **{"request_id": "r", "request_version": "v1", "request_storage_id": 5, "submitted_at": T0, **values}
    )


def test_a_new_request_is_first_due_when_the_quickest_renders_seen_would_end() -> None:
    state = _flight()
    assert poll_due(state, Learnt()) == T0  # nothing learnt yet: at once
    assert poll_due(state, _learnt()) == T0 + 36.0  # the 10th percentile of the renders seen
    assert poll_due(_flight(submitted_at=0.0), _learnt()) == 0.0  # submit time unknown: at once
    assert due_polls({"a": state}, ["a"], POLICY, _learnt(), T0 + 35.0) == []
    assert due_polls({"a": state}, ["a"], POLICY, _learnt(), T0 + 36.0) == ["a"]


def test_a_queued_request_waits_for_the_requests_ahead_and_a_render_scaled_by_its_position() -> None:
    waits = {}
    for position in (1, 100, 1000, 100_000):
        state = _flight()
        observe(state, _learnt(), "in_queue", position, T0 + 36.0, step_cap_s=STEP_CAP)
        waits[position] = state.poll_at - (T0 + 36.0)
    # 0.9 x position / 10 per second, plus the quickest render (36 s); no sooner than a running
    # request's step (30 s), no later than the cap.
    assert waits == pytest.approx({1: 36.09, 100: 45.0, 1000: 126.0, 100_000: POLL_CAP_S})


def test_queued_requests_are_polled_less_often_than_running_ones() -> None:
    queued, running = _flight(), _flight(status="in_progress", started_at=T0, polled_at=T0 + 40.0)
    observe(queued, _learnt(), "in_queue", 1, T0 + 100.0, step_cap_s=STEP_CAP)
    observe(running, _learnt(), "in_progress", None, T0 + 100.0, step_cap_s=STEP_CAP)
    assert running.poll_at - (T0 + 100.0) == 24.0  # past its quickest end: every (84 - 36) / 2 s
    assert queued.poll_at - (T0 + 100.0) > 24.0


def test_a_running_request_is_not_polled_before_the_quickest_render_would_end_after_its_start() -> None:
    state = _flight(status="in_queue", queue_position=50, polled_at=T0 + 36.0)
    observe(state, _learnt(), "in_progress", None, T0 + 46.0, step_cap_s=STEP_CAP)
    assert state.started_at == T0 + 41.0  # the 50 ahead of it were due to go in 5 s
    assert state.poll_at == T0 + 41.0 + 36.0
    # Past that, every step, never more than the cap (two ticks) apart.
    observe(state, _learnt(), "in_progress", None, T0 + 77.0, step_cap_s=STEP_CAP)
    assert state.poll_at == T0 + 77.0 + 24.0
    wide = Learnt([10.0, 10.0, 10.0, 300.0, 300.0, 300.0, 300.0, 300.0, 300.0, 300.0], [10.0] * 3)
    observe(state, wide, "in_progress", None, T0 + 101.0, step_cap_s=STEP_CAP)
    assert state.poll_at == T0 + 101.0 + STEP_CAP


def test_while_nothing_is_learnt_polls_thin_out_with_the_request_age() -> None:
    state = _flight()
    observe(state, Learnt(), "in_queue", 5, T0 + 0.5, step_cap_s=STEP_CAP)
    assert state.poll_at == T0 + 0.5 + 1.0  # the floor
    observe(state, Learnt(), "in_queue", 5, T0 + 40.0, step_cap_s=STEP_CAP)
    assert state.poll_at == T0 + 40.0 + 20.0  # half its age
    observe(state, Learnt(), "in_progress", None, T0 + 60.0, step_cap_s=STEP_CAP)
    assert state.poll_at == T0 + 60.0 + 5.0  # it started about 10 s ago (between the two polls)


def test_the_polls_learn_queue_drain_rates_and_render_times() -> None:
    learnt, state = Learnt(), _flight()
    observe(state, learnt, "in_queue", 30, T0 + 10.0, step_cap_s=STEP_CAP)
    observe(state, learnt, "in_queue", 10, T0 + 20.0, step_cap_s=STEP_CAP)
    assert learnt.drains == [2.0]  # 20 positions in 10 s
    observe(state, learnt, "in_progress", None, T0 + 30.0, step_cap_s=STEP_CAP)
    assert state.started_at == T0 + 25.0  # no rate known yet (one sample): half way between the polls
    observe(state, learnt, "succeeded", None, T0 + 90.0, step_cap_s=STEP_CAP)
    assert learnt.renders == [35.0]  # it ended between 30 and 90: about 60, after a start at 25
    assert learnt.render_range() is None and learnt.drain_rate() is None  # too few samples to go by
    stalled = Learnt([], [0.0, 0.0, 0.0])
    assert stalled.drain_rate() is None  # a queue that stands still predicts nothing
    full = Learnt()
    for n in range(100):
        full.add_render(float(n))
    assert len(full.renders) == 64 and full.renders[0] == 36.0  # the latest samples only


def test_due_polls_go_most_overdue_first_with_the_deadline_and_the_late_polls() -> None:
    deadline = Policy("mark_stale", 0, None, max_render_s=3600.0)
    states = {
        "later": _flight(poll_at=T0 + 500.0),
        "soon": _flight(poll_at=T0 + 200.0),
        "first": _flight(poll_at=T0 + 100.0),
        "done": _flight(poll_at=T0 + 50.0, status="succeeded"),
        "overdue": _flight(submitted_at=T0 - 4000.0, poll_at=T0 + 900.0),
        "late": _flight(
            submitted_at=T0 - 9000.0,
            status="in_progress",
            failure=_failure(fl.RENDER_TIMEOUT, storage_id=10, request_id="r"),
            late_poll_at=T0 + 150.0,
        ),
    }
    order = list(states)
    assert due_polls(states, order, deadline, Learnt(), T0 + 300.0) == ["first", "late", "soon", "overdue"]


def test_sensor_memory_from_before_polling_by_expectation_loads() -> None:
    old = {
        "v": 1,
        "hw": 7,
        "up": True,
        "rr": 12,
        "p": {"a": {"request_id": "r", "status": "in_queue", "queue_position": 3, "submitted_at": T0}},
    }
    memory = SensorMemory.from_json(old)
    state = memory.partitions["a"]
    assert memory.learnt == Learnt() and (state.poll_at, state.polled_at, state.started_at) == (0.0, 0.0, 0.0)
    assert poll_due(state, memory.learnt) == T0  # due at once, as before
    observe(state, memory.learnt, "in_queue", 2, T0 + 30.0, step_cap_s=STEP_CAP)
    assert state.poll_at == T0 + 45.0 and memory.learnt.drains == []  # no earlier poll time to learn from
