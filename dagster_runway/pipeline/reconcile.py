"""What each partition is owed, derived from durable records: the decisions of the status sensor and
the submit schedule as plain functions, so that they can be tested without a sensor and cannot drift.

The sensor keeps a ``PartitionState`` per partition, built from the event log (requests, videos,
failures, image versions) and from its own polls. From it and the runs in progress, ``stage`` says
whether a partition is done, failed, in flight, overdue (in flight past ``max_render_s`` after its
submit: the sensor cancels it if it can and fails it as ``render_timeout``), or owes a submit or a
collect run; ``owed`` turns that into what to launch, for either launcher; ``late_poll`` says when a
timed-out request is checked again; ``due_polls`` and ``observe`` say which requests in flight to poll
and when each is due next (by what this deployment has learnt of render times and of how fast the
service's queue drains: ``Learnt``); ``covered`` says which partitions a run in progress already works
on, so that nothing is launched twice; and ``batch_run_requests`` groups owed partitions into few runs,
with a fresh run key per attempt (the daemon never launches a run key twice, whatever became of its run).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dagster import AssetKey, RunRecord, RunRequest

from dagster_runway import _compat
from dagster_runway.pipeline import failures as fl

TERMINAL_STATUSES = frozenset({"completed", "succeeded", "failed", "cancelled", "expired"})
# Statuses of a request that ended with something to collect (a video, or the failure that says why not).
FINISHED_STATUSES = frozenset({"completed", "succeeded", "failed"})
Stage = Literal["done", "failed", "in_flight", "overdue", "submit", "collect"]
# A request still rendering past the deadline is checked again this often (or every max_render_s if
# shorter), so that its video is collected if it ever finishes: it may be billed.
LATE_POLL_S = 600.0


@dataclass
class KnownFailure:
    failure_class: str
    source_version: str | None
    storage_id: int
    request_id: str | None = None
    retry_at: float | None = None
    cap_usd: float | None = None
    schema_changes: list[str] | None = None  # schema_drift: the breaking changes named, by id


@dataclass
class PartitionState:
    """What the event log and the polls say about one partition (the sensor's memory, rebuildable)."""

    image_version: str | None = None  # the latest observed version of its image (and settings)
    request_id: str | None = None  # the latest request recorded for it
    attempt: int = 0  # that request's journal attempt
    request_version: str | None = None  # the image version that request was made from
    request_storage_id: int = 0
    video_request_id: str | None = None  # the request its latest video came from
    failure: KnownFailure | None = None  # the latest failure recorded after its latest request
    status: str | None = None  # the last polled status of its request
    queue_position: int | None = None
    submit_runs: int = 0  # runs launched for it since it last made progress
    collect_runs: int = 0
    launched_at: float = 0.0  # when the sensor last requested a run for it
    ready_at: float = 0.0  # when a poll first saw its request finished (0: not seen by a poll)
    run_key: str | None = None  # that run's key: the daemon creates the run after the tick
    submitted_at: float = 0.0  # when its request was submitted (the clock of max_render_s; 0: unknown)
    late_poll_at: float = 0.0  # when a request past its deadline is next checked
    poll_at: float = 0.0  # when its request is next due for a poll (0: its first, see ``poll_due``)
    polled_at: float = 0.0  # when a poll last answered for its request
    started_at: float = 0.0  # when its request started rendering, as estimated from the polls

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, 0)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartitionState:
        values = dict(data)
        if values.get("failure"):
            values["failure"] = KnownFailure(**values["failure"])
        return cls(**values)

    # Updates from the event log

    def saw_request(
        self,
        request_id: str,
        attempt: int,
        source_version: str | None,
        storage_id: int,
        submitted_at: float = 0.0,
    ) -> None:
        if storage_id <= self.request_storage_id:
            return
        new = request_id != self.request_id
        self.request_id, self.attempt, self.request_version = request_id, attempt, source_version
        self.request_storage_id = storage_id
        if new:
            self.status, self.queue_position, self.collect_runs, self.ready_at = None, None, 0, 0.0
            self.submitted_at, self.late_poll_at = round(submitted_at, 3), 0.0
            self.poll_at, self.polled_at, self.started_at = 0.0, 0.0, 0.0
        self.submit_runs, self.launched_at = 0, 0.0
        if self.failure is not None and self.failure.storage_id < storage_id:
            self.failure = None

    def saw_video(self, request_id: str | None, storage_id: int) -> None:
        self.video_request_id = request_id
        self.collect_runs, self.launched_at = 0, 0.0
        if self.failure is not None and self.failure.storage_id < storage_id:
            self.failure = None

    def saw_failure(self, failure: KnownFailure) -> None:
        if failure.storage_id > self.request_storage_id:
            self.failure, self.launched_at = failure, 0.0


