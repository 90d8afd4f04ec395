"""Push N images through the deferred pipeline on a real Dagster instance with an instant emulator.

Prints the wall time, the Dagster runs launched, and the overhead per video over the emulator's own
time, for the batched design and for the naive one-run-per-partition design, measured in the same run.

The emulator's own time is a baseline measured first: the same images submitted, awaited and
downloaded with the async client alone, no Dagster. Overhead per video = (pipeline wall time - that
baseline) / videos.

    python bench/pipeline.py [--images 200] [--naive-images 60]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(320, 180), (180, 320), (240, 240), (300, 224)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        image = Image.new("RGB", (w, h), (i * 37 % 255, i * 91 % 255, 120))
        ImageDraw.Draw(image).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(250, 200, 40))
        out = io.BytesIO()
        image.save(out, format="PNG")
        (folder / f"image{i:04d}.png").write_bytes(out.getvalue())


def direct_baseline(emulator, folder: Path, out: Path) -> float:
    """Submit, wait for and download every image with the async client alone."""
    import base64

    import httpx

    from dagster_runway import AsyncRunComfyClient

    images = sorted(folder.glob("*.png"))

    async def main() -> None:
        async with (
            AsyncRunComfyClient(
                emulator.token, base_url=emulator.base_url, poll_interval=0.05, max_concurrency=16
            ) as client,
            httpx.AsyncClient() as http,
        ):

            async def one(path: Path) -> None:
                uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
                submission = await client.submit({"promptImage": uri, "seed": 1})
                result = await client.wait(submission.request_id, timeout=300)
                response = await http.get(result.video_url)
                (out / f"{path.stem}.mp4").write_bytes(response.content)

            await asyncio.gather(*(one(p) for p in images))

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - started


def pipeline_run(emulator, folder: Path, out: Path, home: Path, batch: int) -> tuple[float, int, int]:
    from dagster import AssetKey, DagsterInstance

    from dagster_runway import RunComfyResource
    from dagster_runway.pipeline import build_runway_pipeline
    from dagster_runway.pipeline.status import summary
    from dagster_runway.testing import LocalDaemon

    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    resource = RunComfyResource(api_token=emulator.token, base_url=emulator.base_url, max_concurrency=16)
    defs = build_runway_pipeline(
        str(folder),
        str(out),
        resource=resource,
        submit_batch_size=max(batch, 1),
        collect_batch_size=batch,
        missing_prompt="service_default",
    )
    with DagsterInstance.from_config(str(home)) as instance:
        daemon = LocalDaemon(defs, instance)
        started = time.perf_counter()
        runs = 0
        outcome = daemon.tick("runway_discovery_sensor")
        runs += len(outcome.run_ids) + len(outcome.failed_run_ids)
        while True:
            outcome = daemon.tick("runway_status_sensor")
            runs += len(outcome.run_ids) + len(outcome.failed_run_ids)
            counts = summary(outcome.cursor)
            busy = counts.get("rebuilding") or any(
                counts.get(k) for k in ("in_flight", "submit", "collect", "running")
            )
            if not busy and not outcome.run_ids and not outcome.failed_run_ids:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        videos = len(instance.fetch_materializations(AssetKey(["runway", "videos"]), limit=10_000).records)
    return elapsed, runs, videos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images for the batched pipeline")
    parser.add_argument(
        "--naive-images", type=int, default=60, help="images for the naive one-run-per-partition design"
    )
    args = parser.parse_args()
    os.environ["DAGSTER_DISABLE_TELEMETRY"] = "1"
    logging.getLogger("dagster").setLevel(logging.WARNING)
    logging.disable(logging.INFO)

    from dagster_runway.emulator import Emulator, EmulatorConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, count, batch in (
            ("batched (this design)", args.images, 25),
            ("naive: 1 run/partition", args.naive_images, 1),
        ):
            folder = root / f"images-{count}"
            if not folder.exists():
                make_images(folder, count)
            with Emulator(EmulatorConfig(time_scale=0.0, max_concurrency=64)) as emulator:
                baseline = direct_baseline(emulator, folder, root / f"direct-{label[:5]}")
            with Emulator(EmulatorConfig(time_scale=0.0, max_concurrency=64)) as emulator:
                wall, runs, videos = pipeline_run(
                    emulator, folder, root / f"out-{label[:5]}", root / f"home-{label[:5]}", batch
                )
                billed = emulator.ledger().billed_submissions
            overhead = (wall - baseline) / max(videos, 1)
            rows.append((label, count, videos, billed, runs, wall, baseline, overhead))

    print(
        "\ncommand: python bench/pipeline.py " + f"--images {args.images} --naive-images {args.naive_images}"
    )
    header = (
        "design",
        "images",
        "videos",
        "billed",
        "runs",
        "wall_s",
        "emulator_alone_s",
        "overhead_s/video",
    )
    print("  ".join(f"{h:>22}" if i == 0 else f"{h:>16}" for i, h in enumerate(header)))
    for label, count, videos, billed, runs, wall, baseline, overhead in rows:
        print(
            f"{label:>22}  {count:>16}  {videos:>16}  {billed:>16}  {runs:>16}  {wall:>16.2f}  {baseline:>16.2f}  "
            f"{overhead:>16.3f}"
        )
    batched, naive = rows[0][-1], rows[1][-1]
    print(
        f"\noverhead per video: batched {batched:.3f}s vs naive {naive:.3f}s -> naive/batched = "
        f"{naive / batched if batched > 0 else float('inf'):.1f}x"
    )
    print(
        f"runs per video: batched {rows[0][4] / max(rows[0][2], 1):.3f} vs naive {rows[1][4] / max(rows[1][2], 1):.3f}"
    )


if __name__ == "__main__":
    main()
