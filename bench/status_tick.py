"""The status sensor at scale: one tick over 10,000 requests in flight, against the floor of polling them.

Setup (not timed): an emulator process (``dagster-runway emulator``) at ``--latency``, paused at once so
that every request stays in flight; ``--requests`` requests submitted to it with the async client at
``--submit-concurrency``; an instance (PostgreSQL on a throwaway cluster by default, or SQLite) with a
dynamic partition per request, the image's runless materialization (with its data version, as the
discovery sensor records it) and a ``runway/requests`` materialization carrying the request id, the
fingerprint, the attempt and the source version, with the metadata a submit run records.

Then the status sensor (``build_runway_pipeline(...)``'s ``runway_status_sensor``, evaluated with
``build_sensor_context``) ticks until two ticks in a row have polled (the first rebuilds its memory from
the event log, the next are steady state). A tick writes the status changes it sees itself, a poll
slice at a time, inside its budget. Each tick's phases are timed by wrapping ``StatusTick``'s methods:
memory read, the runs in progress (read first), event-log ingest, listing partitions, polls (the HTTP
part, recording the changes, and the rest), owed computation and the memory write.

Baseline, in the same run: the async client's ``status_many`` over the same ids at the resource's
``max_concurrency`` (``--concurrency``): the floor a tick's polls cannot beat.

Each latency in ``--latencies`` (0.1 s and 0 by default) gets its own emulator and instance.

    .venv/bin/python bench/status_tick.py [--requests 10000] [--latencies 0.1,0] [--concurrency 8]
        [--storage postgres|sqlite] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import hashlib
import io
import json
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import EmulatorServer, LoadSampler, command_line, postgres_cluster  # noqa: E402

TOKEN = "status-tick-token"
SENSOR = "runway_status_sensor"
PHASES = (
    "memory read",
    "ingest",
    "list partitions",
    "poll: HTTP",
    "poll: other",
    "record changes",
    "runs in progress",
    "owed",
    "memory write",
)


def tiny_image() -> str:
    import base64

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 36), (30, 120, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def submit_all(base_url: str, count: int, concurrency: int) -> list[str]:
    from dagster_runway import AsyncRunComfyClient

    image = tiny_image()
    async with AsyncRunComfyClient(TOKEN, base_url=base_url, max_concurrency=concurrency) as client:
        submissions = await asyncio.gather(
            *(
                client.submit({"promptImage": image, "ratio": "1280:720", "duration": 5, "seed": n})
                for n in range(count)
            )
        )
    return [submission.request_id for submission in submissions]


async def poll_all(base_url: str, ids: list[str], concurrency: int) -> tuple[float, int]:
    """The floor: ``status_many`` over every id once; seconds and the number answered in flight."""
    from dagster_runway import AsyncRunComfyClient, RequestStatus

    async with AsyncRunComfyClient(TOKEN, base_url=base_url, max_concurrency=concurrency) as client:
        await client.status_many(ids[:concurrency])  # open the connections outside the timing
        started = time.perf_counter()
        answers = await client.status_many(ids)
        elapsed = time.perf_counter() - started
    in_flight = sum(
        1
        for a in answers.values()
        if isinstance(a, RequestStatus) and a.status.value in ("in_queue", "in_progress")
    )
    return elapsed, in_flight


# -- the instance ----------------------------------------------------------------------------------


@contextlib.contextmanager
def dagster_home(root: Path, storage: str) -> Iterator[Path]:
    """A DAGSTER_HOME on a fresh PostgreSQL cluster, or on SQLite."""
    import yaml

    home = root / "dagster_home"
    home.mkdir(parents=True)
    config: dict[str, Any] = {"telemetry": {"enabled": False}}
    if storage == "sqlite":
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        yield home
        return
    with postgres_cluster() as cluster:
        database = cluster.create_database()
        config["storage"] = database.dagster_storage()
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        yield home


def populate(
    instance: Any, pipeline: Any, ids: list[str], workers: int, mode: str, submitted_at: float | None = None
) -> tuple[list[str], float]:
    """A partition per request, its image record and its request record (submitted at ``submitted_at``,
    now by default); returns the keys and seconds.

    ``mode="report"`` writes each record with ``report_runless_asset_event``, from ``workers`` threads
    (setup only: one at a time, PostgreSQL takes 15-30 ms for each on a busy 2-core machine).
    ``mode="batch"`` writes the same entries (as ``report_runless_asset_event`` builds them) with the
    event log's ``store_event_batch``, 500 at a time: the same rows in ``event_logs``, which is all the
    status sensor reads, in a fraction of the time (the asset table's latest-event row is updated once
    per batch rather than per event)."""
    from concurrent.futures import ThreadPoolExecutor

    from dagster import AssetMaterialization, MetadataValue

    from dagster_runway import _compat
    from dagster_runway.pipeline import metadata as md
    from dagster_runway.pipeline import records as rec
    from dagster_runway.schema import MODEL_ID

    started = time.perf_counter()
    keys = [f"image{n:05d}.png" for n in range(len(ids))]
    instance.add_dynamic_partitions(pipeline.partitions_def.name, keys)

    batches: dict[str, list[Any]] = defaultdict(list)

    def write(event: AssetMaterialization) -> None:
        if mode == "report":
            instance.report_runless_asset_event(event)
        else:
            batches[event.asset_key.to_user_string()].append(event)

    def record(n: int) -> None:
        key, request_id = keys[n], ids[n]
        version = rec.image_version(f"mtime-{n}", "", "")
        source = f"{pipeline.source}/{key}"
        image_meta = md.RunwayMetadata(
            source_path=MetadataValue.path(source),
            source_size_bytes=1200 + n % 500,
            source_change_token=f"mtime-{n}",
            source_version=version,
        )
        write(
            AssetMaterialization(
                pipeline.images_key,
                partition=key,
                metadata={**image_meta},
                tags={_compat.DATA_VERSION_TAG: version},
            )
        )
        fingerprint = hashlib.sha256(f"bench|{n}".encode()).hexdigest()
        fields = {"ratio": "1280:720", "duration": 5, "seed": n}
        request_meta = md.RunwayMetadata(
            state=md.SUBMITTED,
            request_id=request_id,
            fingerprint=fingerprint,
            attempt=1,
            model=MODEL_ID,
            input=MetadataValue.json(fields),
            prompt_text="(service default)",
            prompt_source="service_default",
            ratio="1280:720",
            duration_s=5,
            seed=str(n),
            settings_from="defaults",
            submitted_at=MetadataValue.timestamp(submitted_at or time.time()),
            estimated_cost_usd=0.25,
            journal_entry=f"{pipeline.output}/.runway/claims/{fingerprint[:2]}/{fingerprint}/1.json",
            source_path=MetadataValue.path(source),
            source_sha256=hashlib.sha256(key.encode()).hexdigest(),
            source_change_token=f"mtime-{n}",
            source_version=version,
            source_size_bytes=1200 + n % 500,
            source_pixels="64x36 PNG",
            package_version="bench",
        )
        write(
            AssetMaterialization(
                pipeline.requests_key,
                partition=key,
                description=f"Submitted request {request_id}.",
                metadata={**request_meta},
                tags=rec.provenance_tags({pipeline.images_key: (version, None)}, fingerprint[:16]),
            )
        )

    if mode == "report":
        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(record, range(len(ids))))
    else:
        for n in range(len(ids)):
            record(n)
        for events in batches.values():
            for start in range(0, len(events), 500):
                instance.event_log_storage.store_event_batch(
                    [runless_entry(e) for e in events[start : start + 500]]
                )
    return keys, time.perf_counter() - started


def runless_entry(event: Any) -> Any:
    """The event log entry ``report_runless_asset_event`` makes of a materialization."""
    import logging

    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.events.log import EventLogEntry
    from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

    return EventLogEntry(
        user_message="",
        level=logging.INFO,
        job_name=RUNLESS_JOB_NAME,
        run_id=RUNLESS_RUN_ID,
        error_info=None,
        timestamp=time.time(),
        step_key=None,
        dagster_event=DagsterEvent(
            event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
            event_specific_data=StepMaterializationData(event),
            job_name=RUNLESS_JOB_NAME,
        ),
    )


# -- timing a tick ---------------------------------------------------------------------------------


@dataclass
class Tick:
    number: int
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cursor: dict[str, Any] = field(default_factory=dict)
    events: int = 0
    run_requests: int = 0
    memory_json_bytes: int = 0


@contextlib.contextmanager
def timed_phases(tick: Tick) -> Iterator[None]:
    """Wrap the status sensor's parts so that each call adds its time to ``tick.phases``."""
    from dagster import DagsterInstance

    from dagster_runway.pipeline import status as sensors

    patches: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                tick.phases[phase] += time.perf_counter() - started
                tick.calls[phase] += 1

        patches.append((owner, name, original))
        setattr(owner, name, timed)

    wrap(sensors, "load_memory", "memory read")
    wrap(sensors, "save_memory", "memory write")
    wrap(sensors.StatusTick, "ingest", "ingest")
    wrap(sensors.StatusTick, "poll", "poll")
    wrap(sensors, "poll_statuses", "poll: HTTP")
    wrap(sensors.StatusTick, "record", "record changes")
    wrap(sensors.StatusTick, "owed", "owed")
    wrap(DagsterInstance, "get_dynamic_partitions", "list partitions")
    wrap(sensors.StatusTick, "runs_in_progress", "runs in progress")
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
        polling = tick.phases.pop("poll", 0.0)
        tick.phases["poll: other"] = polling - tick.phases["poll: HTTP"] - tick.phases["record changes"]
        tick.events = tick.calls["record changes"]


