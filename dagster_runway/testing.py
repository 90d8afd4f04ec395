"""``LocalDaemon``: tick a pipeline's sensors and run what they request, in this process, by the daemon's rules.

For the demo, tests and benchmarks. It does what ``dagster-daemon`` does for these sensors: it applies
the sensor's partition requests and asset events, keeps its cursor in the instance, never launches a
run key it has launched before (whatever became of that run), and launches the runs. Runs are tagged
with this process, so that a later ``LocalDaemon`` marks runs of a process that died as failed, as
the daemon's run monitoring would. The runs a tick requested are kept in the instance until each is
launched; a tick interrupted by the death of its process is finished by the next tick of that sensor
or schedule, as the daemon resumes an interrupted tick (the status sensor waits for a requested run
whose creation it has not seen yet). In production, ``dagster dev`` or ``dagster-daemon`` do all this.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    build_schedule_context,
    build_sensor_context,
)

from dagster_runway._process import pid_alive

SENSOR_TAG = "dagster/sensor_name"
SCHEDULE_TAG = "dagster/schedule_name"
RUN_KEY_TAG = "dagster/run_key"
DRIVER_TAG = "runway/driver"  # "<host>:<pid>" of the LocalDaemon that ran it
_CURSOR_KEY = "dagster_runway/local_daemon/cursor/"
_PENDING_KEY = (
    "dagster_runway/local_daemon/pending/"  # + sensor or schedule name: what its tick has yet to launch
)
_UNFINISHED = [DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED]


@dataclass
class TickOutcome:
    sensor: str
    run_ids: list[str] = field(default_factory=list)
    failed_run_ids: list[str] = field(default_factory=list)
    skipped_run_keys: list[str] = field(default_factory=list)
    events: int = 0
    new_partitions: int = 0
    cursor: str | None = None


class LocalDaemon:
    def __init__(self, defs: Definitions, instance: DagsterInstance, *, log_level: str | None = None) -> None:
        """``log_level`` (e.g. ``"WARNING"``) quiets the console logs of runs and ticks; the event log keeps everything."""
        self.defs = defs
        self.instance = instance
        self.log_level = log_level
        self.driver = f"{socket.gethostname()}:{os.getpid()}"
        self.dead_runs_failed = self.fail_runs_of_dead_drivers()

    def cursor(self, sensor_name: str) -> str | None:
        from dagster_runway import _compat

        return _compat.kv_get(self.instance, _CURSOR_KEY + sensor_name)

    def set_cursor(self, sensor_name: str, cursor: str | None) -> None:
        from dagster_runway import _compat

        _compat.kv_set(self.instance, _CURSOR_KEY + sensor_name, cursor or "")

    def tick(self, sensor_name: str) -> TickOutcome:
        sensor_def = self.defs.resolve_sensor_def(sensor_name)
        outcome = TickOutcome(sensor_name)
        self._resume_interrupted(SENSOR_TAG, sensor_name, outcome)
        with build_sensor_context(
            instance=self.instance,
            cursor=self.cursor(sensor_name) or None,
            resources=self.defs.resources,
            definitions=self.defs,
            sensor_name=sensor_name,
        ) as context:
            if self.log_level:  # the tick's logger prints to the console at INFO otherwise
                context.log.setLevel(self.log_level)
            result = sensor_def.evaluate_tick(context)
        for request in result.dynamic_partitions_requests or []:
            if isinstance(request, AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(
                    request.partitions_def_name, list(request.partition_keys)
                )
                outcome.new_partitions += len(request.partition_keys)
            elif isinstance(request, DeleteDynamicPartitionsRequest):
                for key in request.partition_keys:
                    self.instance.delete_dynamic_partition(request.partitions_def_name, key)
        for event in result.asset_events or []:
            self.instance.report_runless_asset_event(event)
            outcome.events += 1
        if result.cursor is not None:
            self.set_cursor(sensor_name, result.cursor)
        outcome.cursor = result.cursor
        self._launch(SENSOR_TAG, sensor_name, _job_name(sensor_def), result.run_requests or [], outcome)
        return outcome

    def _launch(
        self,
        origin_tag: str,
        name: str,
        default_job: str | None,
        requests: Sequence[RunRequest],
        outcome: TickOutcome,
    ) -> None:
        todo = []
        for request in requests:
            if request.run_key and self._launched(origin_tag, name, request.run_key):
                outcome.skipped_run_keys.append(request.run_key)
                continue
            job_name = request.job_name or default_job
            assert job_name is not None, f"{name} requested a run without naming its job"
            todo.append(request.with_replaced_attrs(job_name=job_name))
        for done, request in enumerate(todo):
            self._save_pending(name, todo[done:])
            tags = {**request.tags, origin_tag: name, DRIVER_TAG: self.driver}
            if request.run_key:
                tags[RUN_KEY_TAG] = request.run_key
            run_config = dict(request.run_config)
            if self.log_level:
                run_config["loggers"] = {"console": {"config": {"log_level": self.log_level}}}
            assert request.job_name is not None
            run = self.defs.resolve_job_def(request.job_name).execute_in_process(
                instance=self.instance,
                run_config=run_config,
                tags=tags,
                partition_key=request.partition_key,
                raise_on_error=False,
            )
            (outcome.run_ids if run.success else outcome.failed_run_ids).append(run.run_id)
        if todo:
            self._save_pending(name, [])

    def _save_pending(self, name: str, requests: Sequence[RunRequest]) -> None:
        from dagster_runway import _compat

        pending = [
            {
                "job_name": r.job_name,
                "run_key": r.run_key,
                "tags": dict(r.tags),
                "run_config": r.run_config,
                "partition_key": r.partition_key,
            }
            for r in requests
        ]
        _compat.kv_set(
            self.instance, _PENDING_KEY + name, json.dumps({"driver": self.driver, "requests": pending})
        )

    def _resume_interrupted(self, origin_tag: str, name: str, outcome: TickOutcome) -> None:
        """Launch what a tick of ``name`` in a process now gone requested but did not launch."""
        from dagster_runway import _compat

        data = json.loads(_compat.kv_get(self.instance, _PENDING_KEY + name) or "{}")
        if not data.get("requests") or not _driver_gone(str(data.get("driver", ""))):
            return  # nothing left, or a live driver is launching them (or one elsewhere, not judged here)
        requests = [RunRequest(**fields) for fields in data["requests"]]
        self._launch(origin_tag, name, None, requests, outcome)

    def tick_schedule(self, schedule_name: str, at: datetime | None = None) -> TickOutcome:
        """Evaluate a schedule as of ``at`` (now by default) and run what it requests."""
        schedule_def = self.defs.resolve_schedule_def(schedule_name)
        outcome = TickOutcome(schedule_name)
        self._resume_interrupted(SCHEDULE_TAG, schedule_name, outcome)
        with build_schedule_context(
            instance=self.instance,
            scheduled_execution_time=at or datetime.now(UTC),
            resources=self.defs.resources,
        ) as context:
            result = schedule_def.evaluate_tick(context)
        self._launch(SCHEDULE_TAG, schedule_name, schedule_def.job_name, result.run_requests or [], outcome)
        return outcome

    def _launched(self, origin_tag: str, name: str, run_key: str) -> bool:
        """The daemon's rule: a run key is launched once, whatever became of its run."""
        return bool(
            self.instance.get_run_ids(RunsFilter(tags={origin_tag: name, RUN_KEY_TAG: run_key}), limit=1)
        )

    def fail_runs_of_dead_drivers(self) -> list[str]:
        """Mark as failed the unfinished runs that a LocalDaemon of a process now gone was running."""
        failed = []
        for run in self.instance.get_runs(RunsFilter(statuses=_UNFINISHED)):
            driver = run.tags.get(DRIVER_TAG, "")
            if not _driver_gone(driver):
                continue
            self.instance.report_run_failed(
                run, f"The process that ran it ({driver}) is gone (it was killed)."
            )
            failed.append(run.run_id)
        return failed


def _driver_gone(driver: str) -> bool:
    """Whether the driver ``"<host>:<pid>"`` was a process of this host that has ended (one elsewhere
    cannot be judged from here, so it is not gone)."""
    host, _, pid = driver.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def _job_name(sensor_def: SensorDefinition) -> str | None:
    """The sensor's one job, or None when it names several (each run request then names its own) or none."""
    targets = sensor_def.targets
    return targets[0].job_name if len(targets) == 1 else None
