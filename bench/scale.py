"""N images through the real deployment: dagster-daemon on PostgreSQL, runs as processes, the emulator as a
process, against the same work done by the async client alone, measured in the same run.

For each answer latency (``--latencies``, 0.1 s and 0 by default):

1. Baseline, "emulator alone": a fresh emulator process with the same settings; the async client submits
   all N images (data URIs, the ratio ``auto`` picks, 5 s, one seed each) at ``--concurrency`` calls in
   flight, polls them with ``status_many`` every ``--baseline-poll-s`` and, as each finishes, fetches its
   result and downloads its video to disk. Its wall time is the floor of the work itself.
2. The pipeline: ``tests/fixtures/deployment.py``'s ``Deployment`` (a fresh database on a throwaway
   PostgreSQL cluster, DAGSTER_HOME with Postgres storage, the QueuedRunCoordinator, pools, sensors in
   threads as in the deployment guide, ``dagster-daemon run`` and ``dagster-webserver`` over the repo's
   ``definitions.py``, the emulator process). Both sensors are turned on through GraphQL and the clock
   runs until the N-th ``runway/videos`` partition is materialized.

Printed: overhead per video = (pipeline wall - emulator-alone wall) / N; runs per partition (submit and
collect); queue-to-start latency of runs and where a run's time goes (queued, launched, step start,
step, end); where each partition's time goes (discovered -> request recorded -> service finished ->
video recorded); the status sensor's ticks; event-log rows and bytes of event JSON per image in
Postgres; the status sensor's cursor and key-value memory sizes; billed submissions against N.

    .venv/bin/python bench/scale.py [--images 1000] [--latencies 0.1,0] [--time-scale 0.02]
        [--submit-batch-size 200] [--collect-batch-size 100] [--status-interval 5]
        [--discovery-interval 5] [--max-concurrent-runs 4] [--pool-limit 2]
        [--dequeue-interval S] [--reuse-renders] [--keep]

The resource of ``definitions.py`` keeps ``RunComfyResource``'s default ``max_concurrency``, so the
baseline's ``--concurrency`` defaults to that same value.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    Deployment,
    EmulatorServer,
    LoadSampler,
    command_line,
    fmt_stats,
    make_images,
    postgres_cluster,
    stats,
)

TOKEN = "scale-token"
GOAL_S = 0.1  # the goal: overhead per video at 1,000 images
STATUS_SENSOR = "runway_status_sensor"
DISCOVERY_SENSOR = "runway_discovery_sensor"
VIDEOS = '["runway", "videos"]'
REQUESTS = '["runway", "requests"]'
IMAGES = '["runway", "images"]'


def emulator_args(args: argparse.Namespace, latency: float) -> list[str]:
    """The emulator's settings beyond port, token, time scale and seed (which Deployment sets itself)."""
    reuse = ["--reuse-renders"] if args.reuse_renders else []
    return ["--latency", f"{latency:g}", "--max-concurrency", str(args.emulator_max_concurrency), *reuse]


# -- the baseline: the async client alone ------------------------------------------------------------


@dataclass
class Baseline:
    wall_s: float
    submitted: int
    videos: int
    failed: int
    billed: int
    submit_s: float  # until the last submit answered
    load: str = ""


def run_baseline(args: argparse.Namespace, latency: float, images: list[Path], root: Path) -> Baseline:
    """Submit, wait for and download every image with the async client on a fresh emulator process."""
    from PIL import Image

    from dagster_runway.media.settings import resolve_auto_ratio

    inputs = []
    for seed, path in enumerate(images):
        with Image.open(path) as image:
            width, height = image.size
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        inputs.append(
            {"promptImage": uri, "ratio": resolve_auto_ratio(width, height), "duration": 5, "seed": seed}
        )
    out = root / "videos"
    out.mkdir(parents=True, exist_ok=True)
    settings = ["--time-scale", f"{args.time_scale:g}", "--seed", "0", *emulator_args(args, latency)]
    with EmulatorServer(root, TOKEN, settings, name="baseline-emulator") as emulator:
        with LoadSampler(0.5) as load:
            wall, submit_s, videos, failed = asyncio.run(_alone(emulator.base_url, inputs, images, out, args))
        billed = emulator.ledger().billed_submissions
    return Baseline(wall, len(inputs), videos, failed, billed, submit_s, load.summary())


