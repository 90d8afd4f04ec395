"""What the event log says about each partition: its request, its video, its failure, its image.

The journal is the record of money; the event log is Dagster's record of what each partition is.
Everything here reads it back as plain dataclasses, one partition at a time or in pages after a
storage id (for the status sensor's reconciliation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    EventLogRecord,
)

from dagster_runway import _compat
from dagster_runway.models import DEFAULT_MODEL, ModelSpec, find_model
from dagster_runway.pipeline import metadata as md
from dagster_runway.version import __version__


@dataclass(frozen=True)
class RequestRecord:
    """The request that stands for a partition: submitted by it, or reused from the same fingerprint."""

    partition: str
    request_id: str
    fingerprint: str
    attempt: int
    source_version: str | None
    storage_id: int
    timestamp: float
    metadata: Mapping[str, Any] = field(default_factory=dict)  # plain values, keyed by RunwayMetadata field

    @property
    def fields(self) -> dict[str, Any]:
        """The input sent (every field but the image), under the model's names."""
        return dict(self.metadata.get("input") or {})

    @property
    def model(self) -> ModelSpec:
        """The spec of the model the request was made for (Gen-4 Turbo's for one no spec is known of)."""
        return find_model(str(self.metadata.get("model") or "")) or DEFAULT_MODEL

    @property
    def ratio(self) -> str | None:
        return self.model.ratio_of(self.fields)

    @property
    def duration_s(self) -> int | None:
        return self.model.duration_of(self.fields)

    @property
    def seed(self) -> int | None:
        return self.model.seed_of(self.fields)

    @property
    def prompt(self) -> str | None:
        """The prompt sent; None when the service's default applied."""
        return self.model.prompt_of(self.fields)


@dataclass(frozen=True)
class VideoRecord:
    partition: str
    request_id: str | None
    video_sha256: str | None
    storage_id: int
    run_id: str
    timestamp: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    raw_metadata: Mapping[str, Any] = field(default_factory=dict)  # as stored, with MetadataValue types


@dataclass(frozen=True)
class FailureRecord:
    """Why a partition failed, as recorded where it failed (an observation with ``runway/state: failed``)."""

    partition: str
    failure_class: str
    reason: str
    next_step: str
    retryable: bool
    source_version: str | None
    request_id: str | None
    storage_id: int
    timestamp: float
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    """An image as discovery last recorded it (a ``runway/images`` materialization)."""

    partition: str
    source_path: str | None  # as recorded: a local path, or a link to the object (see metadata.uri_value)
    storage_id: int


def _request(partition: str, record: EventLogRecord) -> RequestRecord | None:
    event = record.asset_materialization
    if event is None:
        return None
    meta = md.read_metadata(event.metadata)
    if not meta.get("request_id") or not meta.get("fingerprint"):
        return None
    return RequestRecord(
        partition=partition,
        request_id=meta["request_id"],
        fingerprint=meta["fingerprint"],
        attempt=int(meta.get("attempt") or 1),
        source_version=meta.get("source_version"),
        storage_id=record.storage_id,
        timestamp=record.timestamp,
        metadata=meta,
    )


def _video(partition: str, record: EventLogRecord) -> VideoRecord | None:
    event = record.asset_materialization
    if event is None:
        return None
    meta = md.read_metadata(event.metadata)
    return VideoRecord(
        partition=partition,
        request_id=meta.get("request_id"),
        video_sha256=meta.get("video_sha256"),
        storage_id=record.storage_id,
        run_id=record.run_id,
        timestamp=record.timestamp,
        metadata=meta,
        tags=dict(event.tags or {}),
        raw_metadata=dict(event.metadata),
    )


def _failure(partition: str, record: EventLogRecord) -> FailureRecord | None:
    event = record.asset_observation
    if event is None:
        return None
    meta = md.read_metadata(event.metadata)
    if meta.get("state") != md.FAILED:
        return None
    # The description reads "Failed: <reason> Next step: <next step>" (PartitionFailure.observation).
    next_step = str(meta.get("next_step") or "")
    reason = (event.description or "").removeprefix("Failed: ").removesuffix(f" Next step: {next_step}")
    return FailureRecord(
        partition=partition,
        failure_class=str(meta.get("failure_class") or "unknown"),
        reason=reason,
        next_step=next_step,
        retryable=bool(meta.get("retryable")),
        source_version=meta.get("source_version"),
        request_id=meta.get("request_id"),
        storage_id=record.storage_id,
        timestamp=record.timestamp,
        metadata=meta,
    )