@dataclass(frozen=True)
class Policy:
    on_change: str
    retry_failed_generations: int
    spend_cap_usd: float | None
    max_render_s: float | None = None  # None: no render deadline
    accept_schema_changes: frozenset[str] = frozenset()
    adopt_output: bool = False

    @classmethod
    def of(cls, pipeline: Any) -> Policy:
        """The policy of a :class:`~dagster_runway.pipeline.config.RunwayPipelineConfig`."""
        return cls(
            pipeline.on_change, pipeline.retry_failed_generations, pipeline.max_spend_usd, pipeline.max_render_s,
            frozenset(pipeline.accept_schema_changes), pipeline.adopt_output,
        )  # fmt: skip


def stage(state: PartitionState, policy: Policy, now: float | None = None) -> Stage:
    """Where one partition stands, and so what it is owed."""
    now = time.time() if now is None else now
    current = state.image_version
    failure = state.failure
    if failure is not None and current is not None and failure.source_version not in (None, current):
        failure = None  # the image or its settings changed since: the failure no longer applies
    has_request = state.request_id is not None
    changed = has_request and current is not None and state.request_version not in (None, current)
    if changed and (state.video_request_id is None or policy.on_change == "regenerate"):
        return "submit" if failure is None else _after(failure, state, policy, now)
    if not has_request:
        return "submit" if failure is None else _after(failure, state, policy, now)
    if state.video_request_id == state.request_id:
        return "done"
    if failure is not None:
        return _after(failure, state, policy, now)
    if state.status == "cancelled" and overdue(state, policy, now):
        return "overdue"  # cancelled by the deadline, but not recorded yet: the deadline pass records it
    if state.status in TERMINAL_STATUSES:
        return "collect"
    if overdue(state, policy, now):
        return "overdue"
    return "in_flight"


def overdue(state: PartitionState, policy: Policy, now: float) -> bool:
    """Whether a request is past the render deadline (counted from its submit)."""
    return (
        policy.max_render_s is not None
        and state.submitted_at > 0
        and now - state.submitted_at > policy.max_render_s
    )


def late_poll_interval(policy: Policy) -> float:
    return LATE_POLL_S if policy.max_render_s is None else min(LATE_POLL_S, policy.max_render_s)


def late_poll(state: PartitionState, policy: Policy, now: float | None = None) -> bool:
    """Whether to check now a request that failed its render deadline while still rendering: it is
    checked every ``late_poll_interval`` until it ends (then its video is collected) or expires."""
    now = time.time() if now is None else now
    failure = state.failure
    return (
        failure is not None
        and failure.failure_class == fl.RENDER_TIMEOUT
        and failure.request_id == state.request_id
        and state.status not in TERMINAL_STATUSES
        and now >= state.late_poll_at
        and stage(state, policy, now) == "failed"
    )


def _after(failure: KnownFailure, state: PartitionState, policy: Policy, now: float) -> Stage:
    """What follows a recorded failure: another run, a paid retry the user allowed, or nothing."""
    cls = failure.failure_class
    if cls in fl.RESUBMITTED_BY_SENSOR:
        return "submit"
    if cls == fl.SPEND_CAP:
        raised = policy.spend_cap_usd is None or (
            failure.cap_usd is not None and policy.spend_cap_usd > failure.cap_usd
        )
        return "submit" if raised or (failure.retry_at is not None and now >= failure.retry_at) else "failed"
    if cls == fl.SCHEMA_DRIFT:  # once the changes are accepted, or at its hourly look at the catalog again
        accepted = (
            bool(failure.schema_changes) and set(failure.schema_changes or ()) <= policy.accept_schema_changes
        )
        return (
            "submit" if accepted or (failure.retry_at is not None and now >= failure.retry_at) else "failed"
        )
    if cls == fl.OUTPUT_MISMATCH:
        return "submit" if policy.adopt_output else "failed"
    if cls in fl.RECOLLECTED_BY_SENSOR and failure.request_id == state.request_id:
        return "collect"
    if (
        cls == fl.RENDER_TIMEOUT
        and failure.request_id == state.request_id
        and state.status in FINISHED_STATUSES
    ):
        return "collect"  # it finished after all (late polls): the money is spent, collect what it made
    if cls == fl.GENERATION_INTERNAL and failure.request_id == state.request_id:
        return "submit" if state.attempt <= policy.retry_failed_generations else "failed"
    return "failed"


