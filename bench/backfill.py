"""Issue 18: should a sensor launch a large discovery batch as one Dagster backfill instead of many runs?

One real deployment (``tests/fixtures/deployment.py``'s ``Deployment``: PostgreSQL, the QueuedRunCoordinator
with ``--max-concurrent-runs``, ``dagster-daemon run``, ``dagster-webserver``) over a code location of three
no-op assets on the same ``--partitions`` dynamic partitions, one per way of launching them all, each from a
sensor's first tick as our discovery and status sensors would:

- ``runs``: ``--batch`` partitions per run (a partition range per ``RunRequest``, as
  ``batch_run_requests`` makes them for our submit and collect runs): the baseline;
- ``backfill_multi``: one ``RunRequest.for_asset_graph_subset`` (a backfill) of an asset with
  ``BackfillPolicy.multi_run(max_partitions_per_run=--batch)``: the backfill daemon launches the runs;
- ``backfill_single``: the same of an asset with ``BackfillPolicy.single_run()``: one run of every partition.

The assets do no work, so what is measured is Dagster's own cost: runs launched, wall time from the
sensor's start until every partition is materialized and every run is done ("drain"), the wait from
the sensor's start to the first run's start, queue-to-start per run, and the Runs page (headless
Chromium: navigation start until the first row shows; and the ``runsFeedOrError`` GraphQL query the
page makes) after each. Ratios are against ``runs``, measured in the same deployment. The table is
printed and written to ``--out``.

    .venv/bin/python bench/backfill.py [--partitions 10000] [--batch 200] [--max-concurrent-runs 4]
        [--out backfill.txt]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Deployment, LoadSampler, command_line, fmt_stats, postgres_cluster  # noqa: E402

SCENARIOS = ("runs", "backfill_multi", "backfill_single")
PARTITIONS = "work"
TAG = "bench/scenario"

DEFINITIONS = '''\
"""Three no-op assets on one set of dynamic partitions, and a sensor per way of launching them all."""

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

BATCH = {batch}
TAG = {tag!r}
parts = dg.DynamicPartitionsDefinition(name={partitions!r})
POLICIES = {{
    "runs": dg.BackfillPolicy.multi_run(max_partitions_per_run=BATCH),
    "backfill_multi": dg.BackfillPolicy.multi_run(max_partitions_per_run=BATCH),
    "backfill_single": dg.BackfillPolicy.single_run(),
}}


def work_asset(name):
    @dg.asset(name=name, partitions_def=parts, backfill_policy=POLICIES[name])
    def _work(context) -> None:
        context.log.info(f"{{len(context.partition_keys)}} partitions")

    return _work


assets = [work_asset(name) for name in POLICIES]
runs_job = dg.define_asset_job("runs_job", selection=["runs"], partitions_def=parts)


def launcher(name):
    @dg.sensor(name=f"{{name}}_sensor", minimum_interval_seconds=5, asset_selection=[name] if name != "runs" else None,
               job=runs_job if name == "runs" else None)
    def _sensor(context):
        if context.cursor:
            return dg.SkipReason("launched")
        keys = sorted(context.instance.get_dynamic_partitions({partitions!r}))
        tags = {{TAG: name}}
        if name == "runs":
            requests = [
                dg.RunRequest(
                    run_key=f"batch-{{i}}",
                    tags={{**tags, ASSET_PARTITION_RANGE_START_TAG: batch[0], ASSET_PARTITION_RANGE_END_TAG: batch[-1]}},
                )
                for i, batch in enumerate(keys[start : start + BATCH] for start in range(0, len(keys), BATCH))
            ]
        else:
            subset = AssetGraphSubset(
                partitions_subsets_by_asset_key={{dg.AssetKey(name): parts.subset_with_partition_keys(keys)}}
            )
            requests = [dg.RunRequest.for_asset_graph_subset(subset, tags=tags)]
        return dg.SensorResult(run_requests=requests, cursor="launched")

    return _sensor


defs = dg.Definitions(assets=assets, jobs=[runs_job], sensors=[launcher(name) for name in POLICIES])
'''

# The Runs page: wait in the page until a run row shows (its job or asset name), answer the time since
# navigation start and the GraphQL requests finished by then.
RUNS_SCRIPT = """
const [wanted, timeoutMs] = [arguments[0], arguments[1]];
const done = arguments[arguments.length - 1];
function check() {
  const text = document.body ? document.body.innerText : '';
  if (text.includes(wanted)) return done({ms: performance.now(), graphql: performance.getEntriesByType('resource')
    .filter(e => e.name.includes('/graphql')).map(e => ({op: new URL(e.name).searchParams.get('op') || '?',
      ms: e.responseEnd - e.startTime, bytes: e.encodedBodySize}))});
  if (performance.now() > timeoutMs) return done({timeout: true, text: text.slice(0, 3000)});
  setTimeout(check, 20);
}
check();
"""


@dataclass
class Outcome:
    scenario: str
    runs: int
    backfills: int
    drain_s: float
    first_start_s: float
    queue_s: list[float]
    run_s: list[float]
    failed: int
    page_ms: list[float]
    feed_ms: list[float]


def definitions(root: Path, batch: int) -> Path:
    path = root / "backfill_defs.py"
    path.write_text(DEFINITIONS.format(batch=batch, tag=TAG, partitions=PARTITIONS))
    return path


def drain(deployment: Deployment, scenario: str, partitions: int, timeout: float) -> Outcome:
    """Start the scenario's sensor; wait until every partition is materialized and every run is done."""
    from dagster import AssetKey, DagsterRunStatus, RunsFilter
    from dagster._core.execution.backfill import BulkActionStatus

    instance = deployment.instance()
    started = time.time()
    deployment.graphql.start_sensor(f"{scenario}_sensor")
    finished = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    deadline = time.monotonic() + timeout
    while True:
        deployment.assert_alive()
        runs = instance.get_runs(filters=RunsFilter(tags={TAG: scenario}))
        done = len(instance.get_materialized_partitions(AssetKey(scenario)))
        backfills = [b for b in instance.get_backfills() if b.tags.get(TAG) == scenario]
        backfills_done = all(b.status != BulkActionStatus.REQUESTED for b in backfills)
        if done == partitions and runs and all(r.status in finished for r in runs) and backfills_done:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{scenario}: {done} of {partitions} materialized after {timeout:.0f} s")
        time.sleep(0.5)
    drain_s = time.time() - started
    deployment.graphql.stop_sensor(f"{scenario}_sensor")
    records = instance.get_run_records(filters=RunsFilter(tags={TAG: scenario}))
    starts = [r.start_time for r in records if r.start_time]
    return Outcome(
        scenario=scenario,
        runs=len(records),
        backfills=len(backfills),
        drain_s=drain_s,
        first_start_s=min(starts) - started if starts else 0.0,
        queue_s=[r.start_time - r.create_timestamp.timestamp() for r in records if r.start_time],
        run_s=[r.end_time - r.start_time for r in records if r.start_time and r.end_time],
        failed=sum(r.dagster_run.status == DagsterRunStatus.FAILURE for r in records),
        page_ms=[],
        feed_ms=[],
    )


