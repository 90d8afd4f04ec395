"""What holding storage connections saves on PostgreSQL: events written per second by one process,
with Dagster's default (a new connection per statement) and with the connections held as the
pipeline's runs hold them (``dagster_runway._compat.hold_storage_connections``), in the same run.
Each event is a partitioned materialization with a data version, as the pipeline's records are.

    .venv/bin/python bench/storage_connections.py [--events 300] [--rounds 2]

Prints, per mode: milliseconds of wall time and of this process's CPU per event, and the sessions the
server started (``pg_stat_database.sessions``); then the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dagster as dg  # noqa: E402
from harness import command_line, postgres_cluster  # noqa: E402

from dagster_runway._compat import DATA_VERSION_TAG, hold_storage_connections  # noqa: E402


def measure(cluster, events: int, held: bool) -> tuple[float, float, int]:
    params = cluster.create_database()
    try:
        with dg.instance_for_test(overrides={"storage": params.dagster_storage()}) as instance:
            if held:
                hold_storage_connections(instance)
            keys = [f"k{i}" for i in range(events)]
            instance.add_dynamic_partitions("images", keys)
            sessions = params.sessions()
            wall, cpu = time.perf_counter(), time.process_time()
            for key in keys:
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(
                        ["runway", "videos"],
                        partition=key,
                        metadata={"runway/key": key},
                        tags={DATA_VERSION_TAG: key},
                    )
                )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            return wall / events * 1000, cpu / events * 1000, params.sessions() - sessions - 1
    finally:
        cluster.drop_database(params.db_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two modes this many times")
    args = parser.parse_args()
    print(command_line())
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    with postgres_cluster() as cluster:
        for _ in range(args.rounds):
            for held in (False, True):
                results[held].append(measure(cluster, args.events, held))
    for held, label in ((False, "per statement (Dagster's default)"), (True, "held (the pipeline's runs)")):
        rows = results[held]
        print(
            f"{label:34} {statistics.median(r[0] for r in rows):6.2f} ms/event wall  "
            f"{statistics.median(r[1] for r in rows):5.2f} ms/event CPU  "
            f"{statistics.median(r[2] for r in rows):6.0f} sessions for {args.events} events"
        )
    plain = statistics.median(r[0] for r in results[False])
    held_ms = statistics.median(r[0] for r in results[True])
    print(f"ratio: held / per statement = {held_ms / plain:.2f}x wall per event")


if __name__ == "__main__":
    main()