def _filter(asset_key: AssetKey, partition: str) -> AssetRecordsFilter:
    return AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition])


def latest_request(instance: DagsterInstance, asset_key: AssetKey, partition: str) -> RequestRecord | None:
    """The partition's newest request materialization that carries a request id."""
    for record in instance.fetch_materializations(_filter(asset_key, partition), limit=5).records:
        found = _request(partition, record)
        if found is not None:
            return found
    return None


def latest_video(instance: DagsterInstance, asset_key: AssetKey, partition: str) -> VideoRecord | None:
    records = instance.fetch_materializations(_filter(asset_key, partition), limit=1).records
    return _video(partition, records[0]) if records else None


def latest_materializations(
    instance: DagsterInstance, asset_key: AssetKey, partitions: Sequence[str]
) -> dict[str, EventLogRecord]:
    """The latest materialization of each of ``partitions`` that has one, in two queries."""
    ids = instance.event_log_storage.get_latest_storage_id_by_partition(
        asset_key, DagsterEventType.ASSET_MATERIALIZATION, partitions=set(partitions)
    )
    if not ids:
        return {}
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, storage_ids=list(ids.values())), limit=len(ids)
    ).records
    by_id = {record.storage_id: record for record in records}
    return {partition: by_id[storage_id] for partition, storage_id in ids.items() if storage_id in by_id}


def latest_requests(
    instance: DagsterInstance, asset_key: AssetKey, partitions: Sequence[str]
) -> dict[str, RequestRecord]:
    """``latest_request`` of many partitions, batched (one lookup each only where the latest has no id)."""
    found: dict[str, RequestRecord] = {}
    for partition, record in latest_materializations(instance, asset_key, partitions).items():
        request = _request(partition, record) or latest_request(instance, asset_key, partition)
        if request is not None:
            found[partition] = request
    return found


def latest_videos(
    instance: DagsterInstance, asset_key: AssetKey, partitions: Sequence[str]
) -> dict[str, VideoRecord]:
    """``latest_video`` of many partitions, batched."""
    found = {}
    for partition, record in latest_materializations(instance, asset_key, partitions).items():
        video = _video(partition, record)
        if video is not None:
            found[partition] = video
    return found


def latest_images(
    instance: DagsterInstance, asset_key: AssetKey, partitions: Sequence[str]
) -> dict[str, ImageRecord]:
    """Each partition's latest image record (``asset_key`` is the images asset), batched."""
    found = {}
    for partition, record in latest_materializations(instance, asset_key, partitions).items():
        event = record.asset_materialization
        meta = md.read_metadata(event.metadata) if event is not None else {}
        path = meta.get("source_path")
        found[partition] = ImageRecord(
            partition=partition,
            source_path=str(path) if path else None,
            storage_id=record.storage_id,
        )
    return found


def latest_image_storage_ids(
    instance: DagsterInstance, asset_key: AssetKey, partitions: Sequence[str]
) -> dict[str, int]:
    """``latest_image_storage_id`` of many partitions, in one query."""
    return dict(
        instance.event_log_storage.get_latest_storage_id_by_partition(
            asset_key, DagsterEventType.ASSET_OBSERVATION, partitions=set(partitions)
        )
    )


def latest_failure(
    instance: DagsterInstance, asset_keys: tuple[AssetKey, ...], partition: str, limit: int = 20
) -> FailureRecord | None:
    """The newest failure recorded on the partition of any of ``asset_keys``."""
    found: list[FailureRecord] = []
    for asset_key in asset_keys:
        for record in instance.fetch_observations(_filter(asset_key, partition), limit=limit).records:
            failure = _failure(partition, record)
            if failure is not None:
                found.append(failure)
                break
    return max(found, key=lambda f: f.storage_id, default=None)


def latest_image_storage_id(instance: DagsterInstance, asset_key: AssetKey, partition: str) -> int | None:
    """The storage id of the image's latest observation: what Dagster's staleness reads for an external asset."""
    records = instance.fetch_observations(_filter(asset_key, partition), limit=1).records
    return records[0].storage_id if records else None


# Pages of events, for the status sensor's reconciliation


@dataclass(frozen=True)
class Page:
    requests: list[RequestRecord]
    videos: list[VideoRecord]
    failures: list[FailureRecord]
    images: list[tuple[str, str, int]]  # (partition, data version, storage id)
    high_water: int
    more: bool


