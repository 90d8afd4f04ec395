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
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from dagster_runway import _compat
from dagster_runway._redact import redact_url
from dagster_runway.media.listing import Listing
from dagster_runway.media.sources import ImageEntry
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import reconcile as rc
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.sensors import (
    load_memory,
    memory_key,
    op_config,
    save_memory,
    verify_run_requests,
)


@dataclass
class Discovery:
    """What one tick's part of the listing found, against what discovery knew."""

    images: int  # images listed this tick (those past where it stopped are listed again at the next)
    versions: dict[str, str]  # the version of each image judged this tick, by partition
    new: list[str]
    changed: list[str]
    recorded: int = 0  # images recorded (a materialization and an observation each)
    deferred: int = 0  # images listed but left for the next tick (``discovery_batch_size``, deadline)
    unmatched: list[str] = field(default_factory=list)  # manifest rows that matched no image in the last pass
    read: int = 0  # objects read from the source (listing entries)
    passes: int = 0  # passes over the whole source completed
    seen: int = 0  # images judged in the pass under way (or the one this tick ended)
    pass_done: bool = False  # this tick reached the end of the source (the next one starts a pass)
    gone: list[str] = field(
        default_factory=list
    )  # partitions whose image the pass that just ended no longer saw


def discover(
    pipeline: RunwayPipelineConfig,
    instance: DagsterInstance,
    memory: str,
    deadline: float,
    *,
    max_read: int | None = None,
) -> Discovery:
    """Go on listing the source where the last call stopped; record each new or changed image.

    A call reads at most about ``max_read`` objects (:class:`~dagster_runway.media.listing.Listing`)
    and no page past the monotonic ``deadline`` but the first, and judges what it read a stem group at
    a time (an image with its sidecars): an image whose version (change token from the listing,
    sidecars' tokens, manifest row) differs from the one known is recorded. A materialization shows
    the image as present in the catalog, with its metadata; the observation is what Dagster's
    staleness reads for an external asset, and carries the version alone (nothing reads its
    metadata). At most ``discovery_batch_size`` images are recorded per call (a group is not split,
    and the first one always goes), and no group past the deadline but the first: the listing
    resumes after the last group judged.

    The instance keeps, under ``memory``, where the pass is (``cursor``, the last relative path
    judged), the versions judged in this pass (``current``) and those of the last pass not judged yet
    in this one (``previous``): each partition once. At the end of a pass what is left in ``previous``
    is gone (:attr:`Discovery.gone`), and the manifest rows no image matched in the pass are reported.
    Images are recorded before the memory is saved: a tick that dies in between records them again at
    the next call, which costs events and pays nothing. The caller holds the storage connections
    (``_compat.storage_connections_held``): 2,000 events otherwise open a connection per statement.
    """
    remembered = load_memory(instance, memory) or {}
    cursor: str | None = remembered.get("cursor")
    passes: int = remembered.get("passes", 0)
    current: dict[str, str] = remembered.get("current", {})
    previous: dict[str, str] = remembered.get(
        "previous", remembered.get("versions", {})
    )  # or the memory of 0.x
    matched: set[str] = set(remembered.get("matched", []))
    unmatched: list[str] = remembered.get("unmatched", [])
    existing = set(instance.get_dynamic_partitions(pipeline.dynamic_partitions_name))
    source = pipeline.image_source()
    listing = Listing(
        source, cursor, max_read=max_read or pipeline.discovery_list_per_tick, deadline=deadline
    )
    found = Discovery(0, {}, [], [], passes=passes)
    judged = 0
    stopped = False
    for unit in listing.units():
        versions = {
            e.partition_key: rec.image_version(e.change_token, e.sidecar_token, e.settings_token)
            for e in unit.entries
        }
        owed = [
            e
            for e in unit.entries
            if e.partition_key not in existing
            or _known(e.partition_key, current, previous) != versions[e.partition_key]
        ]
        if (
            owed
            and found.recorded
            and (found.recorded + len(owed) > pipeline.discovery_batch_size or time.monotonic() > deadline)
        ):
            stopped = True
            break
        for entry in owed:
            _record(pipeline, instance, entry, versions[entry.partition_key])
            partition = entry.partition_key
            found.recorded += 1
            if partition not in existing:
                found.new.append(partition)
            elif _known(partition, current, previous) is not None:
                found.changed.append(partition)
        for partition, version in versions.items():
            previous.pop(partition, None)
            current[partition] = version
        found.versions.update(versions)
        matched |= unit.rows
        judged += len(unit.entries)
        cursor = unit.end
    source._warn_listed(sorted(listing.skipped_outputs), sorted(listing.linked_folders))
    found.images, found.deferred, found.read = listing.images, listing.images - judged, listing.read
    found.seen = len(current)
    if listing.done and not stopped:
        found.pass_done, found.gone = True, sorted(previous)
        rows = (
            listing.manifest.rows if listing.manifest is not None and source._manifest_error is None else {}
        )
        latest = sorted(row for row in rows if row not in matched)
        if latest != unmatched:
            # On the images asset, where the UI shows it, each time the set changes (the log says it every tick).
            instance.report_runless_asset_event(
                AssetObservation(
                    pipeline.images_key,
                    description=f"{len(latest)} manifest row(s) match no image in {redact_url(pipeline.source)}.",
                    metadata={**md.RunwayMetadata(manifest_unmatched=MetadataValue.json(latest))},
                )
            )
        unmatched, cursor, current, previous, matched = latest, None, {}, current, set()
        found.passes = passes = passes + 1
    found.unmatched = unmatched
    save_memory(
        instance,
        memory,
        {"cursor": cursor, "passes": passes, "current": current, "previous": previous, "matched": sorted(matched),
         "unmatched": unmatched},
    )  # fmt: skip
    return found