def hold_collects(
    owed: Sequence[PartitionState], *, batch_size: int, collect_running: bool, now: float, max_wait_s: float
) -> bool:
    """Whether to keep a part batch of finished requests for the next tick rather than start a run for it.

    A run costs seconds to start whatever its size, so while a collect run is already going, requests
    that finished since wait for it (and for others to finish) up to ``max_wait_s``, then go anyway.
    """
    if not owed or len(owed) >= batch_size or not collect_running:
        return False
    ready = [state.ready_at for state in owed]
    return all(ready) and now - min(ready) < max_wait_s


# Polling by expectation

# A request is polled again no sooner than POLL_FLOOR_S after its last poll, and no later than
# POLL_CAP_S (an estimate may be wrong; the service may speed up).
POLL_FLOOR_S = 1.0
POLL_CAP_S = 600.0
# Queue waits are predicted short by this factor: a poll too early costs a poll, one too late delays a video.
QUEUE_SAFETY = 0.9
# Samples kept of each learnt quantity (the latest ones), and how many make an estimate.
LEARNT_SAMPLES = 64
MIN_SAMPLES = 3
RENDERED = frozenset({"completed", "succeeded"})


@dataclass
class Learnt:
    """What the polls taught of this deployment: recent render times (start to end, seconds) and queue
    drain rates (queue positions gained per second by a queued request)."""

    renders: list[float] = field(default_factory=list)
    drains: list[float] = field(default_factory=list)

    def add_render(self, seconds: float) -> None:
        self.renders = [*self.renders, round(seconds, 2)][-LEARNT_SAMPLES:]

    def add_drain(self, rate: float) -> None:
        self.drains = [*self.drains, round(rate, 4)][-LEARNT_SAMPLES:]

    def render_range(self) -> tuple[float, float] | None:
        """The 10th and 90th percentiles of recent render times; None until enough are known."""
        if len(self.renders) < MIN_SAMPLES:
            return None
        ordered = sorted(self.renders)
        return ordered[len(ordered) // 10], ordered[(len(ordered) * 9) // 10]

    def drain_rate(self) -> float | None:
        """The median of recent drain rates (positions per second); None until known, or while the queue stands still."""
        if len(self.drains) < MIN_SAMPLES:
            return None
        rate = sorted(self.drains)[len(self.drains) // 2]
        return rate if rate > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"r": self.renders, "d": self.drains}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Learnt:
        data = data or {}
        return cls([float(x) for x in data.get("r") or []], [float(x) for x in data.get("d") or []])


def poll_due(state: PartitionState, learnt: Learnt) -> float:
    """When a request in flight is due for a poll: as scheduled by its last poll, or, before its first,
    once the quickest renders seen here would have ended after its submit (at once while none are known,
    or if its submit time is not)."""
    if state.poll_at:
        return state.poll_at
    known = learnt.render_range()
    return state.submitted_at + (known[0] if known and state.submitted_at else 0.0)


def due_polls(
    states: Mapping[str, PartitionState], order: Sequence[str], policy: Policy, learnt: Learnt, now: float
) -> list[str]:
    """The partitions whose request is due for a poll now, most overdue first: those in flight once
    due (``poll_due``), those past the render deadline (the deadline pass cancels them), and those
    past it whose late poll is due (``late_poll``)."""
    due: list[tuple[float, str]] = []
    for key in order:
        state = states[key]
        where = stage(state, policy, now)
        if where == "in_flight" and (at := poll_due(state, learnt)) <= now:
            due.append((at, key))
        elif where == "overdue":
            due.append((poll_due(state, learnt), key))
        elif late_poll(state, policy, now):
            due.append((state.late_poll_at, key))
    return [key for _, key in sorted(due, key=lambda pair: pair[0])]


def observe(
    state: PartitionState, learnt: Learnt, status: str, position: int | None, now: float, *, step_cap_s: float
) -> None:
    """Apply a poll's answer to ``state`` (its status and queue position), learning from how it
    changed since the last poll, and schedule the request's next poll in ``state.poll_at``.

    - Queued at ``position``: due when the requests ahead should have gone (at the learnt drain rate,
      predicted short by ``QUEUE_SAFETY``) and the quickest renders (10th percentile) would end; no
      sooner than a running request's step, so queued requests are polled less often.
    - Rendering: due when the quickest renders would end after its estimated start, then every
      step: half the spread of render times (10th to 90th percentile), at most ``step_cap_s``.
    - While nothing is learnt: due after half its age (since its submit, or its start), so polls
      thin out geometrically, up to ``step_cap_s``.
    Every wait is within ``POLL_FLOOR_S`` and ``POLL_CAP_S``.
    """
    before, last = state.status, state.polled_at
    rate = learnt.drain_rate()
    if before == "in_queue" and last and now > last:
        if status == "in_queue" and state.queue_position is not None and position is not None:
            learnt.add_drain(max(0.0, state.queue_position - position) / (now - last))
        if status not in ("in_queue", "cancelled"):
            # It started since the last poll: when the requests ahead of it were expected to have gone.
            ahead = (state.queue_position or 1) / rate if rate else (now - last) / 2
            state.started_at = round(min(now, last + ahead), 2)
    elif before is None and status != "in_queue":
        since = state.submitted_at or now
        state.started_at = round(since + (now - since) / 2, 2)
    if status in RENDERED and before == "in_progress" and state.started_at and last:
        learnt.add_render((last + now) / 2 - state.started_at)
    state.status, state.queue_position, state.polled_at = status, position, round(now, 2)
    known = learnt.render_range()
    step = min(step_cap_s, max(POLL_FLOOR_S, (known[1] - known[0]) / 2)) if known else None
    if status == "in_queue":
        if known is None or rate is None:
            wait = min(step_cap_s, (now - (state.submitted_at or now)) / 2)
        else:
            wait = max(step or 0.0, QUEUE_SAFETY * (position or 1) / rate + known[0])
    elif known is None or step is None:
        wait = min(step_cap_s, (now - (state.started_at or now)) / 2)
    else:
        wait = max(step, state.started_at + known[0] - now)
    state.poll_at = round(now + min(POLL_CAP_S, max(POLL_FLOOR_S, wait)), 2)


# Runs in progress


@dataclass(frozen=True)
class Coverage:
    """The partitions that runs in progress will submit and collect."""

    submit: frozenset[str] = frozenset()
    collect: frozenset[str] = frozenset()


def covered(
    runs: Iterable[RunRecord],
    *,
    order: Sequence[str],
    requests_key: AssetKey,
    videos_key: AssetKey,
    submit_job: str,
    collect_job: str,
    stale_after_s: float,
    now: float | None = None,
) -> Coverage:
    """Which partitions runs not yet finished target, per stage. A run that has been going for longer
    than ``stale_after_s`` is taken as lost (its worker died without the run being marked failed)."""
    now = time.time() if now is None else now
    index = {key: i for i, key in enumerate(order)}
    submit: set[str] = set()
    collect: set[str] = set()
    for record in runs:
        run = record.dagster_run
        started = record.start_time or record.create_timestamp.timestamp()
        if now - started > stale_after_s:
            continue
        if run.job_name == submit_job:
            stages = {"submit"}
        elif run.job_name == collect_job:
            stages = {"collect"}
        else:
            selection = run.asset_selection or set()
            stages = {s for s, key in (("submit", requests_key), ("collect", videos_key)) if key in selection}
        if not stages:
            continue
        keys = run_partitions(run.tags, run.run_config, order, index)
        if "submit" in stages:
            submit.update(keys)
        if "collect" in stages:
            collect.update(keys)
    return Coverage(frozenset(submit), frozenset(collect))


def run_partitions(
    tags: Mapping[str, str], run_config: Mapping[str, Any], order: Sequence[str], index: Mapping[str, int]
) -> set[str]:
    """The partitions a run targets: its partition or range tags, narrowed by a ``partitions`` op config."""
    if _compat.PARTITION_NAME_TAG in tags:
        keys = {tags[_compat.PARTITION_NAME_TAG]}
    elif _compat.ASSET_PARTITION_RANGE_START_TAG in tags:
        start = index.get(tags[_compat.ASSET_PARTITION_RANGE_START_TAG])
        end = index.get(tags.get(_compat.ASSET_PARTITION_RANGE_END_TAG, ""))
        keys = set(order[start : end + 1]) if start is not None and end is not None else set()
    else:
        return set()
    chosen: set[str] = set()
    for op in (run_config.get("ops") or {}).values():
        chosen.update((op.get("config") or {}).get("partitions") or []) if isinstance(op, Mapping) else None
    return keys & chosen if chosen else keys


# What is owed


@dataclass
class Owed:
    """What one tick owes: the partitions to launch a run for, per stage, and those whose runs are spent."""

    submit: list[str] = field(default_factory=list)
    collect: list[str] = field(default_factory=list)
    exhausted: list[tuple[str, Stage, int]] = field(default_factory=list)  # key, stage, runs launched
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("done", "failed", "in_flight", "submit", "collect", "running", "scheduled"), 0
        )
    )