def page_after(
    instance: DagsterInstance,
    *,
    requests_key: AssetKey,
    videos_key: AssetKey,
    images_key: AssetKey,
    after: int,
    limit: int = 1000,
) -> Page:
    """The pipeline's events after storage id ``after``, oldest first, at most ``limit`` of each kind."""
    requests: list[RequestRecord] = []
    videos: list[VideoRecord] = []
    failures: list[FailureRecord] = []
    images: list[tuple[str, str, int]] = []
    high, more = after, False
    highs = []
    for asset_key, fetch in (
        (requests_key, instance.fetch_materializations),
        (videos_key, instance.fetch_materializations),
        (requests_key, instance.fetch_observations),
        (videos_key, instance.fetch_observations),
        (images_key, instance.fetch_materializations),
    ):
        result = fetch(
            AssetRecordsFilter(asset_key=asset_key, after_storage_id=after or None),
            limit=limit,
            ascending=True,
        )
        page_more = len(result.records) == limit
        for record in result.records:
            partition = record.partition_key
            if partition is None:
                continue
            if asset_key == images_key:
                event = record.asset_materialization
                version = (event.tags or {}).get(_compat.DATA_VERSION_TAG) if event is not None else None
                if version:
                    images.append((partition, version, record.storage_id))
            elif record.asset_materialization is not None:
                if asset_key == requests_key:
                    if (request := _request(partition, record)) is not None:
                        requests.append(request)
                elif (video := _video(partition, record)) is not None:
                    videos.append(video)
            elif (failure := _failure(partition, record)) is not None:
                failures.append(failure)
        if page_more:
            more = True
            highs.append(result.records[-1].storage_id)
        elif result.records:
            high = max(high, result.records[-1].storage_id)
    # With a full page of one kind, stop at the lowest last id of the full pages, so nothing is skipped.
    high_water = min(highs) if highs else high

    def keep(storage_id: int) -> bool:
        return storage_id <= high_water

    return Page(
        requests=[r for r in requests if keep(r.storage_id)],
        videos=[v for v in videos if keep(v.storage_id)],
        failures=[f for f in failures if keep(f.storage_id)],
        images=[i for i in images if keep(i[2])],
        high_water=high_water,
        more=more,
    )


# Provenance


def image_version(change_token: str, sidecar_token: str = "", settings_token: str = "") -> str:
    """A short data version of an image and what decides its settings (sidecars, manifest row)."""
    return hashlib.sha256(f"{change_token}|{sidecar_token}|{settings_token}".encode()).hexdigest()[:12]


def provenance_tags(inputs: Mapping[AssetKey, tuple[str, int | None]], data_version: str) -> dict[str, str]:
    """Data-version tags for a materialization reported by the step, so Dagster can tell when it goes stale.

    ``inputs`` maps each input asset to the data version read and the storage id of the event it was
    read from, as the framework's own materializations record them.
    """
    tags = {_compat.CODE_VERSION_TAG: __version__, _compat.DATA_VERSION_TAG: data_version}
    for key, (version, storage_id) in inputs.items():
        tags[_compat.get_input_data_version_tag(key)] = version
        tags[_compat.get_input_event_pointer_tag(key)] = (
            str(storage_id) if storage_id else _compat.NULL_EVENT_POINTER
        )
    return tags


# For the demo, the tests and users: what the UI shows


def check_statuses(
    instance: DagsterInstance, asset_key: AssetKey, check_names: list[str], partition: str
) -> dict[str, str]:
    """The latest status of each check on one partition (``SUCCEEDED``, ``FAILED``, ...)."""
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(asset_key, name) for name in check_names], partition_keys=[partition]
    )
    return {info.check_key.name: info.latest_execution_status.value for info in infos}


def current_check_statuses(
    instance: DagsterInstance, asset_key: AssetKey, check_names: list[str], partition: str
) -> dict[str, str]:
    """Like ``check_statuses``, but a result counts only if it judged the latest materialization, as
    the UI's per-partition check view counts it; anything else reads ``MISSING``."""
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(asset_key, name) for name in check_names], partition_keys=[partition]
    )
    statuses = {}
    for info in infos:
        current = (
            info.latest_materialization_storage_id is not None
            and info.latest_target_materialization_storage_id == info.latest_materialization_storage_id
        )
        statuses[info.check_key.name] = info.latest_execution_status.value if current else "MISSING"
    for name in check_names:
        statuses.setdefault(name, "MISSING")
    return statuses


def run_id_of(context: Any) -> str | None:
    """The id of the run a step context belongs to (None for a context with no run, as in unit tests)."""
    run = getattr(context, "run", None)
    return getattr(run, "run_id", None)
