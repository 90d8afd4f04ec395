"""The discovery sensor (new and changed images) and the status sensor (in-flight requests)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import zlib
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    JobDefinition,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from dagster_runway.errors import RequestNotFoundError, RunComfyError
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipeline
from dagster_runway.resource import RunComfyResource
from dagster_runway.schema import RequestStatus


def encode_cursor(data: dict[str, Any]) -> str:
    """Compact cursor: JSON, zlib-compressed, base64. Thousands of partitions fit in tens of KB."""
    return base64.b64encode(zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6)).decode()


def decode_cursor(cursor: str | None, log: Any) -> dict[str, Any] | None:
    """The cursor's data, or ``None`` when there is none or it cannot be read (then it is rebuilt)."""
    if not cursor:
        return None
    try:
        data = json.loads(zlib.decompress(base64.b64decode(cursor)))
        return data if isinstance(data, dict) else None
    except (ValueError, zlib.error):
        log.warning("The sensor cursor could not be read; rebuilding it from the event log.")
        return None


def batch_run_requests(
    keys: Sequence[str],
    order: dict[str, int],
    *,
    max_batch: int,
    prefix: str,
    config_for: Any,
    fingerprint: dict[str, str],
) -> list[RunRequest]:
    """Group partitions into few runs: each run covers a contiguous stretch of the partition order.

    Dagster runs one partition or one range, so a batch is a range of consecutive partitions, all of
    them selected (a range with gaps would mark its unselected partitions as attempted in the UI),
    and at most ``max_batch`` long. The run key is a hash of the keys and their request ids (or
    change tokens), so a tick that repeats itself launches nothing new.
    """
    ordered = sorted(keys, key=lambda k: order.get(k, 1 << 60))
    batches: list[list[str]] = []
    for key in ordered:
        previous = batches[-1][-1] if batches else None
        if (
            previous is not None
            and len(batches[-1]) < max_batch
            and order.get(key) == order.get(previous, -2) + 1
        ):
            batches[-1].append(key)
        else:
            batches.append([key])
    requests = []
    for batch in batches:
        digest = hashlib.sha256(
            "\n".join(f"{k}={fingerprint.get(k, '')}" for k in batch).encode()
        ).hexdigest()[:20]
        single = len(batch) == 1
        # Partition tags set here, so the run request needs no resolving against the partition store.
        tags = (
            {PARTITION_NAME_TAG: batch[0]}
            if single
            else {ASSET_PARTITION_RANGE_START_TAG: batch[0], ASSET_PARTITION_RANGE_END_TAG: batch[-1]}
        )
        requests.append(
            RunRequest(
                run_key=f"{prefix}:{digest}",
                partition_key=batch[0] if single else None,
                run_config=config_for(batch),
                tags={**tags, "runway/partition_count": str(len(batch))},
            )
        )
    return requests


def _op_config(op_name: str, partitions: list[str]) -> dict[str, Any]:
    return {"ops": {op_name: {"config": {"partitions": partitions}}}}


def build_discovery_sensor(pipeline: RunwayPipeline, job: JobDefinition, op_name: str):
    """Lists the source each tick; adds a partition per new image and requests its submit run."""

    @sensor(
        name=f"{pipeline.name}_discovery_sensor",
        job=job,
        minimum_interval_seconds=pipeline.discovery_interval_s,
        default_status=DefaultSensorStatus.STOPPED,
        description=f"Lists {pipeline.source_url} for images; each new image becomes a partition of "
        f"{pipeline.images_key.to_user_string()} and is sent to be submitted. A changed image is "
        + (
            "submitted again."
            if pipeline.on_change == "regenerate"
            else "marked stale (its video is not remade)."
        ),
    )
    def _discovery(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        started = time.monotonic()
        known: dict[str, str] = (decode_cursor(context.cursor, context.log) or {}).get("tokens", {})
        existing = context.instance.get_dynamic_partitions(pipeline.partitions_name)
        existing_set = set(existing)
        entries = pipeline.source().list()

        tokens: dict[str, str] = {}
        new: list[str] = []
        changed: list[str] = []
        observations = []
        for entry in entries:
            key = entry.partition_key
            version = rec.image_version(entry.change_token, entry.sidecar_token)
            tokens[key] = version
            before = known.get(key)
            if key not in existing_set:
                new.append(key)
            elif before == version or (before is None and known):
                continue
            elif before is not None:
                changed.append(key)
            else:
                continue  # no cursor: the partition is known, and nothing says it changed
            observations.append(
                AssetObservation(
                    asset_key=pipeline.images_key,
                    partition=key,
                    metadata={
                        rec.SOURCE_PATH: MetadataValue.path(entry.url),
                        "runway/size_bytes": entry.size,
                        rec.SOURCE_CHANGE_TOKEN: entry.change_token,
                    },
                    tags={"dagster/data_version": version},
                )
            )

        order = {key: i for i, key in enumerate([*existing, *new])}
        to_submit = new + (changed if pipeline.on_change == "regenerate" else [])
        run_requests = batch_run_requests(
            to_submit,
            order,
            max_batch=pipeline.submit_batch_size,
            prefix="submit",
            config_for=lambda batch: _op_config(op_name, batch),
            fingerprint=tokens,
        )
        elapsed = time.monotonic() - started
        context.log.info(
            f"Listed {len(entries)} images in {elapsed:.2f}s: {len(new)} new, {len(changed)} changed; "
            f"{len(run_requests)} run(s) requested."
        )
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[pipeline.partitions_def.build_add_request(new)] if new else [],
            asset_events=observations,
            cursor=encode_cursor({"tokens": tokens}),
        )

    return _discovery


