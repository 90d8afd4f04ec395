"""Cron schedules: submission in batches at set times, and the checks of stored videos, run again.

Sensors react within seconds; some teams would rather spend at night or during business hours, or
list a large bucket once a day. With ``submit_schedule`` the discovery sensor is replaced by a
schedule that lists the source and submits what is owed at those times only. The status sensor still
polls and collects every paid video as soon as it is done (that money is already spent), and keeps the
reconciliation memory the schedule reads.
"""

from __future__ import annotations

import time

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
            for key, version in found.versions.items():
                memory.state(
                    key
                ).image_version = version  # what this listing saw, newer than the sensor's memory
            policy = rc.Policy.of(pipeline)
            coverage = rc.covered(
                runs,
                order=order,
                requests_key=pipeline.requests_key,
                videos_key=pipeline.videos_key,
                submit_job=submit_job.name,
                collect_job=collect_job,
                stale_after_s=STALE_RUN_S,
            )
            owed = [
                k for k in order if rc.stage(memory.state(k), policy) == "submit" and k not in coverage.submit
            ]
            tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
            requests = rc.batch_run_requests(
                owed,
                order,
                max_batch=pipeline.submit_batch_size,
                prefix=f"scheduled:{tick}",
                identity=lambda k: str(memory.state(k).image_version),
                config_for=lambda batch: op_config(submit_op, batch),
                tags={LAUNCHED_BY: name},
            )
            return requests or SkipReason(f"{len(found.new)} new image(s); nothing is owed a submit.")

    return _submit


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
