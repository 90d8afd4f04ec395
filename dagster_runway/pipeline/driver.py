"""``LocalDaemon``: tick a pipeline's sensors and run what they request, in this process.

It does what ``dagster-daemon`` does for these sensors (apply the sensor's partition requests and
asset events, keep its cursor, skip run keys already launched, launch the runs), but in-process and
on demand, for the demo, tests and benchmarks. In production, ``dagster dev`` or the daemon do this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagster import DagsterInstance, DagsterRunStatus, Definitions, RunsFilter, build_sensor_context
from dagster._core.definitions.run_request import AddDynamicPartitionsRequest, DeleteDynamicPartitionsRequest

SENSOR_TAG = "dagster/sensor_name"
RUN_KEY_TAG = "dagster/run_key"


@dataclass
class TickOutcome:
    sensor: str
    run_ids: list[str] = field(default_factory=list)
    failed_run_ids: list[str] = field(default_factory=list)
    skipped_run_keys: list[str] = field(default_factory=list)
    events: int = 0
    new_partitions: int = 0


class LocalDaemon:
    def __init__(self, defs: Definitions, instance: DagsterInstance, *, log_level: str | None = None) -> None:
        """``log_level`` (e.g. ``"WARNING"``) quiets the runs' console logs; the event log keeps everything."""
        self.defs = defs
        self.instance = instance
        self.log_level = log_level
        self.cursors: dict[str, str | None] = {}

    def tick(self, sensor_name: str) -> TickOutcome:
        sensor_def = self.defs.resolve_sensor_def(sensor_name)
        outcome = TickOutcome(sensor_name)
        with build_sensor_context(
            instance=self.instance,
            cursor=self.cursors.get(sensor_name),
            resources=self.defs.resources,
            definitions=self.defs,
            sensor_name=sensor_name,
        ) as context:
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
            self.cursors[sensor_name] = result.cursor
        job_name = sensor_def.job_name
        for request in result.run_requests or []:
            if request.run_key and self._launched(sensor_name, request.run_key):
                outcome.skipped_run_keys.append(request.run_key)
                continue
            tags = dict(request.tags)
            tags[SENSOR_TAG] = sensor_name
            if request.run_key:
                tags[RUN_KEY_TAG] = request.run_key
            job = self.defs.resolve_job_def(request.job_name or job_name)
            run_config = dict(request.run_config)
            if self.log_level:
                run_config["loggers"] = {"console": {"config": {"log_level": self.log_level}}}
            run = job.execute_in_process(
                instance=self.instance,
                run_config=run_config,
                tags=tags,
                partition_key=request.partition_key,
                raise_on_error=False,
            )
            (outcome.run_ids if run.success else outcome.failed_run_ids).append(run.run_id)
        return outcome

    def _launched(self, sensor_name: str, run_key: str) -> bool:
        runs = self.instance.get_runs(
            RunsFilter(tags={SENSOR_TAG: sensor_name, RUN_KEY_TAG: run_key}), limit=1
        )
        return bool(runs) and runs[0].status != DagsterRunStatus.CANCELED
