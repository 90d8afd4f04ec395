"""The pipeline's assets: source images (external), requests (submit) and videos (collect), with checks."""

import time
from collections.abc import Iterator
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    Config,
    DagsterExecutionInterruptedError,
    multi_asset,
)
from pydantic import Field

from dagster_runway._compat import hold_storage_connections
from dagster_runway._redact import redact_url
from dagster_runway.pipeline import checks as ck
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.collect import CollectBatch
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.gallery import gallery_uri, write_gallery
from dagster_runway.pipeline.submit import Ready, SubmitBatch
from dagster_runway.resource import RunComfyResource

KINDS = {"runway", "video"}


class SubmitConfig(Config):
    partitions: list[str] = Field(
        default_factory=list,
        description="Submit only these partitions of the run's range (the status sensor sets this); empty "
        "means every partition in the range.",
    )
    force_after_ambiguous: bool = Field(
        default=False,
        description="Submit even where an earlier submit of the same input may have been billed (its answer "
        "was lost). Check your RunComfy generations first.",
    )
    force_resubmit: bool = Field(
        default=False,
        description="Submit again even where the same input's last generation failed for a reason a retry is "
        "unlikely to fix (a safety rejection). Each attempt is billed.",
    )
    adopt_request_ids: dict[str, str] = Field(
        default_factory=dict,
        description="Partition -> request id found in your RunComfy history for an ambiguous submit: the "
        "request is attached to that attempt in the journal and collected, nothing is paid again (as "
        "`dagster-runway journal adopt`).",
    )


class CollectConfig(SubmitConfig):
    partitions: list[str] = Field(
        default_factory=list,
        description="Collect only these partitions of the run's range (the status sensor sets this); empty "
        "means every partition in the range.",
    )


def images_spec(pipeline: RunwayPipelineConfig) -> AssetSpec:
    return AssetSpec(
        pipeline.images_key,
        description=f"Still images found in {redact_url(pipeline.source)} ({', '.join(pipeline.patterns)}), one "
        "dynamic partition each. The discovery sensor records each new or changed image (a runless "
        "materialization) whose data version is the image's version (its bytes, sidecars and manifest row), "
        "so a changed image makes its video stale.",
        group_name=pipeline.group_name,
        kinds={*KINDS, "image"},
        partitions_def=pipeline.partitions_def,
    )


def _selected(context: AssetExecutionContext, only: list[str]) -> list[str]:
    keys = list(context.partition_keys)
    wanted = set(only)
    return [k for k in keys if k in wanted] if only else keys


def _resource(context: AssetExecutionContext, pipeline: RunwayPipelineConfig) -> RunComfyResource:
    resource: RunComfyResource = getattr(context.resources, pipeline.resource_key)
    return resource


def _cancel_on_interrupt(
    batch: SubmitBatch, pipeline: RunwayPipelineConfig, context: AssetExecutionContext
) -> None:
    if pipeline.cancel_on_termination and batch.answered:
        cancelled = batch.cancel_submitted()
        context.log.warning(
            f"Run terminated: cancelled {len(cancelled)} queued request(s) of the {len(batch.answered)} this run "
            "submitted (refunded); running ones cannot be cancelled and will finish."
        )


