"""S2: a submit run and a collect run of 200 partitions cost the same in a source of 1,000 images and
of 100,000 (goal: at most 1.2x).

For each size, a fresh local source: the run's 200 distinct images (every tenth with a name whose
partition key is hashed) plus filler images, hard links of one small PNG, 1,000 to a folder. All are
partitions; discovery's own ``discover()`` records the images (the run's 200 first; it records
``discovery_batch_size`` per call, so both sizes have the same number of image records). Then one
submit run and one collect run over the 200, on a fresh instance, against the in-process emulator
(instant renders; the collect run starts once every render is done). Measured per run: wall time,
bytes the process read (``rchar`` of /proc/self/io: sources, instance, videos), and listing calls on
the source (fsspec ``find``/``ls``/``walk`` and ``os.scandir``/``listdir`` under its root). The review
page, which collect runs rewrite, is left out of the runs (its cost is S7's, ``bench/review_page.py``).
For comparison, the table also shows one ``ImageSource.list()`` of the source: what every submit and
collect run paid before.

    python bench/batch_bound.py --out /tmp/batch_bound.txt [--sizes 1000,100000] [--batch 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dagster import DagsterInstance, instance_for_test  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from bench.harness import command_line  # noqa: E402
from dagster_runway import RunComfyResource, _compat  # noqa: E402
from dagster_runway.emulator import Emulator, EmulatorConfig  # noqa: E402
from dagster_runway.media import partition_key_for  # noqa: E402
from dagster_runway.media.lookup import lookup  # noqa: E402
from dagster_runway.pipeline import assets, build_runway_pipeline  # noqa: E402
from dagster_runway.pipeline import records as rec  # noqa: E402
from dagster_runway.pipeline.config import RunwayPipelineConfig  # noqa: E402
from dagster_runway.pipeline.discovery import discover  # noqa: E402
from dagster_runway.pipeline.prepare import recorded_relpaths  # noqa: E402
from dagster_runway.pipeline.sensors import op_config  # noqa: E402
from tests.pipeline_helpers import png_bytes  # noqa: E402


def rchar() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


class Listings:
    """Counts listing calls on paths under ``root`` (patched in for the whole bench)."""

    def __init__(self) -> None:
        self.root = "/nonexistent"
        self.calls = 0
        for owner, names in ((LocalFileSystem, ("ls", "find", "walk", "glob")), (os, ("scandir", "listdir"))):
            for name in names:
                setattr(owner, name, self._counted(owner, getattr(owner, name)))

    def _counted(self, owner: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            path = args[1] if owner is not os and len(args) > 1 else (args[0] if args else ".")
            text = os.fspath(path) if isinstance(path, str | os.PathLike) else ""
            if isinstance(text, str) and (text == self.root or text.startswith(self.root + "/")):
                self.calls += 1
            return original(*args, **kwargs)

        return counted


def make_source(folder: Path, size: int, batch: int) -> list[str]:
    """``batch`` distinct images and ``size - batch`` hard links of one PNG; the batch's relative paths."""
    names = []
    for i in range(batch):
        rel = f"batch/img {i:04d}.png" if i % 10 == 0 else f"batch/img{i:04d}.png"  # " ": a hashed key
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(256, 192, (i % 256, (7 * i) % 256, (13 * i) % 256)))
        names.append(rel)
    seed = png_bytes(64, 48)
    for i in range(size - batch):
        path = folder / "fill" / f"d{i // 1000:03d}" / f"f{i:06d}.png"
        if i % 1000 == 0:
            path.parent.mkdir(parents=True)
        if i % 50_000 == 0:  # a file has at most 65,000 links on ext4
            filler = folder / f"filler{i // 50_000}.seed"
            filler.write_bytes(seed)
        os.link(filler, path)
    return names


@contextmanager
def no_review_page() -> Iterator[None]:
    write_gallery = assets.write_gallery
    assets.write_gallery = lambda pipeline, instance, *a, **k: "(not written by the bench)"  # type: ignore[assignment]
    try:
        yield
    finally:
        assets.write_gallery = write_gallery


def measure(listings: Listings, fn: Callable[[], Any]) -> tuple[float, int, int, Any]:
    calls, read, started = listings.calls, rchar(), time.perf_counter()
    result = fn()
    return time.perf_counter() - started, rchar() - read, listings.calls - calls, result


