"""Every import from Dagster's private modules, in one place, each with the reason it is needed.

Dagster may move these between minor releases; ``tests/test_compat.py`` imports this module and fails
with the name that broke. Anything with a public equivalent is imported from ``dagster`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

from dagster import DagsterInstance
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    # Links a check evaluation to the materialization it judged; without it the UI's per-partition
    # check status shows every evaluation as not current ("Missing"). No public constructor exists.
    AssetCheckEvaluationTargetMaterializationData as AssetCheckEvaluationTargetMaterializationData,
)

# Data-version provenance of a materialization reported by hand (the collect step materializes
# partitions of a range run one by one), so that Dagster can tell when a video turns stale.
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG as CODE_VERSION_TAG,
)
from dagster._core.definitions.data_version import (
    DATA_VERSION_TAG as DATA_VERSION_TAG,
)
from dagster._core.definitions.data_version import (
    NULL_EVENT_POINTER as NULL_EVENT_POINTER,
)
from dagster._core.definitions.data_version import (
    get_input_data_version_tag as get_input_data_version_tag,
)
from dagster._core.definitions.data_version import (
    get_input_event_pointer_tag as get_input_event_pointer_tag,
)

# A typed set of namespaced metadata keys (``runway/...``), as dagster-fivetran's FivetranMetadataSet.
# Dagster exports only its own sets (TableMetadataSet); the base class is not public.
from dagster._core.definitions.metadata.metadata_set import NamespacedMetadataSet as NamespacedMetadataSet

# What define_asset_job returns, for the annotations of the sensors and schedules that target the
# pipeline's jobs; Dagster does not export the class.
from dagster._core.definitions.unresolved_asset_job_definition import (  # noqa: E402
    UnresolvedAssetJobDefinition as UnresolvedAssetJobDefinition,
)

# A run over a range of partitions: ``RunRequest`` takes one partition key only, so the range is
# given by these tags, as Dagster's own backfills do.
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG as ASSET_PARTITION_RANGE_END_TAG,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_START_TAG as ASSET_PARTITION_RANGE_START_TAG,
)
from dagster._core.storage.tags import (
    PARTITION_NAME_TAG as PARTITION_NAME_TAG,
)

# A cron string checked when the pipeline is defined, so that a typo fails there with the option named
# rather than at the daemon's first tick.
from dagster._utils.schedules import is_valid_cron_string as is_valid_cron_string  # noqa: E402

_HOLDING: weakref.WeakSet[DagsterInstance] = weakref.WeakSet()


def hold_storage_connections(instance: DagsterInstance) -> None:
    """Let this process keep its storage connections open for the rest of its life.

    dagster-postgres (and dagster-mysql) open a new connection for every statement, except in the
    webserver, which calls ``optimize_for_webserver`` to use a small pool instead (one connection per
    storage, overflow closed after use). A run of this pipeline writes about seven events per partition,
    each a few statements, so it does the same: on PostgreSQL a record costs 1.3 ms instead of 11.6
    (``python bench/storage_connections.py``), and the server starts a backend per run, not three per
    event. A no-op for SQLite. ``statement_timeout=0`` is PostgreSQL's own default (no timeout); it
    replaces one given in the connection's options for this run's statements. The method is public on
    ``DagsterInstance`` but named for its first user, so it is kept here. Once per instance: a second
    call would replace the pool with a new one.
    """
    if instance in _HOLDING:
        return
    instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)
    # The pool holds one connection, and storing a tagged asset event asks ``has_table`` on a second
    # one inside the first's transaction: a new connection per event (and a query). Tables do not
    # disappear under a running process, so the answer is kept while the connections are held.
    storage = instance.event_log_storage
    has_table = getattr(storage, "has_table", None)
    if has_table is not None and "has_table" not in vars(storage):
        vars(storage)["has_table"] = functools.cache(has_table)
    _HOLDING.add(instance)


@contextlib.contextmanager
def storage_connections_held(instance: DagsterInstance) -> Iterator[None]:
    """Hold the storage connections for a block, then close them and go back to a connection per
    statement: for a sensor or schedule tick, whose instance may live on in a long-lived code server or
    in the local driver (``hold_storage_connections`` is for a run's process, which ends). A no-op
    where the instance already holds them for good.

    A tick that records 1,000 images writes 2,000 events. Returned as the tick's ``asset_events``,
    the daemon writes them after the tick with a connection per statement, before it creates the tick's
    runs; written by the tick over held connections, the whole tick takes 9 s instead of 25 s on
    PostgreSQL (``python bench/scale.py``).
    ``DagsterInstance.dispose`` leaves the engines open, so the pooled ones are disposed here and the
    storages given back their own (``_engine`` is the attribute of dagster-postgres' and dagster-mysql's
    storages; SQLite's have none and hold nothing).
    """
    if instance in _HOLDING:
        yield
        return
    storages = [instance.run_storage, instance.event_log_storage, instance.schedule_storage]
    engines = [
        (storage, engine) for storage in storages if (engine := getattr(storage, "_engine", None)) is not None
    ]
    hold_storage_connections(instance)
    try:
        yield
    finally:
        _HOLDING.discard(instance)
        vars(instance.event_log_storage).pop("has_table", None)
        for storage, engine in engines:
            pooled, storage._engine = storage._engine, engine  # type: ignore[union-attr]
            if pooled is not engine:
                pooled.dispose()


def kv_get(instance: DagsterInstance, key: str) -> str | None:
    """A value of the instance's key-value store, where the daemon keeps its own large cursors.

    The status sensor keeps its memory there rather than in its cursor: a cursor is copied into every
    tick row, and this state grows with the partitions in flight. ``run_storage`` has no public API.
    """
    return instance.run_storage.get_cursor_values({key}).get(key)


def kv_set(instance: DagsterInstance, key: str, value: str) -> None:
    instance.run_storage.set_cursor_values({key: value})


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "CODE_VERSION_TAG",
    "DATA_VERSION_TAG",
    "NULL_EVENT_POINTER",
    "PARTITION_NAME_TAG",
    "AssetCheckEvaluationTargetMaterializationData",
    "NamespacedMetadataSet",
    "get_input_data_version_tag",
    "get_input_event_pointer_tag",
    "hold_storage_connections",
    "is_valid_cron_string",
    "kv_get",
    "kv_set",
    "storage_connections_held",
]