def build_requests_asset(pipeline: RunwayPipelineConfig) -> AssetsDefinition:
    @multi_asset(
        name=f"{pipeline.name}_requests",
        specs=[
            AssetSpec(
                pipeline.requests_key,
                deps=[pipeline.images_key],
                description="One RunComfy request per image: validated, then reused or submitted (billed). "
                "Every submit is claimed in the journal before it is sent; each materialization records the "
                "request id and the full input.",
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
    def _requests(context: AssetExecutionContext, config: SubmitConfig) -> Iterator[Any]:
        hold_storage_connections(context.instance)
        keys = _selected(context, config.partitions)
        batch = SubmitBatch(
            pipeline,
            _resource(context, pipeline),
            context,
            keys,
            force_after_ambiguous=config.force_after_ambiguous,
            force_resubmit=config.force_resubmit,
            adopt_request_ids=config.adopt_request_ids,
        )
        try:
            yield from batch.run()
        except DagsterExecutionInterruptedError:
            _cancel_on_interrupt(batch, pipeline, context)
            raise
        if batch.failures:
            raise fl.run_failure("be submitted", batch.failures, len(keys))

    return _requests


def _request_record(ready: Ready) -> rec.RequestRecord:
    prepared, claim = ready.prepared, ready.claim
    return rec.RequestRecord(
        partition=prepared.key,
        request_id=ready.request_id,
        fingerprint=prepared.fingerprint,
        attempt=claim.attempt,
        source_version=prepared.source_version,
        storage_id=0,
        timestamp=time.time(),
        metadata={
            **md.read_metadata(prepared.metadata()),
            "submitted_at": claim.answered_at or claim.claimed_at,
        },
    )


def build_videos_asset(pipeline: RunwayPipelineConfig) -> AssetsDefinition:
    deferred = pipeline.mode == "deferred"
    description = (
        f"The generated video of each image, stored in {redact_url(pipeline.output)} with a poster frame, probed "
        "and checked. "
        + (
            "Collected when the status sensor sees its request finish; a run that targets it waits for a "
            "request still rendering."
            if deferred
            else "Submitted, awaited and collected in one step (blocking mode)."
        )
    )

    @multi_asset(
        name=f"{pipeline.name}_videos",
        specs=[
            AssetSpec(
                pipeline.videos_key,
                deps=[pipeline.requests_key, pipeline.images_key] if deferred else [pipeline.images_key],
                description=description,
                group_name=pipeline.group_name,
                kinds=KINDS,
                partitions_def=pipeline.partitions_def,
                skippable=True,
            )
        ],
        check_specs=ck.check_specs(pipeline),
        can_subset=True,  # the checks run alone (the verify job) as well as with each video
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=pipeline.collect_batch_size),
        pool=None if deferred else pipeline.pool,
        required_resource_keys={pipeline.resource_key},
    )
    def _videos(context: AssetExecutionContext, config: CollectConfig) -> Iterator[Any]:
        hold_storage_connections(context.instance)
        resource = _resource(context, pipeline)
        keys = _selected(context, config.partitions)
        if pipeline.videos_key not in context.selected_asset_keys:
            yield from CollectBatch.verify(pipeline, context, keys, resource)
            _refresh_gallery(pipeline, context, keys)
            return
        failures: list[fl.PartitionFailure] = []
        requests = None
        if not deferred:
            batch = SubmitBatch(
                pipeline,
                resource,
                context,
                keys,
                force_after_ambiguous=config.force_after_ambiguous,
                force_resubmit=config.force_resubmit,
                adopt_request_ids=config.adopt_request_ids,
            )
            try:
                yield from batch.run()
            except DagsterExecutionInterruptedError:
                _cancel_on_interrupt(batch, pipeline, context)
                raise
            failures.extend(batch.failures)
            requests = {key: _request_record(ready) for key, ready in batch.ready.items()}
            keys = [k for k in keys if k in requests]
        collect = CollectBatch(pipeline, resource, context, keys, requests=requests)
        try:
            yield from collect.run()
        except DagsterExecutionInterruptedError:
            if not deferred:
                _cancel_on_interrupt(batch, pipeline, context)
            raise
        for failure in failures:  # the submit's, in blocking mode
            yield from collect.explain_checks(failure)
        failures.extend(collect.failures)
        _refresh_gallery(pipeline, context, _selected(context, config.partitions))
        if failures:
            raise fl.run_failure("be collected", failures, len(_selected(context, config.partitions)))

    return _videos


def _refresh_gallery(pipeline: RunwayPipelineConfig, context: AssetExecutionContext, keys: list[str]) -> None:
    """Rewrite the review page's rows of this run's partitions; a failure to write it fails nothing."""
    try:
        uri = write_gallery(pipeline, context.instance, partitions=keys)
    except Exception as exc:  # noqa: BLE001 - the page is a convenience; the event log has everything
        context.log.warning(f"Could not write the review page {gallery_uri(pipeline)}: {exc}")
    else:
        context.log.info(f"Review page: {uri}")
