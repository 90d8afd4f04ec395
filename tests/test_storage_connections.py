"""Runs and sensor ticks of the pipeline keep their storage connections on PostgreSQL instead of one
per statement, and a tick closes them when it ends.

Judged by PostgreSQL itself: ``pg_stat_database.sessions`` counts every session the server started.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from dagster_runway._compat import hold_storage_connections, storage_connections_held
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


def _open_connections(db: PostgresParams) -> int:
    """Connections open on the database now, the asking one left out."""
    connection = db.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (db.db_name,),
            )
            return int(cursor.fetchone()[0])
    finally:
        connection.close()


def _open_connections_settled(db: PostgresParams, expected: int) -> int:
    """Connections open once the server has ended the ones its clients closed.

    A client's close is a message; the server process ends after it, so a count taken at once can still
    see it. Waits until the count is at most ``expected`` (or 30 s pass) and returns the count.
    """
    deadline = time.monotonic() + 30
    count = _open_connections(db)
    while count > expected and time.monotonic() < deadline:
        time.sleep(0.05)
        count = _open_connections(db)
    return count


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
    # Measured: 62 sessions for 65 events, most of them the driver's own statements between ticks
    # and runs; 376 when neither the runs nor the ticks hold their connections.
    assert sessions < 2 * events, (
        f"{sessions} sessions for {events} events: the runs did not hold their connections"
    )


def test_a_block_holds_the_connections_and_closes_them_when_it_ends(
    postgres_db: PostgresParams, pg_instance: dg.DagsterInstance
) -> None:
    _report(pg_instance, 1)
    idle = _open_connections_settled(postgres_db, 0)
    before = postgres_db.sessions()
    with storage_connections_held(pg_instance):
        _report(pg_instance, 40)
        assert _open_connections(postgres_db) > idle, "the connections are held inside the block"
    assert postgres_db.sessions() - before - 1 <= 3, "one connection per storage at most"
    assert _open_connections_settled(postgres_db, idle) == idle, "the block closes what it opened"
    _report(pg_instance, 1)  # the instance works on after it


def test_a_discovery_tick_writes_its_records_over_held_connections_and_closes_them(
    tmp_path: Path, emulator, postgres_db: PostgresParams, pg_instance: dg.DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=60, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, pg_instance)
    pg_instance.get_dynamic_partitions("runway_images")  # the instance's own first connections
    idle = _open_connections_settled(postgres_db, 0)
    before_sessions, before_events = postgres_db.sessions(), _events(postgres_db)
    assert daemon.tick("runway_discovery_sensor").new_partitions == 60
    sessions = postgres_db.sessions() - before_sessions - 1
    events = _events(postgres_db) - before_events
    assert events == 120, "a materialization and an observation per image"
    # Measured: 10 sessions, most of them the driver's own statements around the tick (its cursor, the
    # partitions), which open one each as the daemon's do; the tick's 120 events share held ones.
    assert sessions < events / 5, f"{sessions} sessions for a tick that wrote {events} events"
    assert _open_connections_settled(postgres_db, idle) == idle, "the tick closed the connections it held"
