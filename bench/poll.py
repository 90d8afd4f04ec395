"""Status polling throughput: a sequential loop with the sync client against the async client's
``status_many`` under bounded concurrency, measured in the same run.

An emulator in its own process is started paused, so every request stays in flight (``in_queue``),
and N requests are submitted to it concurrently with the async client. Then:

- baseline: the sync client polls each request's status once, one after another;
- async: the async client polls all N with ``status_many`` (at most ``--concurrency`` in flight).

Both are timed at a realistic answer latency (``--latency``, 0.1 s by default, the emulator's
``latency_seconds``) and at zero latency. At 0.1 s the sequential loop would need N x 0.1 s, so it is
timed over the first ``--sample`` requests only (requests per second is the figure compared). At zero
latency, client and emulator share this machine's cores, so that row measures CPU rather than design.

    .venv/bin/python bench/poll.py [--requests 2000] [--concurrency 64] [--latency 0.1] [--sample 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from PIL import Image

TOKEN = "bench-token"
TARGET_RATIO = 10.0


def serve_emulator(latency: float, conn: Connection) -> None:
    """Child process: run a paused emulator, send its base URL, stop when the parent says so."""
    from dagster_runway.emulator import Emulator, EmulatorConfig

    config = EmulatorConfig(
        tokens=[TOKEN], paused=True, time_scale=0.0, latency_seconds=latency, random_seed=0
    )
    with Emulator(config) as emulator:
        conn.send(emulator.base_url)
        conn.recv()  # blocks until the parent is done


class EmulatorProcess:
    """The emulator in a process of its own, so that it does not share the client's interpreter lock."""

    def __init__(self, latency: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve_emulator, args=(latency, child), daemon=True)

    def __enter__(self) -> str:
        self._process.start()
        if not self._conn.poll(60):
            raise RuntimeError("the emulator did not start within 60 s")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()


def tiny_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 18), (30, 120, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Row:
    latency: float
    submitted: int
    submit_rps: float
    sequential_n: int
    sequential_rps: float
    async_n: int
    async_rps: float

    @property
    def ratio(self) -> float:
        return self.async_rps / self.sequential_rps


async def submit_all(base_url: str, count: int, concurrency: int) -> tuple[list[str], float]:
    from dagster_runway import AsyncRunComfyClient

    image = tiny_image()
    async with AsyncRunComfyClient(TOKEN, base_url=base_url, max_concurrency=concurrency) as client:
        started = time.perf_counter()
        submissions = await asyncio.gather(
            *(
                client.submit({"promptImage": image, "promptText": f"bench {n}", "seed": n})
                for n in range(count)
            )
        )
        elapsed = time.perf_counter() - started
    return [submission.request_id for submission in submissions], elapsed


def poll_sequentially(base_url: str, ids: list[str]) -> float:
    """Seconds for the sync client to poll each id once, one after another."""
    from dagster_runway import RunComfyClient

    with RunComfyClient(TOKEN, base_url=base_url) as client:
        client.status(ids[0])  # open the connection outside the timing
        started = time.perf_counter()
        for request_id in ids:
            status = client.status(request_id)
            assert status.status.value == "in_queue", status
        return time.perf_counter() - started


async def poll_concurrently(base_url: str, ids: list[str], concurrency: int) -> float:
    """Seconds for the async client to poll every id once with ``status_many``."""
    from dagster_runway import AsyncRunComfyClient, RequestStatus

    async with AsyncRunComfyClient(TOKEN, base_url=base_url, max_concurrency=concurrency) as client:
        await client.status_many(ids[:concurrency])  # open the connection pool outside the timing
        started = time.perf_counter()
        answers = await client.status_many(ids)
        elapsed = time.perf_counter() - started
    failed = [answer for answer in answers.values() if not isinstance(answer, RequestStatus)]
    assert len(answers) == len(ids) and not failed, f"{len(failed)} polls failed, e.g. {failed[:1]}"
    assert all(answer.status.value == "in_queue" for answer in answers.values())  # type: ignore[union-attr]
    return elapsed


def measure(latency: float, requests: int, concurrency: int, sample: int | None) -> Row:
    with EmulatorProcess(latency) as base_url:
        ids, submit_s = asyncio.run(submit_all(base_url, requests, concurrency))
        sequential_ids = ids[:sample] if sample else ids
        sequential_s = poll_sequentially(base_url, sequential_ids)
        async_s = asyncio.run(poll_concurrently(base_url, ids, concurrency))
    return Row(
        latency=latency,
        submitted=len(ids),
        submit_rps=len(ids) / submit_s,
        sequential_n=len(sequential_ids),
        sequential_rps=len(sequential_ids) / sequential_s,
        async_n=len(ids),
        async_rps=len(ids) / async_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=2000, help="Requests in flight (default: %(default)s)."
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="The async client's max_concurrency (default: %(default)s).",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.1,
        help="Emulator answer latency in seconds (default: %(default)s).",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=200,
        help="Requests the sequential loop polls when latency > 0; at zero latency it polls all "
        "(default: %(default)s).",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.sample < 1:
        parser.error("--requests, --concurrency and --sample must be at least 1")

    command = " ".join(
        [".venv/bin/python bench/poll.py", f"--requests {args.requests}", f"--concurrency {args.concurrency}"]
        + [f"--latency {args.latency:g}", f"--sample {args.sample}"]
    )
    print(f"$ {command}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; emulator in its own process, paused\n")

    rows = []
    for latency in dict.fromkeys([args.latency, 0.0]):
        sample = min(args.sample, args.requests) if latency > 0 else None
        rows.append(measure(latency, args.requests, args.concurrency, sample))

    columns = [
        ("latency", 8),
        ("in flight", 9),
        ("seq. polled", 11),
        ("seq. req/s", 10),
        ("async polled", 12),
        ("async req/s", 11),
        ("async/seq.", 10),
        ("submit req/s", 12),
    ]
    print(" | ".join(f"{name:>{width}}" for name, width in columns))
    print("-+-".join("-" * width for _, width in columns))
    for row in rows:
        cells = [
            f"{row.latency:g} s",
            str(row.submitted),
            str(row.sequential_n),
            f"{row.sequential_rps:.1f}",
            str(row.async_n),
            f"{row.async_rps:.0f}",
            f"{row.ratio:.1f}x",
            f"{row.submit_rps:.0f}",
        ]
        print(" | ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True)))
    print()
    print(
        "seq.: the sync client polls each request once, one call after another (at latency > 0 only the "
        f"first {args.sample}).\nasync: status_many over all {args.requests} with max_concurrency "
        f"{args.concurrency}. Requests per second are compared.\nAt zero latency the client and the emulator "
        f"share {os.cpu_count()} cores, so that row measures CPU, not the design."
    )
    realistic = rows[0]
    if realistic.latency > 0:
        verdict = "met" if realistic.ratio >= TARGET_RATIO else "NOT met"
        print(
            f"Target: async >= {TARGET_RATIO:g}x sequential at {realistic.latency:g} s latency: {verdict} "
            f"({realistic.ratio:.1f}x)."
        )
        return 0 if realistic.ratio >= TARGET_RATIO else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
