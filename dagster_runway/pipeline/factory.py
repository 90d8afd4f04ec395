"""``build_runway_pipeline``: the whole pipeline from one call."""

from __future__ import annotations

import warnings
from typing import Any

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from dagster_runway.media.errors import SettingsError
from dagster_runway.media.settings import defaults_for_model
from dagster_runway.pipeline.assets import build_requests_asset, build_videos_asset, images_spec
from dagster_runway.pipeline.checks import CHECK_NAMES
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.discovery import build_discovery_sensor
from dagster_runway.pipeline.schedules import build_submit_schedule, build_verify_schedule
from dagster_runway.pipeline.status import build_status_sensor
from dagster_runway.resource import LiteralTokenWarning, RunComfyResource


def build_runway_pipeline(
    source: str | RunwayPipelineConfig,
    output: str | None = None,
    *,
    resource: RunComfyResource | None = None,
    **options: Any,
) -> Definitions:
    """Build the image-to-video pipeline: assets, checks, jobs and sensors, ready to merge.

    Give ``source`` and ``output`` and any field of :class:`RunwayPipelineConfig` as keyword options
    (they are validated, and a bad one is named), or a ``RunwayPipelineConfig`` itself. ``resource``
    is a ``RunComfyResource`` to include under ``resource_key``; leave it out to supply your own.
    """
    # The defaults are checked against the resource's model (Gen-4 Turbo's rules without a resource).
    context = {"model": resource.model} if resource is not None else None
    if isinstance(source, RunwayPipelineConfig):
        config = source.model_copy(update=options) if options else source
        if output is not None:
            config = config.model_copy(update={"output": output})
        config = RunwayPipelineConfig.model_validate(config.model_dump(), context=context)
    else:
        config = RunwayPipelineConfig.model_validate(
            {"source": source, "output": output, **options}, context=context
        )
    return build_definitions(config, resource)


def build_definitions(
    pipeline: RunwayPipelineConfig, resource: RunComfyResource | None = None
) -> Definitions:
    if resource is not None and (problem := resource.literal_token_warning()):
        warnings.warn(problem, LiteralTokenWarning, stacklevel=3)
    if resource is not None:  # as each run will (``ImageSource``): one error now instead of one per run
        try:
            defaults_for_model(pipeline.defaults, resource.model)
        except SettingsError as exc:
            raise ValueError(f"{exc.message} (for model_id {resource.model_id!r})") from None
    videos = build_videos_asset(pipeline)
    deferred = pipeline.mode == "deferred"
    videos_job = define_asset_job(
        f"{pipeline.name}_collect_job" if deferred else f"{pipeline.name}_videos_job",
        selection=[pipeline.videos_key],
        executor_def=in_process_executor,  # one step: a second process per run would only cost its start
        description="Collect finished requests into videos, and check them."
        if deferred
        else "Submit, wait, collect and check.",
    )
    verify_job = define_asset_job(
        f"{pipeline.name}_verify_job",
        selection=AssetSelection.checks_for_assets(pipeline.videos_key),
        executor_def=in_process_executor,
        description=f"Run the checks of stored videos again ({', '.join(CHECK_NAMES)}), without regenerating anything.",
    )
    assets: list[Any] = [images_spec(pipeline), videos]
    jobs = [videos_job, verify_job]
    videos_op = videos.op.name
    schedules = [build_verify_schedule(pipeline, verify_job, videos_op)] if pipeline.verify_schedule else []
    if deferred:
        requests = build_requests_asset(pipeline)
        submit_job = define_asset_job(
            f"{pipeline.name}_submit_job",
            selection=[pipeline.requests_key],
            executor_def=in_process_executor,
            description="Validate images and submit (or reuse) their requests, through the journal.",
        )
        assets.append(requests)
        jobs.append(submit_job)
        status = build_status_sensor(pipeline, submit_job, videos_job, requests.op.name, videos_op)
        sensors = [status]
        if pipeline.submit_schedule is None:
            sensors.insert(0, build_discovery_sensor(pipeline, None, videos_op, verify_job))
        else:
            schedules.append(
                build_submit_schedule(pipeline, submit_job, videos_job.name, requests.op.name, status.name)
            )
    else:
        sensors = [build_discovery_sensor(pipeline, videos_job, videos_op, verify_job)]
    return Definitions(
        assets=assets,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources={pipeline.resource_key: resource} if resource is not None else None,
    )