async def _alone(
    base_url: str, inputs: list[dict[str, Any]], images: list[Path], out: Path, args: argparse.Namespace
) -> tuple[float, float, int, int]:
    import httpx

    from dagster_runway import AsyncRunComfyClient, RequestStatus

    concurrency = args.concurrency
    pending: dict[str, Path] = {}
    collecting: list[asyncio.Task[None]] = []
    downloads = asyncio.Semaphore(concurrency)
    counts = Counter[str]()
    submitted = asyncio.Event()
    last_submit = 0.0

    async with (
        AsyncRunComfyClient(TOKEN, base_url=base_url, max_concurrency=concurrency) as client,
        httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http,
    ):

        async def submit(body: dict[str, Any], path: Path) -> None:
            nonlocal last_submit
            submission = await client.submit(body)
            pending[submission.request_id] = path
            last_submit = time.perf_counter()

        async def collect(request_id: str, path: Path) -> None:
            async with downloads:
                result = await client.result(request_id)
                if result.video_url is None:
                    counts["failed"] += 1
                    return
                response = await http.get(result.video_url)
                response.raise_for_status()
                (out / f"{path.stem}.mp4").write_bytes(response.content)
                counts["videos"] += 1

        async def submit_all() -> None:
            await asyncio.gather(*(submit(body, path) for body, path in zip(inputs, images, strict=True)))
            submitted.set()

        started = time.perf_counter()
        submitter = asyncio.ensure_future(submit_all())
        while not (submitted.is_set() and not pending):
            await asyncio.sleep(args.baseline_poll_s)
            if not pending:
                continue
            answers = await client.status_many(list(pending))
            for request_id, answer in answers.items():
                if isinstance(answer, RequestStatus) and answer.status.is_terminal:
                    collecting.append(asyncio.ensure_future(collect(request_id, pending.pop(request_id))))
                elif not isinstance(answer, RequestStatus):
                    raise answer
        await submitter
        await asyncio.gather(*collecting)
        wall = time.perf_counter() - started
    return wall, last_submit - started, counts["videos"], counts["failed"]


# -- the pipeline on the real deployment -----------------------------------------------------------


@dataclass
class PipelineResult:
    startup_s: float
    wall_s: float
    all_runs_done_s: float | None
    videos: int
    failed_partitions: list[str]
    billed: int
    submissions: int
    max_per_fingerprint: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    run_phases: dict[str, list[float]] = field(default_factory=dict)
    partition_phases: dict[str, list[float]] = field(default_factory=dict)
    milestones: dict[str, float] = field(default_factory=dict)
    events: list[tuple[str, int, int]] = field(default_factory=list)
    event_rows: int = 0
    event_bytes: int = 0
    event_table_bytes: int = 0
    ticks: dict[str, dict[str, Any]] = field(default_factory=dict)
    cursor: str | None = None
    memory_bytes: int = 0
    memory_json_bytes: int = 0
    discovery_memory_bytes: int = 0
    step_errors: list[str] = field(default_factory=list)
    load: str = ""