def run_size(size: int, batch: int, work: Path, emulator: Emulator, listings: Listings) -> dict[str, Any]:
    folder, output = work / f"source-{size}", work / f"videos-{size}"
    names = make_source(folder, size, batch)
    keys = [partition_key_for(rel) for rel in names]
    listings.root = str(folder)
    pipeline = RunwayPipelineConfig(source=str(folder), output=str(output))
    listed = measure(listings, lambda: len(pipeline.image_source().list()))
    assert listed[3] == size, listed
    resource = RunComfyResource(api_token=emulator.token, base_url=emulator.base_url, poll_interval=0.05)
    defs = build_runway_pipeline(
        str(folder), str(output), resource=resource, missing_prompt="service_default"
    )
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(pipeline.dynamic_partitions_name, keys)
        others = [partition_key_for(f"fill/d{i // 1000:03d}/f{i:06d}.png") for i in range(size - batch)]
        instance.add_dynamic_partitions(pipeline.dynamic_partitions_name, others)
        record(pipeline, instance, keys)
        source = pipeline.image_source()
        found = measure(
            listings, lambda: lookup(source, recorded_relpaths(pipeline, source, instance, keys).values())
        )
        assert len(found[3]) == batch, found
        billed = emulator.ledger().billed_submissions
        with no_review_page():
            submit = measure(
                listings, lambda: run(defs, instance, "runway_submit_job", "runway_requests", keys)
            )
            wait_for_renders(emulator)
            collect = measure(
                listings, lambda: run(defs, instance, "runway_collect_job", "runway_videos", keys)
            )
        assert submit[3].success and collect[3].success, "a run failed: see its log above"
        videos = rec.latest_videos(instance, pipeline.videos_key, keys)
        assert len(videos) == batch and emulator.ledger().billed_submissions - billed == batch
    return {"list": listed, "find": found, "submit": submit, "collect": collect}


def record(pipeline: RunwayPipelineConfig, instance: DagsterInstance, keys: list[str]) -> None:
    """Discovery's records, until every image of the batch has one (a call records a bounded number)."""
    with _compat.storage_connections_held(instance):
        for _ in range(100):
            discover(pipeline, instance, "bench/discovery", deadline=time.monotonic() + 600)
            if len(rec.latest_images(instance, pipeline.images_key, keys)) == len(keys):
                return
    raise RuntimeError("discovery did not record the batch's images")


def run(defs: Any, instance: DagsterInstance, job: str, op: str, keys: list[str]) -> Any:
    tags = {_compat.ASSET_PARTITION_RANGE_START_TAG: keys[0], _compat.ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, run_config=op_config(op, keys), tags=tags, raise_on_error=False
    )


def wait_for_renders(emulator: Emulator) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if all(
            emulator.request_state(e.request_id) not in ("in_queue", "in_progress")
            for e in emulator.ledger().entries
        ):
            return
        time.sleep(0.2)
    raise RuntimeError("the emulator did not finish the renders")


def table(sizes: list[int], results: dict[int, dict[str, Any]], batch: int) -> str:
    base, top = sizes[0], sizes[-1]
    lines = [
        f"S2: a submit run and a collect run of {batch} partitions, local source of {base:,} vs {top:,} images",
        f"| what | {base:,}: s | {top:,}: s | ratio | {base:,}: MB read | {top:,}: MB read | ratio "
        f"| listing calls ({base:,} / {top:,}) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for what, label in (
        ("submit", "submit run"),
        ("collect", "collect run"),
        ("find", "finding the batch's images (records + lookups; in each run)"),
        ("list", "one ImageSource.list() (before: in each run)"),
    ):
        (t0, b0, l0, _), (t1, b1, l1, _) = results[base][what], results[top][what]
        lines.append(
            f"| {label} | {t0:.2f} | {t1:.2f} | {t1 / t0:.2f}x | {b0 / 1e6:.1f} | {b1 / 1e6:.1f} | {b1 / max(b0, 1):.2f}x "
            f"| {l0} / {l1} |"
        )
    lines.append("goal: submit and collect at most 1.2x in time and bytes read, and no listing call")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,100000", help="source sizes, the baseline first")
    parser.add_argument("--batch", type=int, default=200, help="partitions per run")
    parser.add_argument("--out", required=True, help="write the table to this file too")
    parser.add_argument("--work", default=None, help="a folder for the sources (default: a temporary one)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    listings = Listings()
    emulator = Emulator(EmulatorConfig(time_scale=0.0, random_seed=0)).start()
    results = {}
    try:
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            warmup = min(20, args.batch)
            run_size(
                warmup, warmup, Path(work) / "warmup", emulator, listings
            )  # imports, caches: not counted
            for size in sizes:
                results[size] = run_size(size, args.batch, Path(work), emulator, listings)
                print(
                    f"{size:,} images:",
                    {
                        k: f"{t:.2f}s {b / 1e6:.1f}MB {n} listings"
                        for k, (t, b, n, _) in results[size].items()
                    },
                    flush=True,
                )
    finally:
        emulator.stop()
    text = f"{command_line()}\n\n{table(sizes, results, args.batch)}\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