def run_tick(number: int, defs: Any, instance: Any, memory: Callable[[], dict[str, Any]]) -> Tick:
    """One evaluation of the status sensor (which writes the status changes it sees itself)."""
    from dagster import build_sensor_context

    tick = Tick(number)
    sensor_def = defs.resolve_sensor_def(SENSOR)
    with timed_phases(tick):
        started = time.perf_counter()
        with build_sensor_context(
            instance=instance, resources=defs.resources, definitions=defs, sensor_name=SENSOR
        ) as context:
            result = sensor_def.evaluate_tick(context)
        tick.seconds = time.perf_counter() - started
    tick.cursor = json.loads(result.cursor or "{}")
    tick.run_requests = len(result.run_requests or [])
    after = memory()
    tick.memory_json_bytes = len(json.dumps(after, separators=(",", ":")))
    return tick


def profile_tick(defs: Any, instance: Any, top: int) -> str:
    from dagster import build_sensor_context

    sensor_def = defs.resolve_sensor_def(SENSOR)
    profiler = cProfile.Profile()
    with build_sensor_context(
        instance=instance, resources=defs.resources, definitions=defs, sensor_name=SENSOR
    ) as context:
        profiler.enable()
        result = sensor_def.evaluate_tick(context)
        profiler.disable()
    for event in result.asset_events or []:
        instance.report_runless_asset_event(event)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    out.write("\n--- by own time ---\n")
    stats.sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


