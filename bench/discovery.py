"""S1: discovery of a large source, a bounded part per tick, against one whole listing in the same run.

For a local folder (hard links of one tiny PNG, ``--folders`` folders) and for the same number of
objects on moto's S3 server (put with a thread pool), each in a process of its own (so its peak RSS is
its own):

- baseline: one ``ImageSource.list()`` of the whole source (what every discovery tick did before);
- incremental: the ticks of one pass (:class:`dagster_runway.media.listing.Listing`, ``discovery_list_per_tick``
  objects a tick, as ``discover()`` reads it): ticks, objects read per tick, wall time per tick
  against the sensor's budget, and the memory discovery keeps (compressed, as saved) at the end;
- with ``--discover``: ``discover()`` itself on a Dagster instance (SQLite in a temporary folder), tick
  after tick until every image is recorded (two events per image: slow at 100,000 on a slow disk).

    .venv/bin/python bench/discovery.py [--images 100000] [--folders 100] [--discover] [--out s1.txt]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line  # noqa: E402

from dagster_runway.media.listing import Listing  # noqa: E402
from dagster_runway.media.sources import ImageSource  # noqa: E402
from dagster_runway.pipeline import records as rec  # noqa: E402
from dagster_runway.pipeline.config import RunwayPipelineConfig  # noqa: E402

LIST_PER_TICK = RunwayPipelineConfig.model_fields["discovery_list_per_tick"].default

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
    b"\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84\x00\x00\x00\x00IEND\xaeB`\x82"
)
BUDGET_S = 40.0  # the sensor's default budget (sensor_budget_s)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(target: Any, *args: Any) -> dict[str, Any]:
    """``target(*args)`` in a forked process, with its peak RSS above what it started with."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        start = _rss_mb()
        result = target(*args)
        result["peak_rss_mb"] = _rss_mb() - start
        child.send(result)

    process = ctx.Process(target=run)
    process.start()
    result = parent.recv()
    process.join()
    return result


def whole_listing(url: str, options: dict[str, Any]) -> dict[str, Any]:
    source = ImageSource(url, storage_options=options)
    started = time.monotonic()
    images = len(source.list())
    return {"ticks": 1, "wall_s": [time.monotonic() - started], "read": [images], "images": images}


def incremental(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """One pass, tick after tick, judged as ``discover()`` does (versions kept, nothing recorded)."""
    source = ImageSource(url, storage_options=options)
    cursor, walls, reads, current = None, [], [], {}
    while True:
        started = time.monotonic()
        listing = Listing(source, cursor, max_read=LIST_PER_TICK, deadline=started + BUDGET_S)
        for unit in listing.units():
            for e in unit.entries:
                current[e.partition_key] = rec.image_version(
                    e.change_token, e.sidecar_token, e.settings_token
                )
            cursor = unit.end
        walls.append(time.monotonic() - started)
        reads.append(listing.read)
        if listing.done:
            break
    memory = {"cursor": None, "passes": 1, "current": {}, "previous": current, "matched": [], "unmatched": []}
    saved = base64.b64encode(zlib.compress(json.dumps(memory, separators=(",", ":")).encode(), 6))
    return {
        "ticks": len(walls),
        "wall_s": walls,
        "read": reads,
        "images": len(current),
        "memory_kb": len(saved) / 1024,
    }


def with_discover(url: str, options: dict[str, Any]) -> dict[str, Any]:
    from dagster import instance_for_test

    from dagster_runway._compat import storage_connections_held
    from dagster_runway.pipeline import RunwayPipelineConfig
    from dagster_runway.pipeline.discovery import discover

    pipeline = RunwayPipelineConfig(source=url, output=tempfile.mkdtemp(), source_storage_options=options)
    walls, reads, recorded = [], [], 0
    with instance_for_test() as instance, storage_connections_held(instance):
        while True:
            started = time.monotonic()
            found = discover(pipeline, instance, "memory", started + BUDGET_S)
            instance.add_dynamic_partitions(pipeline.dynamic_partitions_name, found.new)
            walls.append(time.monotonic() - started)
            reads.append(found.read)
            recorded += found.recorded
            if found.pass_done and not found.deferred and found.recorded == 0:
                break
    return {"ticks": len(walls), "wall_s": walls, "read": reads, "images": recorded}


def make_local(root: Path, images: int, folders: int) -> str:
    source = root / "images"
    per = math.ceil(images / folders)
    for i in range(images):
        folder = source / f"f{i // per:04d}"
        if i % per == 0:
            folder.mkdir(parents=True)
            seed = folder / ".seed.png"  # a file may have 65,000 links at most: one seed per folder (hidden)
            seed.write_bytes(PNG)
        os.link(seed, folder / f"img{i:06d}.png")
    return str(source)


def make_s3(images: int, folders: int) -> tuple[Any, str, dict[str, Any]]:
    import botocore.session
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    client.create_bucket(Bucket="bench")
    per = math.ceil(images / folders)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: client.put_object(
                    Bucket="bench", Key=f"in/f{i // per:04d}/img{i:06d}.png", Body=PNG
                ),
                range(images),
            )
        )
    options = {"endpoint_url": endpoint, "key": "k", "secret": "s", "skip_instance_cache": True}
    return server, "s3://bench/in", options


def row(store: str, what: str, r: dict[str, Any]) -> str:
    walls, reads = r["wall_s"], r["read"]
    memory = f"{r['memory_kb']:.0f}" if "memory_kb" in r else "-"
    return (
        f"| {store} | {what} | {r['images']} | {r['ticks']} | {max(walls):.2f} | {max(walls) / BUDGET_S:.3f} | "
        f"{sum(walls):.2f} | {max(reads)} | {sum(reads)} | {r['peak_rss_mb']:.0f} | {memory} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--stores", default="local,s3", help="local, s3 or both (comma-separated)")
    parser.add_argument("--discover", action="store_true", help="also run discover() until all are recorded")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    lines = [
        command_line(),
        f"{args.images} images in {args.folders} folders; LIST_PER_TICK={LIST_PER_TICK}; budget {BUDGET_S:.0f} s; "
        f"{os.cpu_count()} cores",
        "",
        "| store | what | images | ticks | max tick s | max tick / budget | total s | max read/tick | total read "
        "| peak RSS MB | memory KB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        stores = args.stores.split(",")
        sources: list[tuple[str, str, dict[str, Any]]] = []
        server = None
        if "local" in stores:
            sources.append(("local", make_local(Path(tmp), args.images, args.folders), {}))
        if "s3" in stores:
            server, url, options = make_s3(args.images, args.folders)
            sources.append(("moto S3", url, options))
        try:
            for store, url, options in sources:
                base = _in_child(whole_listing, url, options)
                lines.append(row(store, "baseline: one ImageSource.list()", base))
                inc = _in_child(incremental, url, options)
                lines.append(row(store, "incremental pass (Listing)", inc))
                lines.append(
                    f"| {store} | ratio incremental / baseline | | | {max(inc['wall_s']) / base['wall_s'][0]:.2f} (max tick) "
                    f"| | {sum(inc['wall_s']) / base['wall_s'][0]:.2f} (pass) | | {sum(inc['read']) / base['read'][0]:.2f} "
                    f"| {inc['peak_rss_mb'] / max(base['peak_rss_mb'], 1):.2f} | |"
                )
                if args.discover:
                    lines.append(
                        row(store, "discover() until all recorded", _in_child(with_discover, url, options))
                    )
                print("\n".join(lines[-3:]), flush=True)
        finally:
            if server is not None:
                server.stop()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
