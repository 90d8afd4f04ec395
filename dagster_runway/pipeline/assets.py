"""The pipeline's assets: source images (external), requests (submit) and videos (collect)."""

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    BackfillPolicy,
    Config,
    DagsterExecutionInterruptedError,
    Failure,
    MetadataValue,
    multi_asset,
)
from pydantic import Field

from dagster_runway._redact import redact_url
from dagster_runway.client import RunComfyClient
from dagster_runway.errors import RunComfyError
from dagster_runway.pipeline.collect import check_specs, iter_collect
from dagster_runway.pipeline.config import RunwayPipeline
from dagster_runway.pipeline.submit import SubmitBatch
from dagster_runway.resource import RunComfyResource

KINDS = {"runway", "video"}


class SubmitConfig(Config):
    partitions: list[str] = Field(
        default_factory=list,
        description="Submit only these partitions of the run's range (the discovery sensor sets this); empty "
        "means every partition in the range.",
    )
    force_after_ambiguous: bool = Field(
        default=False,
        description="Submit even where an earlier submit of the same input may have been billed (its answer "
        "was lost). Check your RunComfy generations first.",
    )


class CollectConfig(Config):
    partitions: list[str] = Field(
        default_factory=list,
        description="Collect only these partitions of the run's range (the status sensor sets this); empty "
        "means every partition in the range.",
    )
    force_after_ambiguous: bool = Field(
        default=False, description="Blocking mode: submit even after an ambiguous earlier submit."
    )


def images_spec(pipeline: RunwayPipeline) -> AssetSpec:
    return AssetSpec(
        pipeline.images_key,
        description=f"Still images found in {redact_url(pipeline.source_url)} ({', '.join(pipeline.patterns)}), one dynamic "
        "partition each. The discovery sensor observes them; each observation's data version is the image's "
        "change token, so a changed image makes its video stale.",
        group_name=pipeline.group_name,
        kinds={*KINDS, "image"},
        partitions_def=pipeline.partitions_def,
    )


def _failure(what: str, failures: list[tuple[str, str]], total: int) -> Failure:
    lines = "\n".join(f"- {key}: {reason}" for key, reason in failures)
    return Failure(
        description=f"{len(failures)} of {total} partitions could not {what}:\n{lines}",
        metadata={"failed_partitions": MetadataValue.json({key: reason for key, reason in failures})},
    )


def _selected(context: AssetExecutionContext, only: list[str]) -> list[str]:
    keys = list(context.partition_keys)
    return [k for k in keys if k in set(only)] if only else keys


def _cancel_on_interrupt(
    batch: SubmitBatch, pipeline: RunwayPipeline, context: AssetExecutionContext
) -> None:
    if pipeline.cancel_on_termination and batch.submitted_ids:
        cancelled = batch.cancel_submitted()
        context.log.warning(
            f"Run terminated: cancelled {len(cancelled)} queued request(s) of {len(batch.submitted_ids)} "
            "submitted by this run; running ones cannot be cancelled and will finish."
        )


def build_requests_asset(pipeline: RunwayPipeline):
    @multi_asset(
        name=f"{pipeline.name}_requests",
        specs=[
            AssetSpec(
                pipeline.requests_key,
                deps=[pipeline.images_key],
                description="One RunComfy request per image: validated, then reused or submitted (billed). "
                "Each materialization records the request id the moment it is known, with the full input.",
                group_name=pipeline.group_name,
                kinds=KINDS,
                partitions_def=pipeline.partitions_def,
                skippable=True,
            )
        ],
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=pipeline.submit_batch_size),
        pool=pipeline.pool,
        required_resource_keys={pipeline.resource_key},
    )
    def _requests(context: AssetExecutionContext, config: SubmitConfig):
        resource: RunComfyResource = getattr(context.resources, pipeline.resource_key)
        keys = _selected(context, config.partitions)
        batch = SubmitBatch(
            pipeline, resource, context, keys, force_after_ambiguous=config.force_after_ambiguous
        )
        try:
            yield from batch.run()
        except DagsterExecutionInterruptedError:
            _cancel_on_interrupt(batch, pipeline, context)
            raise
        if batch.failures:
            raise _failure("be submitted", [(f.key, f.reason) for f in batch.failures], len(keys))

    return _requests


def build_videos_asset(pipeline: RunwayPipeline):
    deps = (
        [pipeline.requests_key, pipeline.images_key] if pipeline.mode == "deferred" else [pipeline.images_key]
    )
    description = (
        "The generated video of each image, streamed into "
        f"{redact_url(pipeline.output_url)} with a poster frame, probed and checked. "
        + (
            "Collected when the status sensor sees its request finish."
            if pipeline.mode == "deferred"
            else "Submitted, awaited and collected in one step (blocking mode)."
        )
    )

    @multi_asset(
        name=f"{pipeline.name}_videos",
        specs=[
            AssetSpec(
                pipeline.videos_key,
                deps=deps,
                description=description,
                group_name=pipeline.group_name,
                kinds=KINDS,
                partitions_def=pipeline.partitions_def,
                skippable=True,
            )
        ],
        check_specs=check_specs(pipeline),
        can_subset=True,  # check results are yielded per partition, as events, not as outputs
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=pipeline.collect_batch_size),
        pool=pipeline.pool if pipeline.mode == "blocking" else None,
        required_resource_keys={pipeline.resource_key},
    )
    def _videos(context: AssetExecutionContext, config: CollectConfig):
        resource: RunComfyResource = getattr(context.resources, pipeline.resource_key)
        keys = _selected(context, config.partitions)
        failures: list[tuple[str, str]] = []
        if pipeline.mode == "blocking":
            batch = SubmitBatch(
                pipeline, resource, context, keys, force_after_ambiguous=config.force_after_ambiguous
            )
            try:
                yield from batch.run()
                failures.extend((f.key, f.reason) for f in batch.failures)
                keys = [k for k in keys if k in batch.ready]
                _wait_all(resource.get_client(), batch, resource.wait_timeout, failures)
            except DagsterExecutionInterruptedError:
                _cancel_on_interrupt(batch, pipeline, context)
                raise
            keys = [k for k in keys if k not in {key for key, _ in failures}]
        source = pipeline.source()
        tokens = {}
        for key in keys:
            entry = source.entry_for_key(key, refresh=True)
            tokens[key] = entry.change_token if entry else None
        yield from iter_collect(
            pipeline, context.instance, resource.get_client(), keys, tokens, failures, context.log
        )
        if failures:
            raise _failure("be collected", failures, len(_selected(context, config.partitions)))

    return _videos


def _wait_all(
    client: RunComfyClient, batch: SubmitBatch, timeout: float, failures: list[tuple[str, str]]
) -> None:
    for key, (_, request_id) in batch.ready.items():
        try:
            client.wait(request_id, timeout=timeout)
        except RunComfyError as exc:
            failures.append((key, str(exc)))