# -- one latency -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    latency: float
    requests: int
    submit_s: float
    populate_s: float
    floor_s: float
    floor_in_flight: int
    ticks: list[Tick]
    budget_s: float
    profile: str | None = None
    load: str = ""
    floor_load: str = ""


def measure(args: argparse.Namespace, latency: float, root: Path) -> Outcome:
    from dagster import DagsterInstance

    from dagster_runway import RunComfyResource
    from dagster_runway.pipeline import build_runway_pipeline
    from dagster_runway.pipeline.sensors import load_memory, memory_key

    settings = ["--latency", f"{latency:g}", "--time-scale", "1", "--seed", "0"]
    with (
        EmulatorServer(root / "emulator", TOKEN, settings) as emulator,
        dagster_home(root, args.storage) as home,
    ):
        emulator.admin("POST", "pause")
        log(f"latency {latency:g}s: submitting {args.requests} requests to the paused emulator ...")
        started = time.perf_counter()
        ids = asyncio.run(submit_all(emulator.base_url, args.requests, args.submit_concurrency))
        submit_s = time.perf_counter() - started
        log(f"  {submit_s:.1f}s; baseline status_many at concurrency {args.concurrency} ...")
        with LoadSampler() as floor_load:
            floor_s, floor_in_flight = asyncio.run(poll_all(emulator.base_url, ids, args.concurrency))
        log(
            f"  {floor_s:.1f}s ({floor_load.summary()}); recording {2 * len(ids)} runless materializations ({args.storage}) ..."
        )

        (root / "images").mkdir()
        resource = RunComfyResource(
            api_token=TOKEN, base_url=emulator.base_url, max_concurrency=args.concurrency
        )
        defs = build_runway_pipeline(
            str(root / "images"),
            str(root / "videos"),
            resource=resource,
            missing_prompt="service_default",
            **json.loads(args.options or "{}"),
        )
        from dagster_runway.pipeline.config import RunwayPipelineConfig

        pipeline = RunwayPipelineConfig(
            source=str(root / "images"), output=str(root / "videos"), missing_prompt="service_default"
        )
        with DagsterInstance.from_config(str(home)) as instance:
            _, populate_s = populate(instance, pipeline, ids, args.populate_workers, args.populate)
            log(f"  {populate_s:.1f}s; ticking the status sensor ...")
            key = memory_key(pipeline, SENSOR)
            ticks: list[Tick] = []
            sampler = LoadSampler().__enter__()
            while len(ticks) < args.max_ticks:
                tick = run_tick(len(ticks) + 1, defs, instance, lambda: load_memory(instance, key) or {})
                ticks.append(tick)
                log(
                    f"  tick {tick.number}: {tick.seconds:.1f}s, polled {tick.cursor.get('polled', 0)}, "
                    f"{tick.events} changes recorded ({tick.phases['record changes']:.1f}s)"
                )
                polling = [t for t in ticks if t.cursor.get("polled")]
                if len(polling) >= args.steady_ticks and ticks[-1].cursor.get("polled"):
                    break
            sampler.__exit__()
            profile = profile_tick(defs, instance, args.profile_top) if args.profile else None
            budget = pipeline.sensor_budget_s
    return Outcome(
        latency,
        len(ids),
        submit_s,
        populate_s,
        floor_s,
        floor_in_flight,
        ticks,
        budget,
        profile,
        sampler.summary(),
        floor_load.summary(),
    )


