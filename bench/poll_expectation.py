"""Polling by expectation (issue 18, S5): status polls per video and the delay from a render's end to
its collect run's request, against today's policy (every request in flight polled each tick,
round-robin inside the tick's budget) measured in the same run.

Setup per policy (not timed): an emulator process (``dagster-runway emulator``) with the default
queue and render times (queue 0-5 s, render 30-90 s for a 5 s video) scaled by ``--time-scale``,
``--max-concurrency`` renders at once, paused at once; ``--requests`` requests submitted to it; an
SQLite instance with a partition, an image record and a request record per request
(``status_tick.populate``).

Then the status sensor (``StatusTick``) ticks with an injected clock: the emulator runs for one
status interval of service time (``status_interval_s`` x ``--time-scale`` real seconds) and is paused
again; the tick runs while the emulator's clock stands still, at the service time the emulator
reached. Until every render has ended and been noticed. Collect runs are requested, not run.

Per video: status polls over its life (``poll_statuses`` wrapped); notice delay in ticks = ticks from the
first one at or after its render's end (the emulator's ``finished_at``) to the one requesting its
collect, counting both (1 = the first tick after it ended). Per tick: wall seconds and polls.

    .venv/bin/python bench/poll_expectation.py [--requests 1000] [--max-concurrency 100]
        [--time-scale 0.02] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import EmulatorServer, command_line, stats  # noqa: E402
from status_tick import TOKEN, dagster_home, populate, submit_all  # noqa: E402

SENSOR = "runway_status_sensor"


def poll_everything(self: Any, order: list[str], budget_s: float) -> int:
    """Today's policy (the baseline): every request in flight each tick, round-robin from where the
    last tick stopped, a slice at a time, inside the budget."""
    from dagster_runway.pipeline import reconcile as rc
    from dagster_runway.pipeline import status

    states, policy, now = self.memory.partitions, self.policy, self.clock()
    keys = [
        k
        for k in order
        if rc.stage(states[k], policy, now) in ("in_flight", "overdue")
        or rc.late_poll(states[k], policy, now)
    ]
    if not keys or budget_s <= 0:
        return 0
    start = poll_everything.offset % len(keys)  # type: ignore[attr-defined]
    keys = keys[start:] + keys[:start]
    end = time.monotonic() + max(1.0, budget_s)
    polled = 0
    for first in range(0, len(keys), status.POLL_SLICE):
        left = end - time.monotonic()
        if left <= 0:
            break
        by_id = {rid: k for k in keys[first : first + status.POLL_SLICE] if (rid := states[k].request_id)}
        for request_id, answer in status.poll_statuses(self.resource, list(by_id), left).items():
            polled += self._apply(by_id[request_id], request_id, answer)
    poll_everything.offset = start + polled  # type: ignore[attr-defined]
    return polled


@dataclass
class Outcome:
    policy: str
    ticks: int = 0
    tick_wall: list[float] = field(default_factory=list)
    tick_polls: list[int] = field(default_factory=list)
    polls: dict[str, int] = field(default_factory=dict)  # per video
    delays: dict[str, int] = field(default_factory=dict)  # per video, in ticks
    unnoticed: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # polls by the status they found
    learnt: str = ""
    service_s: float = 0.0


def measure(args: argparse.Namespace, policy: str, root: Path) -> Outcome:
    from dagster import DagsterInstance, build_sensor_context

    from dagster_runway import RunComfyResource
    from dagster_runway.pipeline import build_runway_pipeline, status
    from dagster_runway.pipeline import reconcile as rc
    from dagster_runway.pipeline.config import RunwayPipelineConfig
    from dagster_runway.pipeline.sensors import load_memory, memory_key

    settings = ["--time-scale", f"{args.time_scale:g}", "--max-concurrency", str(args.max_concurrency)]
    settings += ["--seed", "0", "--video-scale", "0.05", "--fps", "1"]
    outcome = Outcome(policy)
    with EmulatorServer(root / "emulator", TOKEN, settings) as emulator, dagster_home(root, "sqlite") as home:
        emulator.admin("POST", "pause")
        log(f"{policy}: submitting {args.requests} requests to the paused emulator ...")
        ids = asyncio.run(submit_all(emulator.base_url, args.requests, 64))
        (root / "images").mkdir()
        options = {"status_interval_s": args.status_interval, "missing_prompt": "service_default"}
        resource = RunComfyResource(api_token=TOKEN, base_url=emulator.base_url)
        defs = build_runway_pipeline(str(root / "images"), str(root / "videos"), resource=resource, **options)
        pipeline = RunwayPipelineConfig(source=str(root / "images"), output=str(root / "videos"), **options)
        interval = float(args.status_interval)
        clock = [time.time()]  # service seconds; the requests were all created at this time
        polls: Counter[str] = Counter()
        original_poll, original_method = status.poll_statuses, status.StatusTick.poll

        def counted(resource: Any, batch: list[str], budget: float) -> Any:
            polls.update(batch)
            return original_poll(resource, batch, budget)

        original_observe = rc.observe

        def observed(state: Any, learnt: Any, found: str, *rest: Any, **kwargs: Any) -> None:
            outcome.answers[found] += 1
            original_observe(state, learnt, found, *rest, **kwargs)

        status.poll_statuses, rc.observe = counted, observed
        if policy == "baseline":
            poll_everything.offset = 0  # type: ignore[attr-defined]
            status.StatusTick.poll = poll_everything  # type: ignore[method-assign]
        noticed: dict[str, int] = {}
        tick_times: list[float] = []
        try:
            with DagsterInstance.from_config(str(home)) as instance:
                keys, _ = populate(instance, pipeline, ids, 1, "batch", submitted_at=clock[0])
                by_key = dict(zip(keys, ids, strict=True))
                log(f"  recorded; ticking every {interval:g} s of service time ...")
                while len(noticed) < len(keys) and outcome.ticks < args.max_ticks:
                    clock[0] += run_for(emulator, interval * args.time_scale) / args.time_scale
                    tick_times.append(clock[0])
                    before = sum(polls.values())
                    started = time.perf_counter()
                    with build_sensor_context(
                        instance=instance, resources=defs.resources, definitions=defs, sensor_name=SENSOR
                    ) as context:
                        result = status.StatusTick(
                            pipeline,
                            context,
                            getattr(context.resources, pipeline.resource_key),
                            sensor_name=SENSOR,
                            submit_job="runway_submit_job",
                            collect_job="runway_collect_job",
                            submit_op="requests",
                            collect_op="videos",
                            clock=lambda: clock[0],
                        ).run()
                    outcome.tick_wall.append(time.perf_counter() - started)
                    outcome.ticks += 1
                    outcome.tick_polls.append(sum(polls.values()) - before)
                    for request in result.run_requests or []:
                        if request.job_name == "runway_collect_job":
                            for key in rc.request_partitions(request, keys):
                                noticed.setdefault(key, outcome.ticks)
                    if outcome.ticks % 10 == 0:
                        log(
                            f"  tick {outcome.ticks}: {outcome.tick_wall[-1]:.2f}s, polled {outcome.tick_polls[-1]}, "
                            f"{len(noticed)} noticed"
                        )
                memory = rc.SensorMemory.from_json(load_memory(instance, memory_key(pipeline, SENSOR)) or {})
                rate, known = memory.learnt.drain_rate(), memory.learnt.render_range()
                outcome.learnt = f"learnt: render p10-p90 {known}, queue drain {rate} positions/s"
        finally:
            status.poll_statuses, status.StatusTick.poll = original_poll, original_method  # type: ignore[method-assign]
            rc.observe = original_observe
        outcome.service_s = clock[0] - tick_times[0] + interval if tick_times else 0.0
        ends = finish_times(
            emulator, ids, tick_times[0] - interval if tick_times else clock[0], args.time_scale
        )
    for key, request_id in by_key.items():
        outcome.polls[key] = polls[request_id]
        if key not in noticed or request_id not in ends:
            outcome.unnoticed += 1
            continue
        first = next((n for n, at in enumerate(tick_times, 1) if at >= ends[request_id]), noticed[key])
        outcome.delays[key] = noticed[key] - first + 1
    return outcome


def run_for(emulator: EmulatorServer, seconds: float) -> float:
    """Let the emulator's clock run for about ``seconds``; how long it ran, each end of it taken half
    way through its admin call (when the emulator is likely to have handled it)."""
    sent = time.perf_counter()
    emulator.admin("POST", "resume")
    resumed = (sent + time.perf_counter()) / 2
    time.sleep(max(0.0, seconds - (time.perf_counter() - resumed)))
    sent = time.perf_counter()
    emulator.admin("POST", "pause")
    return (sent + time.perf_counter()) / 2 - resumed


def finish_times(
    emulator: EmulatorServer, ids: list[str], created: float, time_scale: float
) -> dict[str, float]:
    """Each request's render end on the sensor's service clock (from the result's ``finished_at``)."""
    import httpx

    ends = {}
    with httpx.Client(base_url=emulator.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for request_id in ids:
            body = client.get(f"/v1/requests/{request_id}/result").json()
            if "finished_at" in body:
                span = _seconds(body["finished_at"]) - _seconds(body["created_at"])
                ends[request_id] = created + span / time_scale
    return ends


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    lines = [
        command_line(),
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"{args.requests} requests, emulator max_concurrency {args.max_concurrency}, render 30-90 s and queue "
        f"0-5 s (emulator defaults) at time scale {args.time_scale:g}; a tick every {args.status_interval} s of "
        "service time; SQLite instance",
        "",
        "policy | ticks | service s | polls/video mean | p95 | max | notice delay ticks p50 | p95 | max | "
        "unnoticed | wall/tick mean s | p95 s | polls/tick mean | polls/video finding queued, running, ended",
    ]
    for o in outcomes:
        p, d, w = stats(list(o.polls.values())), stats(list(o.delays.values())), stats(o.tick_wall)
        lines.append(
            f"{o.policy} | {o.ticks} | {o.service_s:.0f} | {p['mean']:.2f} | {p['p95']:.0f} | {p['max']:.0f} | "
            f"{d['p50']:.0f} | {d['p95']:.0f} | {d['max']:.0f} | {o.unnoticed} | {w['mean']:.2f} | {w['p95']:.2f} | "
            f"{sum(o.tick_polls) / max(1, o.ticks):.0f} | "
            + ", ".join(
                f"{o.answers[s] / max(1, len(o.polls)):.2f}" for s in ("in_queue", "in_progress", "completed")
            )
        )
    lines += [f"{o.policy}: {o.learnt}" for o in outcomes]
    if len(outcomes) == 2:
        base, new = outcomes
        ratio = sum(new.polls.values()) / max(1, sum(base.polls.values()))
        wall = sum(new.tick_wall) / max(1, new.ticks) / max(1e-9, sum(base.tick_wall) / max(1, base.ticks))
        lines.append(f"expectation vs baseline: polls {ratio:.2f}x, wall per tick {wall:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=1000, help="Requests in flight (default: %(default)s)."
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=100,
        help="Renders at once on the emulator (default: %(default)s).",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.02,
        help="The emulator's factor on its times, above 0 (default: %(default)s).",
    )
    parser.add_argument(
        "--status-interval",
        type=int,
        default=15,
        help="Service seconds between ticks (default: %(default)s).",
    )
    parser.add_argument(
        "--max-ticks", type=int, default=400, help="Most ticks per policy (default: %(default)s)."
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    import logging

    logging.getLogger("dagster").setLevel(logging.WARNING)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="runway-poll-expectation-") as tmp:
        for policy in ("baseline", "expectation"):
            outcomes.append(measure(args, policy, Path(tmp) / policy))
    text = table(outcomes, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