def run_pipeline(
    args: argparse.Namespace, latency: float, cluster: Any, source: Path, root: Path, n: int
) -> PipelineResult:
    options = {
        "status_interval_s": args.status_interval,
        "discovery_interval_s": args.discovery_interval,
        "submit_batch_size": args.submit_batch_size,
        "collect_batch_size": args.collect_batch_size,
        **json.loads(args.options or "{}"),
    }
    # As the deployment guide's dagster.yaml: the two sensors tick side by side.
    instance_config: dict[str, Any] = {"sensors": {"use_threads": True, "num_workers": 4}}
    if args.dequeue_interval is not None:
        instance_config["run_coordinator"] = {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": args.dequeue_interval},
        }
    database = cluster.create_database()
    deployment = Deployment(
        root,
        database,
        source=source,
        output=root / "videos",
        time_scale=args.time_scale,
        token=TOKEN,
        emulator_args=emulator_args(args, latency),
        max_concurrent_runs=args.max_concurrent_runs,
        pool_default_limit=args.pool_limit,
        instance_config=instance_config,
        env={"RUNWAY_MISSING_PROMPT": "service_default", "RUNWAY_OPTIONS": json.dumps(options)},
        startup_timeout=300,
    )
    began = time.monotonic()
    try:
        deployment.start()
        startup = time.monotonic() - began
        timings = {k: round(v, 1) for k, v in deployment.timings.items()}
        log(f"  deployment up in {startup:.1f}s {timings}")
        connection = database.connect()
        connection.autocommit = True
        try:
            with LoadSampler() as load:
                t0 = time.time()
                deployment.graphql.start_sensor(DISCOVERY_SENSOR)
                deployment.graphql.start_sensor(STATUS_SENSOR)
                wait_for_videos(deployment, connection, n, t0, args)
            all_done = wait_for_runs(deployment, connection, t0, args)
            result = measure(deployment, connection, n, t0, startup, all_done)
            result.load = load.summary()
        finally:
            connection.close()
        return result
    except Exception:
        log(deployment.log_tails(40))
        raise
    finally:
        try:
            deployment.stop()
        finally:
            cluster.drop_database(database.db_name)


