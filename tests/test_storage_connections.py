"""Runs of the pipeline keep their storage connections on PostgreSQL instead of one per statement.

Judged by PostgreSQL itself: ``pg_stat_database.sessions`` counts every session the server started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from dagster_runway._compat import hold_storage_connections
from dagster_runway.testing import LocalDaemon
from tests.fixtures.deployment import PostgresParams
from tests.pipeline_helpers import make_defs, run_until_idle, video_materialization_count, write_images

pytestmark = pytest.mark.deployment


def _events(db: PostgresParams) -> int:
    connection = db.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM event_logs")
            return int(cursor.fetchone()[0])
    finally:
        connection.close()


@pytest.fixture
def pg_instance(postgres_db: PostgresParams) -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test(overrides={"storage": postgres_db.dagster_storage()}) as instance:
        yield instance


def _report(instance: dg.DagsterInstance, count: int) -> None:
    instance.add_dynamic_partitions("p", [f"k{i}" for i in range(count)])
    for i in range(count):
        instance.report_runless_asset_event(
            dg.AssetMaterialization("a", partition=f"k{i}", metadata={"i": i})
        )


def test_held_connections_open_a_few_sessions_where_dagster_opens_one_per_statement(
    postgres_db: PostgresParams, pg_instance: dg.DagsterInstance
) -> None:
    before = postgres_db.sessions()
    _report(pg_instance, 40)
    plain = postgres_db.sessions() - before - 1
    assert plain >= 40, f"dagster-postgres opens a connection per statement: {plain} sessions for 40 events"

    hold_storage_connections(pg_instance)
    hold_storage_connections(pg_instance)  # a second call keeps the same pool
    before = postgres_db.sessions()
    pg_instance.report_runless_asset_event(dg.AssetMaterialization("b"))  # opens the held connections
    opened = postgres_db.sessions() - before - 1
    before = postgres_db.sessions()
    for i in range(40):
        pg_instance.report_runless_asset_event(dg.AssetMaterialization("b", metadata={"i": i}))
    assert postgres_db.sessions() - before - 1 == 0, "40 more events reuse the held connections"
    assert opened <= 3, f"one connection per storage at most, got {opened}"


def test_a_pipeline_run_on_postgres_writes_its_events_over_held_connections(
    tmp_path: Path, emulator, postgres_db: PostgresParams, pg_instance: dg.DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=4, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, pg_instance)
    daemon.tick("runway_discovery_sensor")
    before_sessions, before_events = postgres_db.sessions(), _events(postgres_db)
    assert run_until_idle(daemon) == []
    sessions = postgres_db.sessions() - before_sessions - 1
    events = _events(postgres_db) - before_events
    assert video_materialization_count(pg_instance) == 4 and emulator.ledger().billed_submissions == 4
    # Measured: 81 sessions for 65 events (the sensor ticks before the first run open their own); 376
    # when the runs do not hold their connections.
    assert sessions < 2 * events, (
        f"{sessions} sessions for {events} events: the runs did not hold their connections"
    )
