"""The status sensor: polls requests in flight when each may be done, reconciles every partition from durable records and
launches the runs each is owed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from dagster import (
    AssetObservation,
    DagsterInstance,
    DefaultSensorStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from dagster_runway import _compat
from dagster_runway import journal as jn
from dagster_runway.errors import RequestNotFoundError, RunComfyError
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import reconcile as rc
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.gallery import write_gallery
from dagster_runway.pipeline.sensors import (
    LAUNCHED_BY,
    NOT_FINISHED,
    STALE_RUN_S,
    load_memory,
    memory_key,
    op_config,
    run_key_grace_s,
    save_memory,
    uncreated_run_keys,
)
from dagster_runway.pipeline.step import poll_statuses
from dagster_runway.resource import RunComfyResource
from dagster_runway.schema import CancelResult, RequestStatus

# Requests polled at once by the status sensor; their changes are recorded before the next slice, so
# the tick's time includes its writes (about 1 ms each over held connections).
POLL_SLICE = 500


def _cancel_many(
    resource: RunComfyResource, ids: list[str], budget: float
) -> dict[str, CancelResult | RunComfyError]:
    """Cancel requests concurrently (bounded by the client's ``max_concurrency``); each id's answer or
    error, leaving out those still unanswered after ``budget`` seconds."""

    async def main() -> dict[str, CancelResult | RunComfyError]:
        async with resource.get_async_client() as client:

            async def one(request_id: str) -> CancelResult | RunComfyError:
                try:
                    return await client.cancel(request_id)
                except RunComfyError as exc:
                    return exc

            tasks = {asyncio.ensure_future(one(rid)): rid for rid in dict.fromkeys(ids)}
            done, pending = await asyncio.wait(tasks, timeout=max(1.0, budget))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            return {tasks[task]: task.result() for task in done}

    return asyncio.run(main()) if ids else {}


def read_events(
    instance: DagsterInstance, pipeline: RunwayPipelineConfig, memory: rc.SensorMemory, deadline: float
) -> None:
    """Apply the event log's records after ``memory.high_water`` to ``memory``, page by page, until the
    log is read (``memory.caught_up``) or the monotonic ``deadline`` passes."""
    while True:
        page = rec.page_after(
            instance,
            requests_key=pipeline.requests_key,
            videos_key=pipeline.videos_key,
            images_key=pipeline.images_key,
            after=memory.high_water,
        )
        events: list[tuple[int, Any]] = [
            *((r.storage_id, r) for r in page.requests),
            *((v.storage_id, v) for v in page.videos),
            *((f.storage_id, f) for f in page.failures),
            *((i[2], i) for i in page.images),
        ]
        for _, event in sorted(events, key=lambda pair: pair[0]):
            if isinstance(event, rec.RequestRecord):
                submitted_at = event.metadata.get("submitted_at")
                memory.state(event.partition).saw_request(
                    event.request_id,
                    event.attempt,
                    event.source_version,
                    event.storage_id,
                    float(submitted_at) if isinstance(submitted_at, int | float) else event.timestamp,
                )
            elif isinstance(event, rec.VideoRecord):
                memory.state(event.partition).saw_video(event.request_id, event.storage_id)
            elif isinstance(event, rec.FailureRecord):
                memory.state(event.partition).saw_failure(
                    rc.KnownFailure(
                        failure_class=event.failure_class,
                        source_version=event.source_version,
                        storage_id=event.storage_id,
                        request_id=event.request_id,
                        retry_at=event.metadata.get("retry_at"),
                        cap_usd=event.metadata.get("spend_cap_usd"),
                        schema_changes=event.metadata.get("schema_changes"),
                    )
                )
            else:
                partition, version, _ = event
                state = memory.state(partition)
                if state.image_version != version:
                    state.image_version, state.submit_runs, state.collect_runs = version, 0, 0
        memory.high_water = page.high_water
        if not page.more:
            memory.caught_up = True
            return
        if time.monotonic() > deadline:
            return


class StatusTick:
    """One tick of the status sensor: read what is new, poll what is in flight, launch what is owed."""

    def __init__(
        self,
        pipeline: RunwayPipelineConfig,
        context: SensorEvaluationContext,
        resource: RunComfyResource,
        *,
        sensor_name: str,
        submit_job: str,
        collect_job: str,
        submit_op: str,
        collect_op: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pipeline, self.context, self.resource = pipeline, context, resource
        self.clock = clock  # wall-clock seconds: the render deadline and the poll schedule read it
        self.instance = context.instance
        self.sensor_name = sensor_name
        self.submit_job, self.collect_job = submit_job, collect_job
        self.submit_op, self.collect_op = submit_op, collect_op
        self.started = time.monotonic()
        self.memory = rc.SensorMemory.from_json(load_memory(self.instance, self.memory_key) or {})
        self.recorded = 0  # events this tick wrote
        self.late_polled: set[str] = set()  # timed-out requests polled this tick
        self.policy = rc.Policy.of(pipeline)

    @property
    def memory_key(self) -> str:
        return memory_key(self.pipeline, self.sensor_name)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> SensorResult:
        pipeline = self.pipeline
        # Runs before events: a run that ends after this snapshot still covers its partitions, and one
        # that ended before it has written its events, which the ingest below reads. The other order
        # lets a run end between the two reads, and its partitions would be launched again.
        runs = self.runs_in_progress()
        self.ingest(pipeline.sensor_budget_s / 3)
        if not self.memory.caught_up:
            size = save_memory(self.instance, self.memory_key, self.memory.to_json())
            summary = {"rebuilding": True, "high_water": self.memory.high_water, "memory_bytes": size}
            self.context.log.info(
                f"Reading the event log to rebuild what is owed: up to storage id {self.memory.high_water}"
            )
            return SensorResult(cursor=json.dumps(summary))
        order = list(self.instance.get_dynamic_partitions(pipeline.dynamic_partitions_name))
        for key in order:
            self.memory.state(key)
        polled = self.poll(order, self.poll_budget())
        timed_out = self.enforce_deadline(order)
        run_requests, counts = self.owed(order, runs)
        size = save_memory(self.instance, self.memory_key, self.memory.to_json())
        summary = {
            **counts,
            "polled": polled,
            "timed_out": timed_out,
            "high_water": self.memory.high_water,
            "memory_bytes": size,
        }
        self.context.log.info(
            f"{len(order)} partitions: {counts}; polled {polled} in {self.elapsed():.2f}s, {self.recorded} change(s) "
            f"recorded; {len(run_requests)} run(s) requested."
        )
        return SensorResult(run_requests=run_requests, cursor=json.dumps(summary))

    def record(self, event: AssetObservation) -> None:
        """Write an event now, over the tick's held connections (the daemon would write a tick's
        ``asset_events`` after it, a connection per statement, before it creates the tick's runs)."""
        self.instance.report_runless_asset_event(event)
        self.recorded += 1

    def ingest(self, budget_s: float) -> None:
        """Apply the event log's new records to the memory, within ``budget_s`` of the tick's start."""
        read_events(self.instance, self.pipeline, self.memory, self.started + budget_s)

    def poll(self, order: list[str], budget_s: float) -> int:
        """Poll the requests due (``reconcile.due_polls``: most overdue first), a slice at a time,
        recording each change as it is seen, until all are polled or ``budget_s`` is spent."""
        states = self.memory.partitions
        keys = rc.due_polls(states, order, self.policy, self.memory.learnt, self.clock())
        if not keys or budget_s <= 0:
            return 0
        end = time.monotonic() + max(1.0, budget_s)
        polled = 0
        for first in range(0, len(keys), POLL_SLICE):
            left = end - time.monotonic()
            if left <= 0:
                break
            by_id = {
                rid: k for k in keys[first : first + POLL_SLICE] if (rid := states[k].request_id) is not None
            }
            for request_id, answer in poll_statuses(self.resource, list(by_id), left).items():
                polled += self._apply(by_id[request_id], request_id, answer)
        return polled

    def poll_budget(self) -> float:
        """Seconds this tick may poll: what the tick's budget leaves, and at most twice the status
        interval (10 s at least). The runs owed are requested after the polls, so a request found
        finished waits for its collect run no longer than that, however many are in flight."""
        left = self.pipeline.sensor_budget_s - self.elapsed() - 2.0
        return min(left, max(10.0, 2.0 * self.pipeline.status_interval_s))

    def _apply(self, key: str, request_id: str, answer: RequestStatus | RunComfyError) -> int:
        """Apply one poll's answer to the partition's state, recording a change; 1 if it was answered."""
        state = self.memory.partitions[key]
        if isinstance(answer, RequestNotFoundError):
            status, position = "expired", None
        elif isinstance(answer, RunComfyError):
            self.context.log.warning(f"{key}: polling request {request_id} failed for now: {answer}")
            return 0
        else:
            status, position = answer.status.value, answer.queue_position
        changed = status != state.status
        rc.observe(
            state,
            self.memory.learnt,
            status,
            position,
            self.clock(),
            step_cap_s=2.0 * self.pipeline.status_interval_s,
        )
        if state.failure is not None and state.failure.failure_class == fl.RENDER_TIMEOUT:
            state.late_poll_at = self.clock() + rc.late_poll_interval(self.policy)
            self.late_polled.add(key)
        if changed:
            self.record(
                AssetObservation(
                    asset_key=self.pipeline.requests_key,
                    partition=key,
                    description=f"Request {request_id} is {status}"
                    + (f" (queue position {position})" if position is not None else ""),
                    metadata={
                        **md.RunwayMetadata(request_id=request_id, status=status, queue_position=position)
                    },
                )
            )
            if status in rc.TERMINAL_STATUSES and not state.ready_at:
                state.ready_at = time.time()
        return 1

    # The render deadline

    def enforce_deadline(self, order: list[str]) -> int:
        """Fail every request past ``max_render_s`` after its submit as ``render_timeout``: one still
        queued is cancelled (refunded, and its journal claim settled at 0); one rendering cannot be,
        and is reported with what it may cost, then checked again now and then (``late_poll``) so that
        its video is collected if it finishes. Neither is submitted again by the sensor. Returns how
        many partitions were failed."""
        states, now = self.memory.partitions, self.clock()
        for key in order:
            state = states[key]
            if (
                state.request_id
                and not state.submitted_at
                and rc.stage(state, self.policy, now) == "in_flight"
            ):
                state.submitted_at = now  # remembered before submit times were: the deadline counts from now
        # At most a slice a tick (each is a cancel, an event-log read and a journal read); the rest wait.
        keys = [k for k in order if rc.stage(states[k], self.policy, now) == "overdue"][:POLL_SLICE]
        # A timed-out request whose cancel failed and that a late poll found still queued: cancel it again.
        again = [k for k in sorted(self.late_polled) if states[k].status == "in_queue"][:POLL_SLICE]
        left = self.pipeline.sensor_budget_s - self.elapsed() - 2.0
        if not (keys or again) or left <= 0:
            return 0
        by_id: dict[str, list[str]] = {}  # copies of an image share their request
        for key in [*keys, *again]:
            if (request_id := states[key].request_id) is not None:
                by_id.setdefault(request_id, []).append(key)
        answers = _cancel_many(self.resource, list(by_id), left)
        due, touched = set(keys), []
        for request_id, answer in answers.items():
            if self.elapsed() > self.pipeline.sensor_budget_s - 2.0:
                break  # the next tick cancels these again (a no-op if done) and records them
            for key in by_id[request_id]:
                if key in due or (isinstance(answer, CancelResult) and answer.cancelled):
                    self._timed_out(key, request_id, answer)
                    touched.append(key)
        if touched:
            # The review page is rewritten by collect runs; these partitions may have none to come.
            try:
                write_gallery(self.pipeline, self.instance, partitions=touched)
            except Exception as exc:  # noqa: BLE001 - the page is a view; the event log has the failures
                self.context.log.warning(f"Could not rewrite the review page: {type(exc).__name__}: {exc}")
        return sum(1 for k in keys if rc.stage(states[k], self.policy, now) == "failed")

    def _timed_out(self, key: str, request_id: str, answer: CancelResult | RunComfyError) -> None:
        pipeline, state = self.pipeline, self.memory.partitions[key]
        now = self.clock()
        if isinstance(answer, RequestNotFoundError):
            self._apply(key, request_id, answer)  # gone: the usual expired path decides
            return
        cancelled = isinstance(answer, CancelResult) and answer.cancelled
        if (
            isinstance(answer, CancelResult)
            and not cancelled
            and (answer.status or "") in rc.FINISHED_STATUSES
        ):
            self._apply_status(key, request_id, str(answer.status))  # it just finished: collect it
            return
        record = rec.latest_request(self.instance, pipeline.requests_key, key)
        record = record if record is not None and record.request_id == request_id else None
        claim = self._claim(record, request_id)
        estimate = (
            claim.estimate_usd
            if claim is not None
            else (record.metadata.get("estimated_cost_usd") if record else None)
        )
        waited = _duration(now - state.submitted_at)
        deadline = f"max_render_s={pipeline.max_render_s:g}"
        if cancelled:
            refunded = self._refund(claim, key, request_id)
            self._apply_status(key, request_id, "cancelled")
            reason = (
                f"request {request_id} was still queued {waited} after its submit, past the render deadline "
                f"({deadline}): it was cancelled, and a cancelled request is refunded"
                + (
                    ""
                    if refunded
                    else " (the journal could not record the refund; its estimate stays counted)"
                )
                + "."
            )
            next_step = (
                "it is not submitted again by itself: to try again, materialize runway/requests for this partition "
                "(a new submit, billed). If the service's queue is often this long, raise max_render_s (and "
                "presign_expires_s above it)."
            )
        else:
            why = (
                f"could not be cancelled ({answer})"
                if isinstance(answer, RunComfyError)
                else "has started, and a request that has started cannot be cancelled"
            )
            cost = (
                f"about {estimate:.2f} USD (its estimate)"
                if isinstance(estimate, int | float)
                else "its full price"
            )
            every = _duration(rc.late_poll_interval(self.policy))
            reason = (
                f"request {request_id} was still {'rendering' if state.status == 'in_progress' else 'unfinished'} "
                f"{waited} after its submit, past the render deadline ({deadline}); it {why}, so it may still be "
                f"billed: {cost}."
            )
            next_step = (
                f"nothing to do to get its video: the status sensor checks it every {every} and collects the video if "
                f"it finishes. It is not submitted again by itself; if it never finishes, report request {request_id} "
                "to RunComfy (materializing runway/requests reuses it while the service says it is running)."
            )
            state.late_poll_at = now + rc.late_poll_interval(self.policy)
        failure = fl.render_timeout(key, request_id, reason, next_step, state.submitted_at, estimate)
        self.context.log.warning(f"{key}: {failure.message}")
        source_version = state.request_version or state.image_version
        self.record(failure.observation(pipeline.videos_key, source_version))
        state.failure = rc.KnownFailure(fl.RENDER_TIMEOUT, source_version, 2**62, request_id)

    def _apply_status(self, key: str, request_id: str, status: str) -> None:
        """Record a status learnt from a cancel's answer, as a poll's would be."""
        state = self.memory.partitions[key]
        if status == state.status:
            return
        self.record(
            AssetObservation(
                asset_key=self.pipeline.requests_key,
                partition=key,
                description=f"Request {request_id} is {status}",
                metadata={**md.RunwayMetadata(request_id=request_id, status=status)},
            )
        )
        state.status, state.queue_position = status, None
        if status in rc.TERMINAL_STATUSES and not state.ready_at:
            state.ready_at = time.time()

    def _claim(self, record: rec.RequestRecord | None, request_id: str) -> jn.Claim | None:
        """The journal claim of a request (None if it cannot be read)."""
        if record is None:
            return None
        with contextlib.suppress(Exception):
            journal = jn.Journal(self.pipeline.journal_url, self.pipeline.journal_options)
            claim = journal.read(record.fingerprint, record.attempt) or journal.latest(record.fingerprint)
            if claim is not None and claim.request_id == request_id:
                return claim
        return None

    def _refund(self, claim: jn.Claim | None, key: str, request_id: str) -> bool:
        """Settle a cancelled request's claim at 0 (its estimate no longer counts against the cap)."""
        if claim is None:
            self.context.log.warning(
                f"{key}: no journal claim found for request {request_id}; its refund is not recorded"
            )
            return False
        try:
            jn.Journal(self.pipeline.journal_url, self.pipeline.journal_options).settle(claim, 0.0)
        except Exception as exc:  # noqa: BLE001 - the estimate stays counted: the cap errs on the safe side
            self.context.log.warning(f"{key}: the journal could not record the refund of {request_id}: {exc}")
            return False
        return True

    def runs_in_progress(self) -> tuple[list[RunRecord], set[str]]:
        """The runs not finished, and the run keys this sensor requested recently whose runs the daemon
        has not created yet (the daemon creates them after the tick that asks)."""
        runs = list(self.instance.get_run_records(RunsFilter(statuses=NOT_FINISHED)))
        return runs, uncreated_run_keys(
            self.instance, self.memory.partitions.values(), time.time() - self.grace
        )

    @property
    def grace(self) -> float:
        return run_key_grace_s(self.pipeline)

    def owed(
        self, order: list[str], in_progress: tuple[list[RunRecord], set[str]]
    ) -> tuple[list[RunRequest], dict[str, int]]:
        """Launch a run for every partition owed a submit or a collect that no run in progress covers."""
        pipeline, states = self.pipeline, self.memory.partitions
        runs, uncreated = in_progress
        coverage = rc.covered(
            runs,
            order=order,
            requests_key=pipeline.requests_key,
            videos_key=pipeline.videos_key,
            submit_job=self.submit_job,
            collect_job=self.collect_job,
            stale_after_s=STALE_RUN_S,
        )
        now = time.time()
        grace = self.grace
        decided = rc.owed(
            order,
            states,
            self.policy,
            coverage,
            launches=frozenset({"collect"} if pipeline.submit_schedule else {"submit", "collect"}),
            max_run_attempts=pipeline.max_run_attempts,
            uncreated=uncreated,
            grace_s=grace,
            now=self.clock(),
            wall_now=now,
        )
        for key, where, launched in decided.exhausted:
            self._exhausted(key, states[key], where, launched)
        owed = {"submit": decided.submit, "collect": decided.collect}
        if rc.hold_collects(
            [states[k] for k in owed["collect"]],
            batch_size=pipeline.collect_batch_size,
            collect_running=bool(coverage.collect),
            now=now,
            max_wait_s=grace,
        ):
            owed["collect"] = []  # counted as owed: the next tick sends them with more, or after the wait
        for key in owed["submit"]:
            states[key].submit_runs += 1
        for key in owed["collect"]:
            states[key].collect_runs += 1
        requests = [
            *rc.batch_run_requests(
                owed["submit"],
                order,
                max_batch=pipeline.submit_batch_size,
                prefix="submit",
                identity=lambda k: (
                    f"{states[k].image_version}|{states[k].request_id}|{states[k].submit_runs}"
                ),
                config_for=lambda batch: op_config(self.submit_op, batch),
                tags={LAUNCHED_BY: self.sensor_name},
                job_name=self.submit_job,
            ),
            *rc.batch_run_requests(
                owed["collect"],
                order,
                max_batch=pipeline.collect_batch_size,
                prefix="collect",
                identity=lambda k: f"{states[k].request_id}|{states[k].collect_runs}",
                config_for=lambda batch: op_config(self.collect_op, batch),
                tags={LAUNCHED_BY: self.sensor_name},
                job_name=self.collect_job,
            ),
        ]
        for request in requests:
            for key in rc.request_partitions(request, order):
                states[key].run_key, states[key].launched_at = request.run_key, now
        return requests, decided.counts

    def _exhausted(self, key: str, state: rc.PartitionState, where: str, launched: int) -> None:
        """Record that the runs launched for a partition kept ending without a result."""
        failure = fl.runs_exhausted(key, where, launched, state.request_id)
        self.record(failure.observation(self.pipeline.videos_key, state.image_version))
        state.failure = rc.KnownFailure(fl.RUNS_EXHAUSTED, state.image_version, 2**62, state.request_id)


def _duration(seconds: float) -> str:
    """``2.5 h``, ``12 min`` or ``40 s``."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 1 else f"{max(seconds, 0):.2g} s"


def build_status_sensor(
    pipeline: RunwayPipelineConfig,
    submit_job: _compat.UnresolvedAssetJobDefinition,
    collect_job: _compat.UnresolvedAssetJobDefinition,
    submit_op: str,
    collect_op: str,
) -> SensorDefinition:
    """Polls requests in flight when each is due and launches the runs every partition is owed, from durable records."""
    name = f"{pipeline.name}_status_sensor"

    @sensor(
        name=name,
        jobs=[submit_job, collect_job],
        minimum_interval_seconds=pipeline.status_interval_s,
        default_status=DefaultSensorStatus.STOPPED,
        required_resource_keys={pipeline.resource_key},
        description="Reconciles every partition from durable records: submits what has no request, polls "
        "requests in flight when each is due (by its queue position and the render times seen; inside a time "
        "budget, most overdue first) and collects finished ones into "
        f"{pipeline.videos_key.to_user_string()}; relaunches runs that died, within max_run_attempts. A request "
        f"still queued {pipeline.max_render_s:g} s after its submit (max_render_s) is cancelled and refunded, one still "
        "rendering is reported with its estimated cost; both fail as render_timeout. No worker waits while a video "
        "renders.",
    )
    def _status(context: SensorEvaluationContext) -> SensorResult:
        resource: RunComfyResource = getattr(context.resources, pipeline.resource_key)
        with _compat.storage_connections_held(context.instance):
            return StatusTick(
                pipeline,
                context,
                resource,
                sensor_name=name,
                submit_job=submit_job.name,
                collect_job=collect_job.name,
                submit_op=submit_op,
                collect_op=collect_op,
            ).run()

    return _status


def summary(cursor: str | None) -> dict[str, Any]:
    """The status sensor's cursor: counts of partitions per stage, for the demo and for humans."""
    try:
        data = json.loads(cursor or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