def owed(
    order: Sequence[str],
    states: Mapping[str, PartitionState],
    policy: Policy,
    coverage: Coverage,
    *,
    launches: frozenset[Stage],
    max_run_attempts: int,
    uncreated: set[str],
    grace_s: float,
    now: float,
    wall_now: float,
) -> Owed:
    """The one decider of what each partition is owed, for the status sensor and the submit schedule.

    A partition owed a stage in ``launches`` gets a run unless a run in progress covers it, the run
    just requested for it is not created yet (its key in ``uncreated``, requested within ``grace_s`` of
    ``wall_now``), or ``max_run_attempts`` runs launched for it ended without progress (``exhausted``:
    the caller records the failure). A submit left to another launcher is counted ``scheduled``.
    ``now`` is the clock of the render deadline.
    """
    result = Owed()
    counts = result.counts
    for key in order:
        state = states[key]
        where = stage(state, policy, now)
        if where == "overdue":
            where = "in_flight"  # the deadline pass found no time for it this tick: the next one does
        if where in ("submit", "collect"):
            if where not in launches:
                counts["scheduled" if where == "submit" else where] += 1
                continue
            in_progress = coverage.submit if where == "submit" else coverage.collect
            if key in in_progress or (state.run_key in uncreated and wall_now < state.launched_at + grace_s):
                counts["running"] += 1  # covered by a run, or the one just requested is not created yet
                continue
            launched = state.submit_runs if where == "submit" else state.collect_runs
            if launched >= max_run_attempts:
                result.exhausted.append((key, where, launched))
                counts["failed"] += 1
                continue
            (result.submit if where == "submit" else result.collect).append(key)
        counts[where] += 1
    return result


