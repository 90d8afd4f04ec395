"""Cron schedules: submission in batches at set times, and the checks of stored videos, run again.

Sensors react within seconds; some teams would rather spend at night or during business hours, or
list a large bucket once a day. With ``submit_schedule`` the discovery sensor is replaced by a
schedule that lists the source and submits what is owed at those times only. The status sensor still
polls and collects every paid video as soon as it is done (that money is already spent), and keeps the
reconciliation memory the schedule reads.
"""

from __future__ import annotations

import time
from typing import Any

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from dagster_runway import _compat
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline import reconcile as rc
from dagster_runway.pipeline.checks import CHECK_NAMES
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.discovery import discover
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
    verify_run_requests,
)
from dagster_runway.pipeline.status import read_events


def build_submit_schedule(
    pipeline: RunwayPipelineConfig,
    submit_job: _compat.UnresolvedAssetJobDefinition,
    collect_job: str,
    submit_op: str,
    status_sensor: str,
) -> ScheduleDefinition:
    assert pipeline.submit_schedule is not None
    name = f"{pipeline.name}_submit_schedule"

    @schedule(
        name=name,
        cron_schedule=pipeline.submit_schedule,
        execution_timezone=pipeline.schedule_timezone,
        job=submit_job,
        default_status=DefaultScheduleStatus.STOPPED,
        description=f"At {pipeline.submit_schedule} ({pipeline.schedule_timezone}): lists {pipeline.source}, records "
        "new and changed images, and submits every partition owed a submit, in batches. Needs the status "
        "sensor on: it collects the videos and keeps what each partition is owed.",
    )
    def _submit(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
        instance = context.instance
        with _compat.storage_connections_held(instance):
            found = discover(
                pipeline,
                instance,
                memory_key(pipeline, name),
                time.monotonic() + pipeline.sensor_budget_s / 2,
            )
            if found.new:
                instance.add_dynamic_partitions(pipeline.dynamic_partitions_name, found.new)
            # As the status sensor: the runs in progress before the events, so that a run ending in between
            # still covers its partitions, and the sensor's memory brought up to date (it may be a tick old).
            runs = instance.get_run_records(RunsFilter(statuses=NOT_FINISHED))
            memory = rc.SensorMemory.from_json(
                load_memory(instance, memory_key(pipeline, status_sensor)) or {}
            )
            if not memory.caught_up:
                return SkipReason(
                    f"{len(found.new)} new image(s) recorded; nothing submitted: the status sensor ({status_sensor}) has "
                    "not read the event log yet. Turn it on; the next tick submits what is owed."
                )
            read_events(instance, pipeline, memory, time.monotonic() + pipeline.sensor_budget_s / 3)
            order = list(instance.get_dynamic_partitions(pipeline.dynamic_partitions_name))
            # What this listing saw is newer than the sensor's memory.
            for key, version in found.versions.items():
                memory.state(key).image_version = version
            states = {key: memory.state(key) for key in order}
            policy = rc.Policy.of(pipeline)
            launches_key = memory_key(pipeline, f"{name}/launches")
            launched = _overlay_launches(load_memory(instance, launches_key) or {}, memory)
            wall = time.time()
            grace = run_key_grace_s(pipeline)
            coverage = rc.covered(
                runs,
                order=order,
                requests_key=pipeline.requests_key,
                videos_key=pipeline.videos_key,
                submit_job=submit_job.name,
                collect_job=collect_job,
                stale_after_s=STALE_RUN_S,
            )
            decided = rc.owed(
                order,
                states,
                policy,
                coverage,
                launches=frozenset({"submit"}),
                max_run_attempts=pipeline.max_run_attempts,
                uncreated=uncreated_run_keys(instance, (states[k] for k in launched), wall - grace),
                grace_s=grace,
                now=wall,
                wall_now=wall,
            )
            for key, where, runs_launched in decided.exhausted:
                state = states[key]
                failure = fl.runs_exhausted(key, where, runs_launched, state.request_id)
                instance.report_runless_asset_event(
                    failure.observation(pipeline.videos_key, state.image_version)
                )
                launched.discard(key)
            for key in decided.submit:
                states[key].submit_runs += 1
            tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
            requests = rc.batch_run_requests(
                decided.submit,
                order,
                max_batch=pipeline.submit_batch_size,
                prefix=f"scheduled:{tick}",
                identity=lambda k: f"{states[k].image_version}|{states[k].submit_runs}",
                config_for=lambda batch: op_config(submit_op, batch),
                tags={LAUNCHED_BY: name},
            )
            for request in requests:
                for key in rc.request_partitions(request, order):
                    states[key].run_key, states[key].launched_at = request.run_key, wall
                    launched.add(key)
            # What it launched, for the next tick; a partition that made progress (or left the submit
            # stage) is dropped, as the status sensor resets its own count.
            owing = {k for k in launched if rc.stage(states[k], policy, wall) == "submit"}
            save_memory(instance, launches_key, {k: _launch_entry(states[k]) for k in sorted(owing)})
            if decided.exhausted:
                context.log.warning(
                    f"{len(decided.exhausted)} partition(s) failed as {fl.RUNS_EXHAUSTED}: "
                    f"{pipeline.max_run_attempts} submit runs each ended without recording a result."
                )
            return requests or SkipReason(f"{len(found.new)} new image(s); nothing is owed a submit.")

    return _submit


def _launch_entry(state: rc.PartitionState) -> dict[str, Any]:
    return {
        "of": f"{state.image_version}|{state.request_id}",
        "runs": state.submit_runs,
        "key": state.run_key,
        "at": state.launched_at,
    }


def _overlay_launches(entries: dict[str, Any], memory: rc.SensorMemory) -> set[str]:
    """Put the schedule's own launches (runs, run key, when) on the status sensor's memory, for the
    partitions that made no progress since: the sensor counts the runs it launches itself, not these."""
    kept = set()
    for key, entry in entries.items():
        state = memory.partitions.get(key)
        if state is None or not isinstance(entry, dict):
            continue
        if entry.get("of") != f"{state.image_version}|{state.request_id}":
            continue  # a new request or a new image since: its count starts again
        try:
            runs, at = int(entry.get("runs", 0)), float(entry.get("at", 0.0))
        except (TypeError, ValueError):
            continue  # not what this version writes: counted from 0 again, as after a lost memory
        run_key = entry.get("key")
        state.submit_runs, state.launched_at = runs, at
        state.run_key = run_key if isinstance(run_key, str) else None
        kept.add(key)
    return kept


def build_verify_schedule(
    pipeline: RunwayPipelineConfig, verify_job: _compat.UnresolvedAssetJobDefinition, videos_op: str
) -> ScheduleDefinition:
    assert pipeline.verify_schedule is not None

    @schedule(
        name=f"{pipeline.name}_verify_schedule",
        cron_schedule=pipeline.verify_schedule,
        execution_timezone=pipeline.schedule_timezone,
        job=verify_job,
        default_status=DefaultScheduleStatus.STOPPED,
        description=f"At {pipeline.verify_schedule} ({pipeline.schedule_timezone}): runs the checks of every stored "
        f"video again ({', '.join(CHECK_NAMES)}) without regenerating anything, so silent corruption or a "
        "changed source shows in the UI.",
    )
    def _verify(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
        order = list(context.instance.get_dynamic_partitions(pipeline.dynamic_partitions_name))
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        requests = verify_run_requests(pipeline, order, order, videos_op, prefix=f"verify:{tick}")
        return requests or SkipReason("no partitions yet")

    return _verify
