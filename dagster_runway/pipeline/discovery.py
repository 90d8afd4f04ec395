"""The discovery sensor: new and changed images become partitions and recorded image versions."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from dagster import (
    AssetMaterialization,
    AssetObservation,
    DagsterInstance,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from dagster_runway import _compat
from dagster_runway._redact import redact_url
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import reconcile as rc
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.sensors import (
    load_memory,
    memory_key,
    op_config,
    save_memory,
)


@dataclass
class Discovery:
    """What one listing of the source found, against what the last one knew."""

    images: int
    versions: dict[str, str]
    new: list[str]
    changed: list[str]
    recorded: int = 0  # images recorded (a materialization and an observation each)
    deferred: int = 0  # new or changed images left for the next tick (``discovery_batch_size``, deadline)
    unmatched: list[str] = field(default_factory=list)  # manifest rows that match no image


def discover(pipeline: RunwayPipelineConfig, instance: DagsterInstance, memory: str, deadline: float) -> Discovery:
    """List the source; find new partitions and new or changed images, and record each of those.

    A materialization shows the image as present in the catalog; the observation is what Dagster's
    staleness reads for an external asset. Both carry the image's version (bytes, sidecars, manifest
    row), and are written as each image is found, before the versions seen are kept in the instance
    under ``memory``: a tick that dies in between records them again at the next call, which costs
    events and pays nothing. At most ``discovery_batch_size`` images are recorded per call, in
    partition-key order, and none past the monotonic ``deadline`` but the first; the rest keep their
    last known version (or none), so the next call finds them again. The caller holds the storage
    connections (``_compat.storage_connections_held``): 2,000 events otherwise open a connection per
    statement.
    """
    remembered = load_memory(instance, memory) or {}
    known: dict[str, str] = remembered.get("versions", {})
    existing = set(instance.get_dynamic_partitions(pipeline.dynamic_partitions_name))
    source = pipeline.image_source()
    entries = source.list()
    found = Discovery(len(entries), {}, [], [], unmatched=source.unmatched_manifest_rows())
    if found.unmatched != remembered.get("unmatched", []):
        # On the images asset, where the UI shows it, each time the set changes (the log says it every tick).
        instance.report_runless_asset_event(
            AssetObservation(
                pipeline.images_key,
                description=f"{len(found.unmatched)} manifest row(s) match no image in {redact_url(pipeline.source)}.",
                metadata={**md.RunwayMetadata(manifest_unmatched=MetadataValue.json(found.unmatched))},
            )
        )
    for entry in entries:
        partition = entry.partition_key
        version = rec.image_version(entry.change_token, entry.sidecar_token, entry.settings_token)
        if partition in existing and known.get(partition) == version:
            found.versions[partition] = version
            continue
        if found.recorded >= pipeline.discovery_batch_size or (found.recorded and time.monotonic() > deadline):
            found.deferred += 1
            if partition in known:
                found.versions[partition] = known[partition]
            continue
        values = {
            **md.RunwayMetadata(
                source_path=md.uri_value(entry.url, pipeline.source_storage_options),
                source_size_bytes=entry.size,
                source_change_token=entry.change_token,
                source_version=version,
            )
        }
        tags = {_compat.DATA_VERSION_TAG: version}
        instance.report_runless_asset_event(AssetMaterialization(pipeline.images_key, partition=partition, metadata=values, tags=tags))
        instance.report_runless_asset_event(AssetObservation(pipeline.images_key, partition=partition, metadata=values, tags=tags))
        found.recorded += 1
        found.versions[partition] = version
        if partition not in existing:
            found.new.append(partition)
        elif partition in known:
            found.changed.append(partition)
    save_memory(instance, memory, {"versions": found.versions, "unmatched": found.unmatched})
    return found


def build_discovery_sensor(pipeline: RunwayPipelineConfig, videos_job: _compat.UnresolvedAssetJobDefinition | None, op_name: str):
    """Lists the source each tick; adds a partition per new image and records every new or changed one.

    In deferred mode the status sensor decides what to submit; in blocking mode this sensor also
    requests a videos run for each new image (and, with ``on_change="regenerate"``, each changed one).
    """
    name = f"{pipeline.name}_discovery_sensor"

    @sensor(
        name=name,
        job=videos_job,
        minimum_interval_seconds=pipeline.discovery_interval_s,
        default_status=DefaultSensorStatus.STOPPED,
        description=f"Lists {pipeline.source} for images. Each new image becomes a partition of "
        f"{pipeline.images_key.to_user_string()}, and each new or changed image is recorded (a runless "
        "materialization of the external asset) with its version: a changed image makes its video stale.",
    )
    def _discovery(context: SensorEvaluationContext) -> SensorResult:
        started = time.monotonic()
        with _compat.storage_connections_held(context.instance):
            found = discover(pipeline, context.instance, memory_key(pipeline, name), started + pipeline.sensor_budget_s)
        run_requests: list[RunRequest] = []
        if pipeline.mode == "blocking":
            order = [*context.instance.get_dynamic_partitions(pipeline.dynamic_partitions_name), *found.new]
            wanted = found.new + (found.changed if pipeline.on_change == "regenerate" else [])
            run_requests = rc.batch_run_requests(
                wanted,
                order,
                max_batch=pipeline.collect_batch_size,
                prefix="videos",
                identity=found.versions.__getitem__,
                config_for=lambda batch: op_config(op_name, batch),
            )
        if found.unmatched:
            shown = ", ".join(repr(row) for row in found.unmatched[:5]) + (", ..." if len(found.unmatched) > 5 else "")
            context.log.warning(
                f"{len(found.unmatched)} row(s) of the manifest {pipeline.manifest} match no image in "
                f"{redact_url(pipeline.source)}: {shown}. Their settings apply to nothing: correct the path (names "
                "are compared after Unicode NFC normalisation, and case matters) or remove the row."
            )
        context.log.info(
            f"Listed {found.images} images and recorded {found.recorded} in {time.monotonic() - started:.2f}s: "
            f"{len(found.new)} new, {len(found.changed)} changed"
            + (f"; {found.deferred} more at the next tick (discovery_batch_size, time budget)." if found.deferred else ".")
        )
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[pipeline.partitions_def.build_add_request(found.new)] if found.new else [],
            cursor=json.dumps(
                {"images": found.images, "new": len(found.new), "changed": len(found.changed), "deferred": found.deferred,
                 "manifest_unmatched": len(found.unmatched)}
            ),  # fmt: skip
        )

    return _discovery