# Launching


def batch_run_requests(
    keys: Iterable[str],
    order: Sequence[str],
    *,
    max_batch: int,
    prefix: str,
    identity: Callable[[str], str],
    config_for: Callable[[list[str]], dict[str, Any]],
    tags: Mapping[str, str] | None = None,
    job_name: str | None = None,
) -> list[RunRequest]:
    """Group partitions into few runs: each covers a stretch of consecutive partitions, all of them owed.

    Dagster runs one partition or one range, so a batch is a range with no gap (an unselected
    partition inside a range would show as attempted in the UI), at most ``max_batch`` long. The run
    key hashes each key's ``identity`` (its request id or image version, and its attempt number), so a
    tick that repeats itself launches nothing new, and a retry gets a key of its own.
    """
    index = {key: i for i, key in enumerate(order)}
    ordered = sorted((k for k in keys if k in index), key=index.__getitem__)
    batches: list[list[str]] = []
    for key in ordered:
        if batches and len(batches[-1]) < max_batch and index[key] == index[batches[-1][-1]] + 1:
            batches[-1].append(key)
        else:
            batches.append([key])
    requests = []
    for batch in batches:
        digest = hashlib.sha256("\n".join(f"{k}={identity(k)}" for k in batch).encode()).hexdigest()[:20]
        partition_tags = (
            {_compat.PARTITION_NAME_TAG: batch[0]}
            if len(batch) == 1
            else {
                _compat.ASSET_PARTITION_RANGE_START_TAG: batch[0],
                _compat.ASSET_PARTITION_RANGE_END_TAG: batch[-1],
            }
        )
        requests.append(
            RunRequest(
                run_key=f"{prefix}:{digest}",
                job_name=job_name,
                partition_key=batch[0] if len(batch) == 1 else None,
                run_config=config_for(batch),
                tags={**(tags or {}), **partition_tags, "runway/partition_count": str(len(batch))},
            )
        )
    return requests


def request_partitions(request: RunRequest, order: Sequence[str]) -> list[str]:
    """The partitions a run request made by ``batch_run_requests`` targets."""
    index = {key: i for i, key in enumerate(order)}
    return sorted(run_partitions(request.tags, request.run_config, order, index), key=index.__getitem__)


@dataclass
class SensorMemory:
    """Everything the status sensor remembers between ticks (rebuilt from the event log when lost)."""

    high_water: int = 0
    caught_up: bool = False
    partitions: dict[str, PartitionState] = field(default_factory=dict)
    learnt: Learnt = field(default_factory=Learnt)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "hw": self.high_water,
            "up": self.caught_up,
            "l": self.learnt.to_json(),
            "p": {key: state.to_json() for key, state in self.partitions.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SensorMemory:
        if data.get("v") != 1:
            return cls()
        return cls(
            high_water=int(data.get("hw", 0)),
            caught_up=bool(data.get("up")),
            learnt=Learnt.from_json(data.get("l")),
            partitions={key: PartitionState.from_json(value) for key, value in (data.get("p") or {}).items()},
        )

    def state(self, key: str) -> PartitionState:
        return self.partitions.setdefault(key, PartitionState())