def query(connection: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def progress(connection: Any) -> tuple[dict[str, int], dict[str, int]]:
    assets = dict(
        query(
            connection,
            "SELECT asset_key, count(DISTINCT partition) FROM event_logs "
            "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' GROUP BY asset_key",
        )
    )
    runs = dict(query(connection, "SELECT status, count(*) FROM runs GROUP BY status"))
    return assets, runs


def wait_for_videos(
    deployment: Deployment, connection: Any, n: int, t0: float, args: argparse.Namespace
) -> None:
    timeout = args.timeout or max(600.0, 3.0 * n)
    last_change, last_report, seen = time.time(), 0.0, None
    while True:
        deployment.assert_alive()
        assets, runs = progress(connection)
        now = time.time()
        state = (
            assets.get(IMAGES, 0),
            assets.get(REQUESTS, 0),
            assets.get(VIDEOS, 0),
            tuple(sorted(runs.items())),
        )
        if state != seen:
            seen, last_change = state, now
        if now - last_report >= args.report_every or assets.get(VIDEOS, 0) >= n:
            last_report = now
            log(
                f"  t={now - t0:6.1f}s images {state[0]}/{n} requests {state[1]} videos {state[2]} "
                f"runs {dict(runs)}"
            )
        if assets.get(VIDEOS, 0) >= n:
            return
        if now - t0 > timeout:
            raise TimeoutError(f"{assets.get(VIDEOS, 0)}/{n} videos after {timeout:.0f}s; runs {runs}")
        if now - last_change > args.stall_s:
            raise TimeoutError(f"no progress for {args.stall_s:.0f}s: {state}")
        time.sleep(0.5)


def wait_for_runs(
    deployment: Deployment, connection: Any, t0: float, args: argparse.Namespace
) -> float | None:
    """Seconds from sensors-on until no run is queued or in progress (the checks end with the step)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        deployment.assert_alive()
        busy = query(
            connection,
            "SELECT count(*) FROM runs WHERE status IN ('QUEUED','NOT_STARTED','STARTING','STARTED','CANCELING')",
        )[0][0]
        if not busy:
            ended = query(connection, "SELECT max(end_time) FROM runs")[0][0]
            return float(ended) - t0 if ended else None
        time.sleep(1.0)
    return None


def measure(
    deployment: Deployment, connection: Any, n: int, t0: float, startup: float, all_done: float | None
) -> PipelineResult:
    from dagster import AssetKey, AssetRecordsFilter
    from dagster._core.scheduler.instigation import InstigatorType

    from dagster_runway import _compat
    from dagster_runway.pipeline.config import RunwayPipelineConfig
    from dagster_runway.pipeline.sensors import load_memory, memory_key

    instance = deployment.instance()

    # Per partition: discovered -> request recorded -> service finished -> video recorded.
    def latest(asset: str) -> dict[str, Any]:
        """The first materialization of each partition of ``runway/<asset>``."""
        first: dict[str, Any] = {}
        cursor = None
        while True:
            page = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(["runway", asset])),
                limit=5000,
                cursor=cursor,
                ascending=True,
            )
            for record in page.records:
                first.setdefault(record.partition_key, record)
            if not page.has_more:
                return first
            cursor = page.cursor

    images, requests, videos = latest("images"), latest("requests"), latest("videos")
    phases: dict[str, list[float]] = defaultdict(list)
    for key, video in videos.items():
        meta = video.asset_materialization.metadata
        finished = getattr(meta.get("runway/finished_at"), "value", None)
        submitted = getattr(meta.get("runway/submitted_at"), "value", None)
        if key in images and key in requests:
            phases["discovered -> request recorded"].append(requests[key].timestamp - images[key].timestamp)
        if key in requests and finished is not None:
            phases["request recorded -> service finished"].append(finished - requests[key].timestamp)
            phases["service finished -> video recorded"].append(video.timestamp - finished)
        if submitted is not None and finished is not None:
            phases["service time (submitted -> finished)"].append(finished - submitted)
        if key in images:
            phases["discovered -> video recorded"].append(video.timestamp - images[key].timestamp)
    milestones = {
        "first image recorded": min((r.timestamp for r in images.values()), default=t0) - t0,
        "first request recorded": min((r.timestamp for r in requests.values()), default=t0) - t0,
        "last request recorded": max((r.timestamp for r in requests.values()), default=t0) - t0,
        "first video recorded": min((r.timestamp for r in videos.values()), default=t0) - t0,
        "last video recorded": max((r.timestamp for r in videos.values()), default=t0) - t0,
    }
    wall = milestones["last video recorded"]

    # Runs: their kinds, sizes and where their time goes.
    runs = []
    for record in instance.get_run_records():
        run = record.dagster_run
        runs.append(
            {
                "id": run.run_id,
                "job": run.job_name,
                "status": run.status.value,
                "partitions": int(run.tags.get("runway/partition_count") or 1),
                "created": record.create_timestamp.timestamp(),
                "start": record.start_time,
                "end": record.end_time,
            }
        )
    marks: dict[str, dict[str, float]] = defaultdict(dict)
    for run_id, kind, at in query(
        connection,
        "SELECT run_id, dagster_event_type, extract(epoch from min(timestamp)) FROM event_logs "
        "WHERE run_id <> '' AND dagster_event_type IS NOT NULL GROUP BY run_id, dagster_event_type",
    ):
        marks[run_id][kind] = float(at)
    for run_id, first, last in query(
        connection,
        "SELECT run_id, extract(epoch from min(timestamp)), extract(epoch from max(timestamp)) FROM event_logs "
        "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND run_id <> '' GROUP BY run_id",
    ):
        marks[run_id]["first_materialization"] = float(first)
        marks[run_id]["last_materialization"] = float(last)
    if runs:
        first = marks.get(runs[-1]["id"], {})
        log(
            f"  events of the first run ({runs[-1]['id'][:8]}, {runs[-1]['job']}) after its creation: "
            + ", ".join(
                f"{k} +{v - runs[-1]['created']:.2f}s" for k, v in sorted(first.items(), key=lambda kv: kv[1])
            )
        )
    run_phases: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        m = marks.get(run["id"], {})
        prefix = (
            "submit"
            if run["job"].endswith("submit_job")
            else "collect"
            if run["job"].endswith("collect_job")
            else run["job"]
        )
        if run["start"]:
            run_phases["queue -> start (all runs)"].append(run["start"] - run["created"])
        steps = [
            ("1 created -> launching (queued)", run["created"], m.get("PIPELINE_STARTING")),
            ("2 launching -> run worker started", m.get("PIPELINE_STARTING"), m.get("PIPELINE_START")),
            ("3 run started -> step worker started", m.get("PIPELINE_START"), m.get("STEP_WORKER_STARTED")),
            ("4 step worker started -> step started", m.get("STEP_WORKER_STARTED"), m.get("STEP_START")),
            ("5 step started -> first materialization", m.get("STEP_START"), m.get("first_materialization")),
            ("6 step (start -> end)", m.get("STEP_START"), m.get("STEP_SUCCESS") or m.get("STEP_FAILURE")),
            ("7 step end -> run end", m.get("STEP_SUCCESS") or m.get("STEP_FAILURE"),
             m.get("PIPELINE_SUCCESS") or m.get("PIPELINE_FAILURE")),
        ]  # fmt: skip
        for name, a, b in steps:
            if a is not None and b is not None:
                run_phases[f"{prefix}: {name}"].append(b - a)
        step = (m.get("STEP_SUCCESS") or m.get("STEP_FAILURE") or 0) - (m.get("STEP_START") or 0)
        if step > 0 and run["partitions"]:
            run_phases[f"{prefix}: 8 step seconds per partition"].append(step / run["partitions"])

    # The event log in Postgres.
    events = [
        (kind or "(log message)", int(rows), int(size))
        for kind, rows, size in query(
            connection,
            "SELECT dagster_event_type, count(*), sum(octet_length(event)) FROM event_logs GROUP BY 1 ORDER BY 3 DESC",
        )
    ]
    table_bytes = int(query(connection, "SELECT pg_total_relation_size('event_logs')")[0][0])
    errors = [
        str(row[0])[:300]
        for row in query(
            connection,
            "SELECT event FROM event_logs WHERE dagster_event_type IN ('STEP_FAILURE','PIPELINE_FAILURE') LIMIT 3",
        )
    ]

    # The sensors: ticks, cursor, memory.
    ticks: dict[str, dict[str, Any]] = {}
    cursor = None
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.name not in (STATUS_SENSOR, DISCOVERY_SENSOR):
            continue
        if state.name == STATUS_SENSOR and state.sensor_instigator_data is not None:
            cursor = state.sensor_instigator_data.cursor
        found = list(instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=100_000))
        found.sort(key=lambda tick: tick.timestamp)
        in_window = [tick for tick in found if tick.timestamp <= t0 + wall]
        durations = [tick.end_timestamp - tick.timestamp for tick in found if tick.end_timestamp]
        polled = []
        for tick in found:
            with_polls = json.loads(tick.cursor) if tick.cursor and tick.cursor.startswith("{") else {}
            if isinstance(with_polls, dict) and "polled" in with_polls:
                polled.append(int(with_polls["polled"]))
        ticks[state.name] = {
            "ticks": len(found),
            "ticks_until_last_video": len(in_window),
            "with_runs": sum(1 for tick in in_window if tick.run_ids),
            "runs": sum(len(tick.run_ids) for tick in found),
            "durations": durations,
            "gaps": [b.timestamp - a.timestamp for a, b in zip(found, found[1:], strict=False)],
            "first_tick": found[0].timestamp - t0 if found else None,
            "polled": polled,
            "statuses": Counter(tick.status.value for tick in found),
        }
    pipeline = RunwayPipelineConfig(source=deployment.source, output=deployment.output)
    raw = _compat.kv_get(instance, memory_key(pipeline, STATUS_SENSOR)) or ""
    memory = load_memory(instance, memory_key(pipeline, STATUS_SENSOR)) or {}
    discovery_raw = _compat.kv_get(instance, memory_key(pipeline, DISCOVERY_SENSOR)) or ""

    ledger = deployment.ledger()
    failed = sorted(set(images) - set(videos))
    return PipelineResult(
        startup_s=startup,
        wall_s=wall,
        all_runs_done_s=all_done,
        videos=len(videos),
        failed_partitions=failed,
        billed=ledger.billed_submissions,
        submissions=ledger.submissions,
        max_per_fingerprint=max((t.submissions for t in ledger.by_fingerprint.values()), default=0),
        runs=runs,
        run_phases=dict(run_phases),
        partition_phases=dict(phases),
        milestones=milestones,
        events=events,
        event_rows=sum(rows for _, rows, _ in events),
        event_bytes=sum(size for _, _, size in events),
        event_table_bytes=table_bytes,
        ticks=ticks,
        cursor=cursor,
        memory_bytes=len(raw),
        memory_json_bytes=len(json.dumps(memory, separators=(",", ":"))),
        discovery_memory_bytes=len(discovery_raw),
        step_errors=errors,
    )


# -- reporting -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(latency: float, n: int, base: Baseline, pipe: PipelineResult) -> dict[str, Any]:
    overhead = (pipe.wall_s - base.wall_s) / n
    submit_runs = [r for r in pipe.runs if r["job"].endswith("submit_job")]
    collect_runs = [r for r in pipe.runs if r["job"].endswith("collect_job")]
    other_runs = [r for r in pipe.runs if r not in submit_runs and r not in collect_runs]
    q2s = [r["start"] - r["created"] for r in pipe.runs if r["start"]]
    print(f"\n=== latency {latency:g} s, {n} images ===")
    print(
        f"emulator alone: {base.wall_s:.1f}s wall ({base.videos} videos, {base.failed} failed, last submit answered "
        f"at {base.submit_s:.1f}s, billed {base.billed}); {base.load}"
    )
    print(
        f"pipeline: {pipe.wall_s:.1f}s from sensors on to the last video recorded ({pipe.videos} videos); all runs "
        f"ended at {pipe.all_runs_done_s or float('nan'):.1f}s; deployment start-up {pipe.startup_s:.1f}s (not counted); "
        f"{pipe.load}"
    )
    print(
        f"overhead per video: ({pipe.wall_s:.1f} - {base.wall_s:.1f}) / {n} = {overhead:.3f}s "
        f"(pipeline / emulator alone = {pipe.wall_s / base.wall_s:.2f}x)"
    )
    print(
        f"runs: {len(pipe.runs)} = {len(submit_runs)} submit + {len(collect_runs)} collect"
        + (f" + {len(other_runs)} other" if other_runs else "")
        + f"; runs per partition {len(pipe.runs) / n:.3f} (submit {len(submit_runs) / n:.3f}, "
        f"collect {len(collect_runs) / n:.3f}); statuses {dict(Counter(r['status'] for r in pipe.runs))}"
    )
    print(
        "partitions per run: submit "
        + str(sorted((r["partitions"] for r in submit_runs), reverse=True))
        + ", collect "
        + str(sorted((r["partitions"] for r in collect_runs), reverse=True))
    )
    print(f"queue-to-start latency of runs: {fmt_stats(q2s)}")
    print("where a run's time goes:")
    for name, values in sorted(pipe.run_phases.items()):
        if not name.startswith("queue"):
            print(f"  {name:<52} {fmt_stats(values)}")
    print("where a partition's time goes (from its records' timestamps):")
    for name, values in pipe.partition_phases.items():
        print(f"  {name:<52} {fmt_stats(values)}")
    print("milestones after sensors on: " + ", ".join(f"{k} {v:.1f}s" for k, v in pipe.milestones.items()))
    for name, t in pipe.ticks.items():
        print(
            f"{name}: {t['ticks']} ticks ({t['ticks_until_last_video']} until the last video, {t['with_runs']} of those "
            f"launched runs; {t['runs']} runs in all), first tick at {t['first_tick'] or 0:.1f}s; "
            f"tick duration {fmt_stats(t['durations'])}; between ticks {fmt_stats(t['gaps'])}"
            + (f"; polled per tick {fmt_stats(t['polled'], unit='')}" if t["polled"] else "")
        )
    print(
        f"event log (Postgres): {pipe.event_rows} rows, {pipe.event_bytes / 1e6:.2f} MB of event JSON; per image "
        f"{pipe.event_rows / n:.1f} rows, {pipe.event_bytes / n / 1024:.1f} KB; table with indexes "
        f"{pipe.event_table_bytes / 1e6:.1f} MB"
    )
    print("  by type (rows/image, KB/image): " + ", ".join(
        f"{kind} {rows / n:.2f}/{size / n / 1024:.2f}" for kind, rows, size in pipe.events[:10]
    ))  # fmt: skip
    print(
        f"status sensor cursor: {len(pipe.cursor or '')} bytes: {pipe.cursor}\n"
        f"status sensor memory (key-value store): {pipe.memory_bytes} bytes stored (zlib+base64), "
        f"{pipe.memory_json_bytes} bytes of JSON ({pipe.memory_bytes / n:.1f} B/partition stored); discovery "
        f"memory {pipe.discovery_memory_bytes} bytes"
    )
    verdict = "OK" if pipe.billed == n and pipe.max_per_fingerprint == 1 else "MISMATCH"
    print(
        f"billed submissions {pipe.billed} vs N {n}: {verdict} (accepted {pipe.submissions}, most per input "
        f"{pipe.max_per_fingerprint}); baseline billed {base.billed}"
    )
    if pipe.failed_partitions:
        print(f"partitions without a video: {pipe.failed_partitions[:10]}")
    for error in pipe.step_errors:
        print(f"failure event: {error}")
    return {
        "latency": latency,
        "n": n,
        "alone": base.wall_s,
        "pipeline": pipe.wall_s,
        "overhead": overhead,
        "runs": len(pipe.runs),
        "submit": len(submit_runs),
        "collect": len(collect_runs),
        "q2s": stats(q2s),
        "rows": pipe.event_rows / n,
        "kb": pipe.event_bytes / n / 1024,
        "cursor": len(pipe.cursor or ""),
        "memory": pipe.memory_bytes,
        "billed": pipe.billed,
    }


def main(argv: list[str] | None = None) -> int:
    from dagster_runway import RunComfyResource

    default_concurrency = RunComfyResource.model_fields["max_concurrency"].default
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=int, default=1000, help="Images, so partitions and videos (default: %(default)s)."
    )
    parser.add_argument(
        "--latencies",
        default="0.1,0",
        help="Emulator answer latencies to run, comma-separated; each gets its own baseline and deployment "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.02,
        help="Emulator time scale on its queue 0-5 s and render 30-90 s (default: %(default)s).",
    )
    parser.add_argument(
        "--emulator-max-concurrency",
        type=int,
        default=64,
        help="Requests the emulator renders at once (default: %(default)s).",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=default_concurrency,
        help="The baseline's async client max_concurrency; definitions.py's resource keeps RunComfyResource's "
        "default, %(default)s.",
    )
    parser.add_argument(
        "--baseline-poll-s",
        type=float,
        default=0.5,
        help="The baseline's poll interval (default: %(default)s).",
    )
    parser.add_argument(
        "--submit-batch-size", type=int, default=200, help="Pipeline option (default: %(default)s)."
    )
    parser.add_argument(
        "--collect-batch-size", type=int, default=100, help="Pipeline option (default: %(default)s)."
    )
    parser.add_argument(
        "--status-interval", type=int, default=5, help="status_interval_s (default: %(default)s)."
    )
    parser.add_argument(
        "--discovery-interval", type=int, default=5, help="discovery_interval_s (default: %(default)s)."
    )
    parser.add_argument(
        "--options", default=None, help="More pipeline options, a JSON object merged into RUNWAY_OPTIONS."
    )
    parser.add_argument(
        "--max-concurrent-runs",
        type=int,
        default=4,
        help="QueuedRunCoordinator max_concurrent_runs (default: %(default)s).",
    )
    parser.add_argument(
        "--pool-limit",
        type=int,
        default=2,
        help="Default pool limit, so of the runcomfy_api pool (default: %(default)s).",
    )
    parser.add_argument(
        "--dequeue-interval",
        type=int,
        default=None,
        help="QueuedRunCoordinator dequeue_interval_seconds (default: Dagster's own, 5).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="Seconds to wait for the videos (default: max(600, 3 x N)).",
    )
    parser.add_argument(
        "--stall-s",
        type=float,
        default=300,
        help="Give up after this long without progress (default: %(default)s).",
    )
    parser.add_argument(
        "--report-every",
        type=float,
        default=10,
        help="Progress line interval on stderr (default: %(default)s).",
    )
    parser.add_argument(
        "--keep", action="store_true", help="Keep the temporary folder (logs, DAGSTER_HOME, videos)."
    )
    parser.add_argument(
        "--reuse-renders",
        action="store_true",
        help="The emulator renders one clip per size and serves copies (both runs): at 10,000 images its "
        "rendering, not the pipeline, would hold a core for 20 minutes of each run.",
    )
    args = parser.parse_args(argv)
    latencies = [float(x) for x in args.latencies.split(",") if x.strip()]
    if args.images < 1 or not latencies:
        parser.error("--images must be at least 1 and --latencies must name at least one latency")

    print(command_line())
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"emulator time scale {args.time_scale:g} (queue 0-5 s, render 30-90 s scaled), max concurrency "
        f"{args.emulator_max_concurrency}; client concurrency {args.concurrency}; options submit_batch_size "
        f"{args.submit_batch_size}, collect_batch_size {args.collect_batch_size}, status_interval_s "
        f"{args.status_interval}, discovery_interval_s {args.discovery_interval}"
        + (", emulator reuses renders" if args.reuse_renders else "")
        + (f", {args.options}" if args.options else "")
        + f"; max_concurrent_runs {args.max_concurrent_runs}, pool limit {args.pool_limit}, dequeue interval "
        f"{args.dequeue_interval if args.dequeue_interval is not None else 'default (5 s)'}"
    )
    sys.stdout.flush()
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    tmp = tempfile.mkdtemp(prefix="runway-scale-")
    root = Path(tmp)
    rows = []
    try:
        images = make_images(root / "images", args.images)
        with postgres_cluster() as cluster:
            for latency in latencies:
                log(f"latency {latency:g}s: baseline (emulator alone) ...")
                base = run_baseline(args, latency, images, root / f"alone-{latency:g}")
                log(f"  {base.wall_s:.1f}s; pipeline ...")
                pipe = run_pipeline(
                    args, latency, cluster, root / "images", root / f"pipeline-{latency:g}", args.images
                )
                rows.append(report(latency, args.images, base, pipe))
                sys.stdout.flush()
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)

    print("\n=== summary ===")
    header = ("latency", "N", "alone_s", "pipeline_s", "ratio", "overhead_s/video", "runs/part", "submit",
              "collect", "q->start mean", "q->start p95", "rows/img", "KB/img", "cursor_B", "memory_B", "billed")  # fmt: skip
    print(" | ".join(header))
    for r in rows:
        print(
            " | ".join(
                [
                    f"{r['latency']:g} s",
                    str(r["n"]),
                    f"{r['alone']:.1f}",
                    f"{r['pipeline']:.1f}",
                    f"{r['pipeline'] / r['alone']:.2f}x",
                    f"{r['overhead']:.3f}",
                    f"{r['runs'] / r['n']:.3f}",
                    str(r["submit"]),
                    str(r["collect"]),
                    f"{r['q2s']['mean']:.1f}s",
                    f"{r['q2s']['p95']:.1f}s",
                    f"{r['rows']:.1f}",
                    f"{r['kb']:.1f}",
                    str(r["cursor"]),
                    str(r["memory"]),
                    f"{r['billed']}/{r['n']}",
                ]
            )
        )
    realistic = next((r for r in rows if r["latency"] > 0), None)
    if realistic is not None:
        met = realistic["overhead"] <= GOAL_S
        print(
            f"\ngoal: overhead <= {GOAL_S:g} s per video at 1,000 images ({realistic['latency']:g} s latency): "
            f"{'met' if met else 'NOT met'} at N={realistic['n']} ({realistic['overhead']:.3f} s)"
            + ("" if realistic["n"] >= 1000 else "; N < 1,000, so this is not the goal's figure")
        )
    return 0 if all(r["billed"] == r["n"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