# -- reporting -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(outcome: Outcome, concurrency: int) -> None:
    n = outcome.requests
    floor_rps = n / outcome.floor_s
    print(
        f"\n=== latency {outcome.latency:g} s: {n} requests in flight, client concurrency {concurrency} ==="
    )
    print(
        f"setup: submitted in {outcome.submit_s:.1f}s; {2 * n} runless materializations recorded in "
        f"{outcome.populate_s:.1f}s ({2 * n / outcome.populate_s:.0f}/s)"
    )
    print(
        f"baseline: status_many over all {n} ids: {outcome.floor_s:.2f}s = {floor_rps:.0f} polls/s "
        f"({outcome.floor_in_flight} in flight); {outcome.floor_load}"
    )
    print(f"ticks: {outcome.load}")
    columns = ["tick", "total_s", *PHASES, "polled", "polls/s", "vs floor", "in budget",
               "memory_B", "changes", "runs"]  # fmt: skip
    print(" | ".join(columns))
    for tick in outcome.ticks:
        polled = int(tick.cursor.get("polled", 0))
        http = tick.phases.get("poll: HTTP", 0.0)
        rps = polled / http if http and polled else 0.0
        cells = [
            str(tick.number) + (" (rebuilding)" if tick.cursor.get("rebuilding") else ""),
            f"{tick.seconds:.2f}",
            *(f"{tick.phases.get(p, 0.0):.2f}" for p in PHASES),
            str(polled),
            f"{rps:.0f}" if rps else "-",
            f"{rps / floor_rps:.2f}x" if rps else "-",
            "yes" if tick.seconds <= outcome.budget_s else "NO",
            str(tick.cursor.get("memory_bytes", "?")),
            str(tick.events),
            str(tick.run_requests),
        ]
        print(" | ".join(cells))
    steady = [t for t in outcome.ticks if t.cursor.get("polled")]
    if steady:
        polled_total = sum(int(t.cursor["polled"]) for t in steady)
        tick_s = sum(t.seconds for t in steady)
        print(
            f"polling ticks: {len(steady)}, polled {[int(t.cursor['polled']) for t in steady]} "
            f"(most overdue first; the rest are due at the next tick); a full pass over {n} takes "
            f"{n / (polled_total / len(steady)):.1f} ticks. Tick time per poll {tick_s / polled_total * 1000:.2f} ms "
            f"vs floor {outcome.floor_s / n * 1000:.2f} ms ({(tick_s / polled_total) / (outcome.floor_s / n):.2f}x)."
        )
        last = steady[-1]
        other = last.seconds - last.phases.get("poll: HTTP", 0.0)
        print(
            f"last tick: {last.seconds:.1f}s of its {outcome.budget_s:g}s budget; outside the HTTP polls "
            f"{other:.1f}s ({', '.join(f'{p} {last.phases.get(p, 0.0):.2f}s' for p in PHASES if p != 'poll: HTTP')})"
        )
        print(
            f"memory: {last.cursor.get('memory_bytes', 0)} bytes stored in the key-value store (zlib + base64), "
            f"{last.memory_json_bytes} bytes of JSON ({last.memory_json_bytes / n:.0f} B per partition)"
        )
        print(f"last cursor ({len(json.dumps(last.cursor))} bytes): {json.dumps(last.cursor)}")
    if outcome.profile:
        print("\nprofile of one more steady tick (cProfile):\n" + outcome.profile)


