"""What the submit and the collect steps share: the partitions they serve, their log, and how a
partition's failure is recorded; and the one way the pipeline polls many requests from a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

from dagster import AssetKey, AssetObservation, DagsterInstance

from dagster_runway.errors import RunComfyError
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.records import run_id_of
from dagster_runway.resource import RunComfyResource
from dagster_runway.schema import RequestStatus


class Step:
    """One step over a set of partitions; ``failure_key`` is the asset a partition's failure is recorded on."""

    failure_key: AssetKey

    def __init__(
        self, pipeline: RunwayPipelineConfig, resource: RunComfyResource, context: Any, keys: Sequence[str]
    ) -> None:
        self.pipeline = pipeline
        self.resource = resource
        self.instance: DagsterInstance = context.instance
        self.run_id: str | None = run_id_of(context)
        self.log = context.log
        self.keys = list(keys)
        self.failures: list[fl.PartitionFailure] = []

    def _fail(self, failure: fl.PartitionFailure, source_version: str | None) -> Iterator[Any]:
        self.log.error(f"{failure.key}: {failure.message}")
        self.failures.append(failure)
        yield self._observation(failure, source_version)

    def _observation(self, failure: fl.PartitionFailure, source_version: str | None) -> AssetObservation:
        return failure.observation(self.failure_key, source_version)


def poll_statuses(
    resource: RunComfyResource, request_ids: list[str], budget: float
) -> dict[str, RequestStatus | RunComfyError]:
    """The status of each request, polled concurrently (the client's ``max_concurrency`` at a time)
    within ``budget`` seconds; an id the service could not answer for maps to its error."""

    async def main() -> dict[str, RequestStatus | RunComfyError]:
        async with resource.get_async_client() as client:
            return await client.status_many(request_ids, deadline=budget)

    return asyncio.run(main())
