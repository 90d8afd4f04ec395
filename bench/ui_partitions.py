"""Issue 18, S6: the Dagster UI at 100,000 dynamic partitions, our assets against bare Dagster assets with the
same partitions, side by side in one webserver on one PostgreSQL database, read by headless Chromium.

1. A throwaway PostgreSQL cluster (``tests/fixtures/deployment.py``'s ``PostgresCluster``) and a DAGSTER_HOME on it.
2. A small real pipeline (``--seed-images`` images, the in-process emulator, ``LocalDaemon`` ticking the
   sensors and running what they launch) records real events: the images' runless materializations and
   observations, the submit and collect runs with the requests' and videos' materializations, the
   requests' observations, and the five check results per partition.
3. Bulk: ``--partitions`` keys added to our ``runway_images`` partitions and as many to a bare
   ``DynamicPartitionsDefinition``. Every partition of ours gets the events of one seed partition's images
   (copied, with the partition key and its file name replaced), ``--videos`` of them also its requests' and
   videos' events and the five checks (planned per collect batch, as a collect run plans them, and
   evaluated per partition against that partition's own video materialization). The bare assets
   (``bare/images``, ``bare/videos``, plain ``@asset``s) get as many plain materializations, no metadata.
4. ``dagster-webserver`` over one code location with both, and Chromium opening each asset's page and its
   Partitions tab: the time from navigation start (the page's Performance API clock) until the page shows
   its main content (the asset's partition counts), first visit ("cold": Dagster builds its partition
   status cache then) and the median of ``--repeats`` more, ours and bare alternating. The GraphQL
   requests each page made until then (``/graphql?op=...``, from the Performance API) are listed by time.

Goal (S6): ours at most 1.2x bare, per page. The table is printed and written to ``--out``.

    .venv/bin/python bench/ui_partitions.py [--partitions 100000] [--videos 10000] [--repeats 3]
        [--seed-images 6] [--out ui_partitions.txt] [--keep]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    REPO_ROOT,
    LoadSampler,
    ManagedProcess,
    _executable,
    command_line,
    free_port,
    make_images,
    postgres_cluster,
    stop_processes,
)

GOAL = 1.2
PARTITIONS = "runway_images"
BARE_PARTITIONS = "bare_images"
# Partitions per collect run: one planned event per check per batch, as the collect job plans them.
COLLECT_BATCH = 100
CHUNK = 2_000  # events per batch write
# Per-partition events a seed partition has, by asset: copied for every bulk partition (images) or for the
# --videos share (requests, videos, checks).
COPIED = ("ASSET_MATERIALIZATION_PLANNED", "ASSET_MATERIALIZATION", "ASSET_OBSERVATION")

DEFINITIONS = '''\
"""Our pipeline and two bare assets on the same kind of partitions, for bench/ui_partitions.py."""

import dagster as dg

from dagster_runway import RunComfyResource
from dagster_runway.pipeline import build_runway_pipeline

bare_partitions = dg.DynamicPartitionsDefinition(name={bare!r})


@dg.asset(key=["bare", "images"], partitions_def=bare_partitions, group_name="bare")
def bare_images() -> None:
    """A bare asset."""


@dg.asset(key=["bare", "videos"], partitions_def=bare_partitions, group_name="bare", deps=[bare_images])
def bare_videos() -> None:
    """A bare asset."""


defs = dg.Definitions.merge(
    build_runway_pipeline(
        {source!r},
        {output!r},
        missing_prompt="service_default",
        resource=RunComfyResource(api_token=dg.EnvVar("RUNCOMFY_API_TOKEN"), base_url="http://127.0.0.1:9"),
    ),
    dg.Definitions(assets=[bare_images, bare_videos]),
)
'''

# Waits in the page until every wanted text shows (or an error marker, or the timeout); answers the time
# since navigation start and the GraphQL requests finished by then.
PAGE_SCRIPT = """
const [wanted, markers, timeoutMs] = [arguments[0], arguments[1], arguments[2]];
const done = arguments[arguments.length - 1];
function graphql() {
  return performance.getEntriesByType('resource').filter(e => e.name.includes('/graphql')).map(e => ({
    op: new URL(e.name).searchParams.get('op') || '?', start: e.startTime, end: e.responseEnd,
    bytes: e.encodedBodySize}));
}
function check() {
  const text = document.body ? document.body.innerText : '';
  const errors = markers.filter(m => text.includes(m));
  if (errors.length) return done({errors, text: text.slice(0, 4000)});
  if (wanted.every(w => text.includes(w))) return done({ms: performance.now(), graphql: graphql()});
  if (performance.now() > timeoutMs) return done({timeout: true, missing: wanted.filter(w => !text.includes(w)),
    text: text.slice(0, 4000)});
  setTimeout(check, 20);
}
check();
"""


# -- the database: a real seed run, then bulk copies of its events ----------------------------------


def migrate(home: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run(
        [_executable("dagster"), "instance", "migrate"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"dagster instance migrate failed:\n{done.stdout}{done.stderr}")


def seed(instance: Any, root: Path, images: int) -> list[str]:
    """The real pipeline over ``images`` images until idle; returns their partition keys."""
    from dagster_runway import RunComfyResource
    from dagster_runway.emulator import Emulator, EmulatorConfig
    from dagster_runway.pipeline import build_runway_pipeline
    from dagster_runway.pipeline.status import summary
    from dagster_runway.testing import LocalDaemon

    make_images(root / "images", images)
    with Emulator(EmulatorConfig(time_scale=0.0, max_concurrency=64)) as emulator:
        resource = RunComfyResource(api_token=emulator.token, base_url=emulator.base_url, poll_interval=0.05)
        defs = build_runway_pipeline(
            str(root / "images"), str(root / "videos"), resource=resource, missing_prompt="service_default"
        )
        daemon = LocalDaemon(defs, instance, log_level="WARNING")
        daemon.tick("runway_discovery_sensor")
        for _ in range(300):
            outcome = daemon.tick("runway_status_sensor")
            counts = summary(outcome.cursor)
            busy = counts.get("rebuilding") or any(
                counts.get(k) for k in ("in_flight", "submit", "collect", "running")
            )
            if not busy and not outcome.run_ids and not outcome.failed_run_ids:
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"the seed pipeline did not settle: {counts}")
    keys = sorted(instance.get_dynamic_partitions(PARTITIONS))
    if len(keys) != images:
        raise SystemExit(f"the seed pipeline discovered {len(keys)} of {images} images")
    return keys


@dataclass
class Templates:
    """One seed partition's events as stored (JSON text), by asset, and the seed's collect run."""

    key: str
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)  # requests and videos events, in stored order
    checks: list[str] = field(default_factory=list)  # check evaluations
    planned_checks: list[str] = field(default_factory=list)  # one per check, for one collect run
    video_storage_id: int = 0


def templates(database: Any, key: str) -> Templates:
    found = Templates(key)
    connection = database.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id, dagster_event_type, asset_key, event FROM event_logs "
                "WHERE partition = %s AND dagster_event_type = ANY(%s) ORDER BY id",
                (key, list(COPIED)),
            )
            for event_id, event_type, asset_key, text in cursor.fetchall():
                asset = json.loads(asset_key)[-1]
                (found.images if asset == "images" else found.videos).append(text)
                if asset == "videos" and event_type == "ASSET_MATERIALIZATION":
                    found.video_storage_id = int(event_id)
            cursor.execute(
                "SELECT dagster_event_type, event FROM event_logs WHERE dagster_event_type LIKE 'ASSET_CHECK%%' "
                "AND event LIKE %s ORDER BY id",
                (f'%"{key}"%',),
            )
            seen: set[str] = set()
            for event_type, text in cursor.fetchall():
                event = json.loads(text)["dagster_event"]["event_specific_data"]
                if event_type == "ASSET_CHECK_EVALUATION" and event.get("partition") == key:
                    found.checks.append(text)
                elif event_type == "ASSET_CHECK_EVALUATION_PLANNED" and event["check_name"] not in seen:
                    seen.add(event["check_name"])
                    found.planned_checks.append(text)
    finally:
        connection.close()
    if not (found.images and found.videos and len(found.checks) == 5 and len(found.planned_checks) == 5):
        raise SystemExit(
            f"the seed partition {key} lacks events: {len(found.images)} images, {len(found.videos)} "
            f"requests/videos, {len(found.checks)} check results, {len(found.planned_checks)} planned checks"
        )
    return found


def bulk_keys(count: int, seed_keys: Sequence[str]) -> list[str]:
    """``count`` partition keys beyond the seed's, named as the seed's are (``image00000.png``)."""
    return [f"image{i:06d}.png" for i in range(len(seed_keys), count)]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _entry(text: str) -> Any:
    from dagster import deserialize_value
    from dagster._core.events.log import EventLogEntry

    return deserialize_value(text, EventLogEntry)


def _copy(template: str, old: str, new: str) -> Any:
    """A stored event with one partition key (and the file name it is) replaced by another."""
    return _entry(template.replace(old, new))


def _store(instance: Any, events: Sequence[Any]) -> None:
    """Batch-write what the storage batches (a run of materializations or observations), the rest one by one."""
    storage = instance.event_log_storage
    stretch: list[Any] = []  # consecutive events of one type
    for event in [*events, None]:
        kind = event.dagster_event_type if event is not None else None
        if stretch and kind != stretch[0].dagster_event_type:
            if stretch[0].dagster_event_type.value in ("ASSET_MATERIALIZATION", "ASSET_OBSERVATION"):
                storage.store_event_batch(stretch)
            else:
                for item in stretch:
                    storage.store_event(item)
            stretch = []
        if event is not None:
            stretch.append(event)


def fill(
    instance: Any, database: Any, seed_keys: Sequence[str], partitions: int, videos: int
) -> dict[str, float]:
    """Add the bulk partitions and their events, ours and bare; returns seconds per step."""
    from dagster import AssetKey, AssetMaterialization
    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.events.log import EventLogEntry

    timings: dict[str, float] = {}
    template = templates(database, seed_keys[0])
    keys = bulk_keys(partitions, seed_keys)
    with_videos = keys[: videos - len(seed_keys)]  # the seed's own partitions have videos already

    started = time.monotonic()
    for chunk in _chunks(keys, 10_000):
        instance.add_dynamic_partitions(PARTITIONS, list(chunk))
    instance.add_dynamic_partitions(BARE_PARTITIONS, [*seed_keys, *keys])
    timings["partitions"] = time.monotonic() - started

    started = time.monotonic()
    for chunk in _chunks(keys, CHUNK):
        for text in template.images:  # materializations, then observations: each a batch write
            _store(instance, [_copy(text, template.key, key) for key in chunk])
    timings["images events"] = time.monotonic() - started

    started = time.monotonic()
    for batch in _chunks(with_videos, COLLECT_BATCH):
        for text in template.videos:
            _store(instance, [_copy(text, template.key, key) for key in batch])
        for text in template.planned_checks:  # what a collect run of this batch plans
            event = json.loads(text)
            event["dagster_event"]["event_specific_data"]["partitions_subset"]["subset"] = {
                "__set__": list(batch)
            }
            _store(instance, [_entry(json.dumps(event))])
        ids = _video_ids(database, batch)
        checks = []
        for key in batch:
            for text in template.checks:
                copied = text.replace(
                    f'"storage_id": {template.video_storage_id}', f'"storage_id": {ids[key]}'
                )
                checks.append(_copy(copied, template.key, key))
        _store(instance, checks)
    timings["requests/videos/checks events"] = time.monotonic() - started

    started = time.monotonic()
    bare = {("bare", "images"): [*seed_keys, *keys], ("bare", "videos"): [*seed_keys, *with_videos]}
    for path, bare_keys in bare.items():
        for chunk in _chunks(bare_keys, CHUNK):
            events = [
                EventLogEntry(
                    error_info=None,
                    level=logging.INFO,
                    user_message="",
                    run_id="",
                    timestamp=time.time(),
                    dagster_event=DagsterEvent(
                        DagsterEventType.ASSET_MATERIALIZATION.value,
                        job_name="__RUNLESS__",
                        event_specific_data=StepMaterializationData(
                            AssetMaterialization(asset_key=AssetKey(list(path)), partition=key)
                        ),
                    ),
                )
                for key in chunk
            ]
            instance.event_log_storage.store_event_batch(events)
    timings["bare events"] = time.monotonic() - started
    return timings


def _video_ids(database: Any, keys: Sequence[str]) -> dict[str, int]:
    connection = database.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT partition, max(id) FROM event_logs WHERE asset_key = %s AND "
                "dagster_event_type = 'ASSET_MATERIALIZATION' AND partition = ANY(%s) GROUP BY partition",
                ('["runway", "videos"]', list(keys)),
            )
            return {key: int(event_id) for key, event_id in cursor.fetchall()}
    finally:
        connection.close()


def event_rows(database: Any) -> list[tuple[str, str, int, int]]:
    """(asset, event type, rows, bytes) of the event log's asset and check events."""
    connection = database.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT asset_key, dagster_event_type, count(*), sum(length(event)) FROM event_logs "
                "WHERE asset_key IS NOT NULL OR dagster_event_type LIKE 'ASSET_CHECK%%' GROUP BY 1, 2 ORDER BY 1, 2"
            )
            return [
                ("/".join(json.loads(a)) if a else "(checks)", t, n, b) for a, t, n, b in cursor.fetchall()
            ]
    finally:
        connection.close()