def main(argv: list[str] | None = None) -> int:
    from dagster_runway import RunComfyResource

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=10_000, help="Requests in flight (default: %(default)s)."
    )
    parser.add_argument(
        "--latencies",
        default="0.1,0",
        help="Emulator answer latencies, comma-separated (default: %(default)s).",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=RunComfyResource.model_fields["max_concurrency"].default,
        help="The resource's max_concurrency, so the tick's and the baseline's polls in flight (default: "
        "RunComfyResource's, %(default)s).",
    )
    parser.add_argument(
        "--submit-concurrency",
        type=int,
        default=64,
        help="Concurrency of the setup's submits (default: %(default)s).",
    )
    parser.add_argument(
        "--storage", choices=("postgres", "sqlite"), default="postgres", help="Instance storage."
    )
    parser.add_argument(
        "--populate",
        choices=("report", "batch"),
        default="report",
        help="How the setup records its events: report_runless_asset_event one at a time (default), or the "
        "same entries with store_event_batch (much faster; same event_logs rows).",
    )
    parser.add_argument(
        "--populate-workers",
        type=int,
        default=8,
        help="Threads recording the setup's events (default: %(default)s).",
    )
    parser.add_argument(
        "--options", default=None, help="Pipeline options, a JSON object (e.g. sensor_budget_s)."
    )
    parser.add_argument(
        "--steady-ticks",
        type=int,
        default=2,
        help="Stop after this many ticks that polled (default: %(default)s).",
    )
    parser.add_argument(
        "--max-ticks", type=int, default=6, help="Most ticks per latency (default: %(default)s)."
    )
    parser.add_argument("--profile", action="store_true", help="Profile one more steady tick with cProfile.")
    parser.add_argument(
        "--profile-top", type=int, default=25, help="Lines of the profile (default: %(default)s)."
    )
    args = parser.parse_args(argv)
    latencies = [float(x) for x in args.latencies.split(",") if x.strip()]

    print(command_line())
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"storage {args.storage}, setup events by {args.populate}; emulator in its own process, paused; sensor options "
        f"{args.options or 'defaults'}"
    )
    sys.stdout.flush()
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    import logging

    logging.getLogger("dagster").setLevel(logging.WARNING)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="runway-status-tick-") as tmp:
        for latency in latencies:
            outcome = measure(args, latency, Path(tmp) / f"latency-{latency:g}")
            report(outcome, args.concurrency)
            sys.stdout.flush()
            outcomes.append(outcome)
    print("\n=== summary ===")
    print(
        "latency | requests | floor_s | floor polls/s | tick polled (successive) | tick s | tick polls/s | vs floor | budget"
    )
    for o in outcomes:
        steady = [t for t in o.ticks if t.cursor.get("polled")]
        polled = [int(t.cursor["polled"]) for t in steady]
        rps = [
            p / t.phases["poll: HTTP"]
            for p, t in zip(polled, steady, strict=True)
            if t.phases.get("poll: HTTP")
        ]
        tick_rps = sum(rps) / len(rps) if rps else 0.0
        print(
            f"{o.latency:g} s | {o.requests} | {o.floor_s:.1f} | {o.requests / o.floor_s:.0f} | {polled} | "
            f"{[round(t.seconds, 1) for t in o.ticks]} | {tick_rps:.0f} | "
            f"{tick_rps / (o.requests / o.floor_s):.2f}x | "
            f"{'all inside' if all(t.seconds <= o.budget_s for t in o.ticks) else 'EXCEEDED'} {o.budget_s:g}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
