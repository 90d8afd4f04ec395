"""What the submission journal costs per submit, next to what a submit itself costs, in the same run.

For each of N submits the journal makes an exclusive claim, reserves the estimate in the spend log
(with a spend cap, so that the cap check runs too), and writes the request id into the claim. That
is timed on local disk and on moto's S3 server (on loopback, so this is the floor of a real bucket's
cost: add the bucket's round trip, typically 10-30 ms per write, three writes per submit).

The baseline is a submit to an emulator in its own process, answering after a realistic internet
round trip (``--latency``, 0.1 s), then at zero latency (where client and emulator share the cores).
The figure that matters is the ratio: journal time per submit over submit time per submit.

    .venv/bin/python bench/journal.py [--submits 200]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from poll import TOKEN, EmulatorProcess, tiny_image  # noqa: E402


def journal_cost(url: str, options: dict[str, Any], submits: int) -> list[float]:
    from dagster_runway.journal import Journal, Owner, SpendCap

    journal = Journal(url, options)
    owner = Owner.current("bench")
    cap = SpendCap(max_usd=1e9, window_s=24 * 3600)
    times = []
    for i in range(submits):
        fingerprint = uuid.uuid4().hex + uuid.uuid4().hex
        started = time.perf_counter()
        claim = journal.claim(
            fingerprint, 1, partition=f"p{i}", owner=owner, estimate_usd=0.25, input={"duration": 5}, cap=cap
        )
        journal.record_submitted(claim, f"req-{i}")
        times.append(time.perf_counter() - started)
    return times


def submit_cost(base_url: str, submits: int) -> list[float]:
    from dagster_runway import RunComfyClient

    body = {"promptImage": tiny_image(), "duration": 5, "seed": 1}
    times = []
    with RunComfyClient(api_token=TOKEN, base_url=base_url) as client:
        for _ in range(submits):
            started = time.perf_counter()
            client.submit(body)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("journal, local disk", journal_cost(f"{tmp}/journal", {}, args.submits)))
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "endpoint_url": f"http://{host}:{port}",
            "key": "k",
            "secret": "s",
            "skip_instance_cache": True,
        }
        import s3fs

        s3fs.S3FileSystem(**options).mkdir("bench-journal")
        rows.append(
            ("journal, moto S3 (loopback)", journal_cost("s3://bench-journal/j", options, args.submits))
        )
    finally:
        server.stop()
    for latency in (args.latency, 0.0):
        with EmulatorProcess(latency) as base_url:
            rows.append((f"submit, emulator at {latency:g} s latency", submit_cost(base_url, args.submits)))

    print(f"\ncommand: python bench/journal.py --submits {args.submits} --latency {args.latency}")
    print(f"{'what':>38}  {'median_ms':>10}  {'p95_ms':>8}")
    for label, times in rows:
        ordered = sorted(times)
        print(
            f"{label:>38}  {statistics.median(times) * 1000:>10.2f}  {ordered[int(len(ordered) * 0.95)] * 1000:>8.2f}"
        )
    submit = statistics.median(rows[2][1])
    for label, times in rows[:2]:
        print(f"{label}: {statistics.median(times) / submit:.3f}x a submit at {args.latency:g} s latency")


if __name__ == "__main__":
    main()