def _poll(
    resource: RunComfyResource, ids: list[str], budget: float
) -> dict[str, RequestStatus | RunComfyError]:
    async def main() -> dict[str, RequestStatus | RunComfyError]:
        async with resource.get_async_client() as client:
            return await client.status_many(ids, deadline=budget)

    return asyncio.run(main())


def build_status_sensor(pipeline: RunwayPipeline, job: JobDefinition, op_name: str):
    """Polls every in-flight request inside a time budget; launches collection runs for finished ones."""

    @sensor(
        name=f"{pipeline.name}_status_sensor",
        job=job,
        minimum_interval_seconds=pipeline.status_interval_s,
        default_status=DefaultSensorStatus.STOPPED,
        required_resource_keys={pipeline.resource_key},
        description="Polls the status of every in-flight RunComfy request (concurrently, round-robin, inside a "
        f"time budget) and launches batched runs of {pipeline.videos_key.to_user_string()} for finished ones. "
        "No worker waits while a video renders.",
    )
    def _status(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        started = time.monotonic()
        resource: RunComfyResource = getattr(context.resources, pipeline.resource_key)
        state = decode_cursor(context.cursor, context.log) or {"after": 0, "inflight": {}, "rr": 0}
        inflight: dict[str, dict[str, Any]] = state["inflight"]
        rebuilding = not state["after"]

        # 1. New submissions from the event log (all of it when the cursor is new or lost).
        after = state["after"]
        while time.monotonic() - started < pipeline.sensor_budget_s / 3:
            found, after, more = rec.iter_submissions(context.instance, pipeline.requests_key, after)
            for record in found:
                inflight[record.partition] = {"id": record.request_id, "s": "submitted"}
            if not more:
                break
        if rebuilding:
            for key in list(inflight):
                latest = rec.latest_materialization_metadata(context.instance, pipeline.videos_key, key)
                if latest and latest.get(rec.REQUEST_ID) == inflight[key]["id"]:
                    del inflight[key]

        # 2. Poll, round-robin from where the last tick stopped, within the budget.
        keys = sorted(inflight)
        start = state.get("rr", 0) % len(keys) if keys else 0
        keys = keys[start:] + keys[:start]
        remaining = pipeline.sensor_budget_s - (time.monotonic() - started)
        answers = _poll(resource, [inflight[k]["id"] for k in keys], max(1.0, remaining)) if keys else {}
        by_id = {inflight[k]["id"]: k for k in keys}
        polled = 0
        finished: list[str] = []
        observations = []
        for request_id, answer in answers.items():
            key = by_id[request_id]
            polled += 1
            entry = inflight[key]
            if isinstance(answer, RequestNotFoundError):
                new_state, position = "expired", None
            elif isinstance(answer, RunComfyError):
                context.log.warning(f"{key}: polling request {request_id} failed for now: {answer}")
                continue
            else:
                new_state, position = answer.status.value, answer.queue_position
            if (new_state, position) != (entry["s"], entry.get("q")):
                observations.append(
                    AssetObservation(
                        asset_key=pipeline.requests_key,
                        partition=key,
                        description=f"Request {request_id} is {new_state}"
                        + (f" (queue position {position})" if position is not None else ""),
                        metadata={
                            rec.REQUEST_ID: request_id,
                            "runway/status": new_state,
                            **({"runway/queue_position": position} if position is not None else {}),
                        },
                    )
                )
                entry["s"], entry["q"] = new_state, position
            if new_state in ("completed", "succeeded", "failed", "cancelled", "expired"):
                finished.append(key)

        # 3. Finished requests: batched collection runs, one run key per set of requests.
        order = {
            k: i for i, k in enumerate(context.instance.get_dynamic_partitions(pipeline.partitions_name))
        }
        run_requests = batch_run_requests(
            finished,
            order,
            max_batch=pipeline.collect_batch_size,
            prefix="collect",
            config_for=lambda batch: _op_config(op_name, batch),
            fingerprint={k: inflight[k]["id"] for k in finished},
        )
        for key in finished:
            del inflight[key]
        context.log.info(
            f"Polled {polled} of {len(keys)} in-flight requests in {time.monotonic() - started:.2f}s; "
            f"{len(finished)} finished -> {len(run_requests)} collection run(s)."
        )
        return SensorResult(
            run_requests=run_requests,
            asset_events=observations,
            cursor=encode_cursor({"after": after, "inflight": inflight, "rr": start + polled}),
        )

    return _status