def _known(partition: str, current: dict[str, str], previous: dict[str, str]) -> str | None:
    return current.get(partition, previous.get(partition))


def _record(
    pipeline: RunwayPipelineConfig, instance: DagsterInstance, entry: ImageEntry, version: str
) -> None:
    values = {
        **md.RunwayMetadata(
            source_path=md.uri_value(entry.url, pipeline.source_storage_options),
            source_size_bytes=entry.size,
            source_change_token=entry.change_token,
            source_version=version,
        )
    }
    tags = {_compat.DATA_VERSION_TAG: version}
    partition = entry.partition_key
    instance.report_runless_asset_event(
        AssetMaterialization(pipeline.images_key, partition=partition, metadata=values, tags=tags)
    )
    instance.report_runless_asset_event(AssetObservation(pipeline.images_key, partition=partition, tags=tags))


def build_discovery_sensor(
    pipeline: RunwayPipelineConfig,
    videos_job: _compat.UnresolvedAssetJobDefinition | None,
    op_name: str,
    verify_job: _compat.UnresolvedAssetJobDefinition,
) -> SensorDefinition:
    """Lists a part of the source each tick; adds a partition per new image and records every new or changed one.

    In deferred mode the status sensor decides what to submit; in blocking mode this sensor also
    requests a videos run for each new image (and, with ``on_change="regenerate"``, each changed one).
    When a pass over the source ends, the videos whose image it no longer saw are checked again (a
    verify run): their ``source_unchanged`` check fails with "deleted", in the UI as on the review page.
    """
    name = f"{pipeline.name}_discovery_sensor"

    @sensor(
        name=name,
        jobs=[job for job in (videos_job, verify_job) if job is not None],
        minimum_interval_seconds=pipeline.discovery_interval_s,
        default_status=DefaultSensorStatus.STOPPED,
        description=f"Lists {pipeline.source} for images, a part per tick. Each new image becomes a partition of "
        f"{pipeline.images_key.to_user_string()}, and each new or changed image is recorded (a runless "
        "materialization of the external asset) with its version: a changed image makes its video stale.",
    )
    def _discovery(context: SensorEvaluationContext) -> SensorResult:
        started = time.monotonic()
        with _compat.storage_connections_held(context.instance):
            found = discover(
                pipeline, context.instance, memory_key(pipeline, name), started + pipeline.sensor_budget_s
            )
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
                job_name=videos_job.name if videos_job is not None else None,
            )
        if found.unmatched:
            shown = ", ".join(repr(row) for row in found.unmatched[:5]) + (
                ", ..." if len(found.unmatched) > 5 else ""
            )
            context.log.warning(
                f"{len(found.unmatched)} row(s) of the manifest {pipeline.manifest} match no image in "
                f"{redact_url(pipeline.source)}: {shown}. Their settings apply to nothing: correct the path (names "
                "are compared after Unicode NFC normalisation, and case matters) or remove the row."
            )
        if found.gone:
            shown = ", ".join(repr(key) for key in found.gone[:5]) + (", ..." if len(found.gone) > 5 else "")
            with_video = sorted(
                rec.latest_materializations(context.instance, pipeline.videos_key, found.gone)
            )
            context.log.info(
                f"{len(found.gone)} image(s) of the last pass are no longer in the source: {shown}; the "
                f"{len(with_video)} with a video are checked again (source_unchanged fails: deleted)."
            )
            order = list(context.instance.get_dynamic_partitions(pipeline.dynamic_partitions_name))
            run_requests += verify_run_requests(
                pipeline, with_video, order, op_name, prefix=f"gone:{found.passes}", job_name=verify_job.name
            )
        context.log.info(
            f"Read {found.read} objects, listed {found.images} images and recorded {found.recorded} in "
            f"{time.monotonic() - started:.2f}s: {len(found.new)} new, {len(found.changed)} changed"
            + (
                f"; {found.deferred} more at the next tick (discovery_batch_size, time budget)"
                if found.deferred
                else ""
            )
            + (
                f"; pass {found.passes} done."
                if found.pass_done
                else f"; pass {found.passes + 1}: {found.seen} images so far."
            )
        )
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[pipeline.partitions_def.build_add_request(found.new)]
            if found.new
            else [],
            cursor=json.dumps(
                {
                    "images": found.images,
                    "new": len(found.new),
                    "changed": len(found.changed),
                    "deferred": found.deferred,
                    "manifest_unmatched": len(found.unmatched),
                    "read": found.read,
                    "passes": found.passes,
                    "seen": found.seen,
                    "pass_done": found.pass_done,
                }
            ),  # fmt: skip
        )

    return _discovery
