"""What the discovery sensor (:mod:`.discovery`) and the status sensor (:mod:`.status`) share.

Both keep their memory in the instance's key-value store, and both rebuild it when it is lost: the
discovery sensor by observing every image again, the status sensor from the event log. Their cursors
hold only a readable summary. Neither pays for anything: runs do, through the journal.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable
from typing import Any

from dagster import (
    DagsterRunStatus,
    RunRequest,
    RunsFilter,
)

from dagster_runway import _compat
from dagster_runway.pipeline import reconcile as rc
from dagster_runway.pipeline.config import RunwayPipelineConfig

NOT_FINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
# A run still not finished after this long is taken as lost (its worker died unnoticed).
STALE_RUN_S = 6 * 3600.0
LAUNCHED_BY = "runway/launched_by"
RUN_KEY_TAG = "dagster/run_key"


def load_memory(instance: Any, key: str) -> dict[str, Any] | None:
    raw = _compat.kv_get(instance, key)
    if not raw:
        return None
    try:
        data = json.loads(zlib.decompress(base64.b64decode(raw)))
    except (ValueError, zlib.error):
        return None
    return data if isinstance(data, dict) else None


def save_memory(instance: Any, key: str, data: dict[str, Any]) -> int:
    raw = base64.b64encode(zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6)).decode()
    _compat.kv_set(instance, key, raw)
    return len(raw)


def memory_key(pipeline: RunwayPipelineConfig, sensor_name: str) -> str:
    return f"dagster_runway/{pipeline.dynamic_partitions_name}/{sensor_name}"


def op_config(op_name: str, partitions: list[str], **extra: Any) -> dict[str, Any]:
    return {"ops": {op_name: {"config": {"partitions": partitions, **extra}}}}


def verify_run_requests(
    pipeline: RunwayPipelineConfig,
    keys: list[str],
    order: list[str],
    videos_op: str,
    *,
    prefix: str,
    job_name: str | None = None,
) -> list[RunRequest]:
    """Runs of the verify job over ``keys``, in ranges of ``order`` (the checks-only job takes its range
    by tags)."""
    requests = rc.batch_run_requests(
        keys,
        order,
        max_batch=pipeline.collect_batch_size,
        prefix=prefix,
        identity=lambda k: "",
        config_for=lambda batch: op_config(videos_op, batch),
        job_name=job_name,
    )
    # A job of checks alone resolves its partitions from the run's tags only, not from a partition key.
    return [request.with_replaced_attrs(partition_key=None) for request in requests]


def run_key_grace_s(pipeline: RunwayPipelineConfig) -> float:
    """How long a requested run key may stay without its run before it is requested again."""
    return max(60.0, 4.0 * pipeline.status_interval_s)


def uncreated_run_keys(instance: Any, states: Iterable[rc.PartitionState], since: float) -> set[str]:
    """The run keys requested since ``since`` (``PartitionState.run_key``) whose runs the daemon has not
    created yet: it creates them after the tick that asks."""
    recent = {run_key for state in states if (run_key := state.run_key) and state.launched_at >= since}
    if not recent:
        return set()
    created = instance.get_run_records(RunsFilter(tags={RUN_KEY_TAG: sorted(recent)}))
    return recent - {record.dagster_run.tags.get(RUN_KEY_TAG, "") for record in created}