# -- the webserver and the browser ------------------------------------------------------------------


def start_webserver(root: Path, home: Path, definitions: Path) -> tuple[ManagedProcess, str]:
    """``dagster-webserver`` over ``definitions`` on a free port, once its code location is loaded."""
    from tests.graphql_client import DagsterGraphQL

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "RUNWAY_", "RUNCOMFY_"))}
    env.update(
        DAGSTER_HOME=str(home),
        DAGSTER_DISABLE_TELEMETRY="1",
        RUNCOMFY_API_TOKEN="not-used",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    argv = [
        _executable("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-f", str(definitions),
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    (root / "logs").mkdir(exist_ok=True)
    process = ManagedProcess("webserver", argv, env, root, root / "logs")
    process.start()
    url = f"http://127.0.0.1:{port}"
    graphql = DagsterGraphQL(url)
    deadline = time.monotonic() + 180
    try:
        while True:
            if not process.running:
                raise SystemExit(f"dagster-webserver exited:\n{process.tails(40)}")
            try:
                states = [entry["loadStatus"] for entry in graphql.locations()]
            except Exception:
                states = []
            if states == ["LOADED"]:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the code location did not load within 180 s:\n{process.tails(40)}")
            time.sleep(0.5)
        graphql.set_nux_seen()
    except BaseException:
        stop_processes([process])
        raise
    finally:
        graphql.close()
    return process, url


@dataclass(frozen=True)
class Page:
    asset: str  # "runway/images"
    view: str  # "overview" or "partitions"
    wanted: tuple[str, ...]  # texts that show once the page's main content is drawn

    @property
    def path(self) -> str:
        return f"/assets/{self.asset}" + ("?view=partitions" if self.view == "partitions" else "")


@dataclass
class Visit:
    ms: float
    graphql: list[dict[str, Any]]


def pages(keys: Sequence[str], videos: int) -> list[tuple[Page, Page]]:
    """(ours, bare) pairs: each asset's overview and Partitions tab, with the same texts to wait for (the
    latest materialized partition; the partition counts)."""
    partitions = len(keys)
    pairs = []
    for ours, bare, materialized in (
        ("runway/images", "bare/images", partitions),
        ("runway/videos", "bare/videos", videos),
    ):
        last = keys[materialized - 1]
        overview = ("Latest materialization", last, "Upstream assets")
        counts = (
            f"Materialized ({materialized})",
            f"Missing ({partitions - materialized})",
            "Partitions Selected",
        )
        pairs.append((Page(ours, "overview", overview), Page(bare, "overview", overview)))
        pairs.append((Page(ours, "partitions", counts), Page(bare, "partitions", counts)))
    return pairs


def visit(browser: Any, base: str, page: Page, timeout_s: float) -> Visit:
    """Navigate to ``page`` from a blank page (a fresh document and clock) and wait for its content."""
    from tests.browser import ERROR_MARKERS

    browser._call("POST", browser._s("/url"), {"url": "about:blank"})
    browser._call("POST", browser._s("/url"), {"url": base + page.path})
    answer = browser._call(
        "POST",
        browser._s("/execute/async"),
        {"script": PAGE_SCRIPT, "args": [list(page.wanted), list(ERROR_MARKERS), timeout_s * 1000]},
    )
    if "ms" not in answer:
        raise SystemExit(f"{page.path}: {json.dumps(answer)[:4000]}")
    return Visit(float(answer["ms"]), answer["graphql"])


@dataclass
class Measured:
    cold: dict[Page, Visit] = field(default_factory=dict)
    warm: dict[Page, list[Visit]] = field(default_factory=dict)


def measure(base: str, pairs: Sequence[tuple[Page, Page]], repeats: int, timeout_s: float) -> Measured:
    result = Measured()
    with _browser() as browser:
        browser._call("POST", browser._s("/timeouts"), {"script": int(timeout_s * 1000) + 30_000})
        for ours, bare in pairs:  # first visits, ours first: each builds its asset's status cache
            for page in (ours, bare):
                result.cold[page] = visit(browser, base, page, timeout_s)
        for _ in range(repeats):
            for ours, bare in pairs:
                for page in (ours, bare):
                    result.warm.setdefault(page, []).append(visit(browser, base, page, timeout_s))
    return result


def _browser() -> Any:
    from tests.browser import Browser, find_chromium

    found = find_chromium()
    if found is None:
        raise SystemExit("chromium and chromedriver are needed (Debian: chromium, chromium-driver)")
    return Browser(*found).start()


def slowest_queries(visit: Visit, top: int = 3) -> str:
    """The GraphQL requests that finished last before the content showed: the ones the page waited on."""
    shown = [q for q in visit.graphql if q["end"] <= visit.ms]
    shown.sort(key=lambda q: -(q["end"] - q["start"]))
    return ", ".join(
        f"{q['op']} {q['end'] - q['start']:.0f} ms ({q['bytes'] / 1024:.0f} KB)" for q in shown[:top]
    )


def report(
    args: argparse.Namespace,
    pairs: Sequence[tuple[Page, Page]],
    measured: Measured,
    timings: dict[str, float],
    rows: Sequence[tuple[str, str, int, int]],
    load: str,
) -> str:
    lines = [
        command_line(),
        f"{args.partitions:,} dynamic partitions per asset; runway/images and bare/images materialized for all, "
        f"runway/videos (with requests and 5 checks) and bare/videos for {args.videos:,}; PostgreSQL, "
        f"dagster-webserver, headless Chromium at 1440x900; {os.cpu_count()} CPUs; {load}",
        "fill: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()),
        "",
        "time to first render (navigation start -> the page shows its partition counts / latest materialization), ms",
        f"{'page':<28} {'ours cold':>9} {'bare cold':>9} {'ratio':>6}   {'ours p50':>8} {'bare p50':>8} {'ratio':>6}"
        f"  goal <= {GOAL}",
    ]
    verdicts = []
    for ours, bare in pairs:
        cold_ratio = measured.cold[ours].ms / measured.cold[bare].ms
        ours_ms = statistics.median(v.ms for v in measured.warm[ours])
        bare_ms = statistics.median(v.ms for v in measured.warm[bare])
        ratio = ours_ms / bare_ms
        verdicts.append(ratio <= GOAL)
        label = f"{ours.asset.split('/')[-1]} {ours.view}"
        lines.append(
            f"{label:<28} {measured.cold[ours].ms:>9.0f} {measured.cold[bare].ms:>9.0f} {cold_ratio:>6.2f}   "
            f"{ours_ms:>8.0f} {bare_ms:>8.0f} {ratio:>6.2f}  {'ok' if ratio <= GOAL else 'OVER'}"
        )
    lines += ["", "slowest GraphQL requests before the content showed (median visit):"]
    for ours, bare in pairs:
        for page in (ours, bare):
            visits = sorted(measured.warm[page], key=lambda v: v.ms)
            lines.append(f"  {page.asset} {page.view}: {slowest_queries(visits[len(visits) // 2])}")
    lines += ["", f"{'event log (asset and check events)':<40} {'rows':>9} {'MB':>8} {'B/row':>7}"]
    for asset, event_type, count, size in rows:
        lines.append(f"  {asset + ' ' + event_type:<38} {count:>9,} {size / 1e6:>8.1f} {size / count:>7.0f}")
    lines.append(f"S6 {'met' if all(verdicts) else 'NOT met'} on every page (warm medians).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=100_000)
    parser.add_argument(
        "--videos", type=int, default=10_000, help="partitions with requests, videos and checks"
    )
    parser.add_argument("--seed-images", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a page may take")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database gone)")
    args = parser.parse_args()
    if not args.seed_images <= args.videos <= args.partitions:
        parser.error("need --seed-images <= --videos <= --partitions")
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    logging.disable(logging.INFO)

    from dagster import DagsterInstance

    root = Path(tempfile.mkdtemp(prefix="ui-partitions-"))
    try:
        with postgres_cluster() as cluster, LoadSampler() as load:
            database = cluster.create_database()
            home = root / "home"
            home.mkdir()
            storage = {"storage": database.dagster_storage(), "telemetry": {"enabled": False}}
            (home / "dagster.yaml").write_text(json.dumps(storage))  # JSON is YAML
            migrate(home)
            with DagsterInstance.from_config(str(home)) as instance:
                started = time.monotonic()
                seed_keys = seed(instance, root, args.seed_images)
                timings = {"seed pipeline": time.monotonic() - started}
                timings.update(fill(instance, database, seed_keys, args.partitions, args.videos))
            keys = [*seed_keys, *bulk_keys(args.partitions, seed_keys)]
            rows = event_rows(database)
            definitions = root / "ui_defs.py"
            definitions.write_text(
                DEFINITIONS.format(
                    bare=BARE_PARTITIONS, source=str(root / "images"), output=str(root / "videos")
                )
            )
            webserver, base = start_webserver(root, home, definitions)
            try:
                pairs = pages(keys, args.videos)
                measured = measure(base, pairs, args.repeats, args.timeout)
            finally:
                stop_processes([webserver])
        text = report(args, pairs, measured, timings, rows, load.summary())
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