def runs_page(browser: Any, base: str, wanted: str, repeats: int) -> tuple[list[float], list[float]]:
    """Navigation start until the Runs page shows ``wanted``, and the feed query's time, ``repeats`` times."""
    pages, feeds = [], []
    for _ in range(repeats):
        browser._call("POST", browser._s("/url"), {"url": "about:blank"})
        browser._call("POST", browser._s("/url"), {"url": f"{base}/runs"})
        answer = browser._call(
            "POST", browser._s("/execute/async"), {"script": RUNS_SCRIPT, "args": [wanted, 60_000]}
        )
        if "ms" not in answer:
            raise SystemExit(f"/runs did not show {wanted!r}: {json.dumps(answer)[:3000]}")
        pages.append(float(answer["ms"]))
        feeds += [q["ms"] for q in answer["graphql"] if q["op"].startswith("RunsFeed")]
    return pages, feeds


def report(args: argparse.Namespace, outcomes: list[Outcome], load: str) -> str:
    base = outcomes[0]
    lines = [
        command_line(),
        f"{args.partitions:,} dynamic partitions, batch {args.batch}, max_concurrent_runs {args.max_concurrent_runs}, "
        f"no-op assets; PostgreSQL, dagster-daemon, QueuedRunCoordinator; {os.cpu_count()} CPUs; {load}",
        "",
        f"{'scenario':<16} {'runs':>5} {'backfills':>9} {'drain s':>8} {'x runs':>7} {'1st start s':>11} "
        f"{'queue p50 s':>11} {'run p50 s':>9} {'failed':>6} {'Runs page ms':>12} {'feed ms':>8}",
    ]
    for o in outcomes:
        lines.append(
            f"{o.scenario:<16} {o.runs:>5} {o.backfills:>9} {o.drain_s:>8.1f} {o.drain_s / base.drain_s:>7.2f} "
            f"{o.first_start_s:>11.1f} {statistics.median(o.queue_s or [0]):>11.1f} "
            f"{statistics.median(o.run_s or [0]):>9.1f} {o.failed:>6} {statistics.median(o.page_ms):>12.0f} "
            f"{statistics.median(o.feed_ms or [0]):>8.0f}"
        )
    lines.append("")
    for o in outcomes:
        lines.append(f"{o.scenario}: queue-to-start {fmt_stats(o.queue_s)}; run {fmt_stats(o.run_s)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200, help="partitions per run (submit_batch_size)")
    parser.add_argument("--max-concurrent-runs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="Runs page loads after each scenario")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a scenario may take")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    logging.disable(logging.INFO)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.browser import Browser, find_chromium

    found = find_chromium()
    if found is None:
        raise SystemExit("chromium and chromedriver are needed (Debian: chromium, chromium-driver)")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp, postgres_cluster() as cluster:
        root = Path(tmp)
        deployment = Deployment(
            root / "deployment",
            cluster.create_database(),
            source=root / "images",
            output=root / "videos",
            definitions=definitions(root, args.batch),
            max_concurrent_runs=args.max_concurrent_runs,
        )
        try:
            with LoadSampler() as load:
                deployment.start()
                keys = [f"image{i:06d}.png" for i in range(args.partitions)]
                deployment.instance().add_dynamic_partitions(PARTITIONS, keys)
                with Browser(*found).start() as browser:
                    browser._call("POST", browser._s("/timeouts"), {"script": 90_000})
                    for scenario in SCENARIOS:
                        outcome = drain(deployment, scenario, args.partitions, args.timeout)
                        wanted = "runs_job" if scenario == "runs" else scenario
                        outcome.page_ms, outcome.feed_ms = runs_page(
                            browser, deployment.webserver_url, wanted, args.repeats
                        )
                        outcomes.append(outcome)
                        print(
                            f"{scenario}: {outcome.runs} runs, drained in {outcome.drain_s:.1f} s", flush=True
                        )
        finally:
            deployment.stop()
    text = report(args, outcomes, load.summary())
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
