"""What the pipeline knows about each partition, read back from Dagster's event log.

The event log is the only state: a request id is written there (as metadata on an asset event)
the moment a submit returns, and everything later (reuse, polling, collection, checks) reads it
back from there. So a lost sensor cursor, a crashed run or a re-run never pays twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, EventLogRecord

# Metadata keys. They are part of the public surface: users query them.
REQUEST_ID = "runway/request_id"
FINGERPRINT = "runway/fingerprint"
STATE = "runway/state"
SUBMITTED_AT = "runway/submitted_at"
INPUT = "runway/input"
SOURCE_PATH = "runway/source_path"
SOURCE_SHA256 = "runway/source_sha256"
SOURCE_CHANGE_TOKEN = "runway/source_change_token"
SOURCE_VERSION = "runway/source_version"
VIDEO_SHA256 = "runway/video_sha256"

# Values of ``runway/state`` in request records.
SUBMITTED = "submitted"
REUSED = "reused"
AMBIGUOUS = "ambiguous"


def fingerprint(model_id: str, image_sha256: str, fields: Mapping[str, Any]) -> str:
    """Identity of one paid generation: the model, the image's bytes and every input field.

    ``fields`` are the input without ``promptImage`` (whose URL changes with every presign).
    """
    canonical = json.dumps(
        {"model": model_id, "image_sha256": image_sha256, "fields": dict(fields)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RequestRecord:
    """The latest request recorded for a partition."""

    partition: str
    request_id: str | None
    fingerprint: str | None
    state: str
    submitted_at: float | None
    storage_id: int
    timestamp: float
    metadata: Mapping[str, Any]


def _value(metadata: Mapping[str, Any], key: str) -> Any:
    entry = metadata.get(key)
    return getattr(entry, "value", entry)


def _to_record(partition: str, event: EventLogRecord) -> RequestRecord | None:
    asset_event = event.asset_materialization or event.asset_observation
    if asset_event is None:
        return None
    metadata = {key: _value(asset_event.metadata, key) for key in asset_event.metadata}
    if FINGERPRINT not in metadata:
        return None
    return RequestRecord(
        partition=partition,
        request_id=metadata.get(REQUEST_ID),
        fingerprint=metadata.get(FINGERPRINT),
        state=str(metadata.get(STATE) or SUBMITTED),
        submitted_at=metadata.get(SUBMITTED_AT),
        storage_id=event.storage_id,
        timestamp=event.timestamp,
        metadata=metadata,
    )


def latest_request_record(
    instance: DagsterInstance, asset_key: AssetKey, partition: str
) -> RequestRecord | None:
    """The newest request record of a partition: a materialization or an observation with a fingerprint."""
    records_filter = AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition])
    candidates: list[RequestRecord] = []
    for fetch in (instance.fetch_materializations, instance.fetch_observations):
        for event in fetch(records_filter, limit=5).records:
            record = _to_record(partition, event)
            if record is not None:
                candidates.append(record)
                break
    return max(candidates, key=lambda r: r.storage_id, default=None)


def latest_materialization_metadata(
    instance: DagsterInstance, asset_key: AssetKey, partition: str
) -> dict[str, Any] | None:
    """Plain metadata values of a partition's latest materialization, or ``None``."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    metadata = records[0].asset_materialization.metadata
    return {key: _value(metadata, key) for key in metadata}


def iter_submissions(
    instance: DagsterInstance, asset_key: AssetKey, after_storage_id: int, limit: int = 1000
) -> tuple[list[RequestRecord], int, bool]:
    """Submissions (request materializations) after ``after_storage_id``, oldest first.

    Returns them, the new high-water mark, and whether more remain past this page.
    """
    records_filter = AssetRecordsFilter(asset_key=asset_key, after_storage_id=after_storage_id or None)
    result = instance.fetch_materializations(records_filter, limit=limit, ascending=True)
    found = []
    high = after_storage_id
    for event in result.records:
        high = max(high, event.storage_id)
        record = _to_record(event.partition_key, event) if event.partition_key else None
        if record is not None and record.request_id:
            found.append(record)
    return found, high, len(result.records) == limit


def image_version(change_token: str, sidecar_token: str = "") -> str:
    """A short data version of an image: its change token (ETag, mtime, size) and its sidecars'."""
    return hashlib.sha256(f"{change_token}|{sidecar_token}".encode()).hexdigest()[:12]


def provenance_tags(inputs: Mapping[AssetKey, tuple[str, int | None]], data_version: str) -> dict[str, str]:
    """Data-version tags for a hand-made materialization, so that Dagster can tell when it goes stale.

    ``inputs`` maps each input asset to the data version read and the storage id of the event it was
    read from, as the framework's own materializations record them.
    """
    from dagster._core.definitions.data_version import (
        CODE_VERSION_TAG,
        DATA_VERSION_TAG,
        NULL_EVENT_POINTER,
        get_input_data_version_tag,
        get_input_event_pointer_tag,
    )

    from dagster_runway.version import __version__

    tags = {CODE_VERSION_TAG: __version__, DATA_VERSION_TAG: data_version}
    for key, (version, storage_id) in inputs.items():
        tags[get_input_data_version_tag(key)] = version
        tags[get_input_event_pointer_tag(key)] = str(storage_id) if storage_id else NULL_EVENT_POINTER
    return tags


def latest_observation_storage_id(
    instance: DagsterInstance, asset_key: AssetKey, partition: str
) -> int | None:
    records = instance.fetch_observations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    return records[0].storage_id if records else None


def check_statuses(
    instance: DagsterInstance, asset_key: AssetKey, check_names: list[str], partition: str
) -> dict:
    """The latest status of each check on one partition (``SUCCEEDED``, ``FAILED``, ...), as the UI shows it."""
    from dagster import AssetCheckKey

    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(asset_key, name) for name in check_names], partition_keys=[partition]
    )
    return {info.check_key.name: info.latest_execution_status.value for info in infos}


def failure_reasons(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """Why each partition of a failed run failed, from its step failure's ``failed_partitions``."""
    from dagster import DagsterEventType

    reasons: dict[str, str] = {}
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records:
        data = record.event_log_entry.dagster_event.step_failure_data
        metadata = (data.user_failure_data.metadata if data and data.user_failure_data else None) or {}
        reasons.update(_value(metadata, "failed_partitions") or {})
    return reasons
