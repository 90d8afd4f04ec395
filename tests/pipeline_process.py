"""A pipeline process for the crash and concurrency tests: ``python -m tests.pipeline_process '<json>'``.

It opens the Dagster instance of ``$DAGSTER_HOME`` and does one thing, as a separate process would in a
deployment: run the submit or collect job over a range of partitions (``"job"``), or drive the
sensors until nothing is owed (``"drive"``, what the demo does). The tests kill it with real signals.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from dagster import DagsterInstance

from dagster_runway import RunComfyResource
from dagster_runway.pipeline import build_runway_pipeline
from dagster_runway.pipeline.status import summary
from dagster_runway.testing import LocalDaemon

ASSET_PARTITION_RANGE_START = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END = "dagster/asset_partition_range_end"


def build(params: dict[str, Any]) -> Any:
    resource = RunComfyResource(
        api_token=params["token"],
        base_url=params["base_url"],
        poll_interval=0.05,
        backoff_initial=0.01,
        max_attempts=3,
        request_timeout=params.get("request_timeout", 60.0),
    )
    options = {"missing_prompt": "service_default", **params.get("options", {})}
    return build_runway_pipeline(params["source"], params["output"], resource=resource, **options)


def main(params: dict[str, Any]) -> int:
    logging.getLogger("dagster").setLevel(logging.WARNING)
    defs = build(params)
    with DagsterInstance.get() as instance:
        if params["action"] == "job":
            job = defs.resolve_job_def(params["job"])
            first, last = params["range"]
            tags = {ASSET_PARTITION_RANGE_START: first, ASSET_PARTITION_RANGE_END: last}
            result = job.execute_in_process(
                instance=instance,
                tags=tags,
                run_config=params.get("run_config") or {},
                raise_on_error=False,
            )
            print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
            return 0
        daemon = LocalDaemon(defs, instance, log_level="CRITICAL")
        daemon.tick("runway_discovery_sensor")
        for _ in range(params.get("max_ticks", 200)):
            outcome = daemon.tick("runway_status_sensor")
            counts = summary(outcome.cursor)
            busy = counts.get("rebuilding") or any(counts.get(k) for k in ("in_flight", "submit", "collect"))
            if not busy and not outcome.run_ids and not outcome.failed_run_ids:
                break
        print(json.dumps({"done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
