"""S7: the review page at 100,000 partitions, against the same page at 1,000 measured in the same run.

For each size, an index is written straight from made-up cards (the mix a large run has: mostly ok,
some failed, stale, source missing), then opened from ``file://`` in headless Chromium: the time to
the first screen drawn is the page's own ``performance.now()`` when its first frame with cards is
painted, counted from navigation start (the median of ``--repeat`` loads). Also measured: the bytes of
the page and its index, the time of a full index write, and of a write of ``--batch`` changed cards
into it (what a collect run does), with the bytes that write rewrites. A real small case (the demo
on the emulator, ``--real`` images) is timed the same way.

    .venv/bin/python bench/review_page.py [--partitions 100000] [--baseline 1000] [--batch 200]
        [--real 8] [--repeat 3] [--out review_page.txt]

Goal: the first screen at 100,000 partitions in under 3 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.harness import command_line, make_images  # noqa: E402
from dagster_runway.pipeline.checks import CHECK_NAMES  # noqa: E402
from dagster_runway.pipeline.gallery import GALLERY_NAME, INDEX_FOLDER, Card, GalleryIndex  # noqa: E402
from tests.browser import Browser, find_chromium  # noqa: E402

PROMPT = (
    "A slow push-in on the subject as the light shifts from dawn to morning; soft wind, film grain, calm."
)
HEADER = {"title": "runway: s3://photos/2024", "total_usd": 1234.5, "run_usd": 50.0}


def synthetic_card(i: int, rng: random.Random) -> Card:
    """A card as a large run has it. Its files do not exist, so it links none that the page would fetch
    (no poster, no source preview: as for images in a bucket); the real case has both."""
    key = f"photos/2024/{i % 97:02d}/IMG_{i:07d}.jpg"
    source = f"/data/photos/2024/{i % 97:02d}/IMG_{i:07d}.jpg"
    roll = rng.random()
    if roll < 0.02:
        return Card(key, "failed", source=source,
                    reason=f"{source}: aspect ratio 3.00 (600x200) is outside 0.5..2.0; crop it Next step: fix the image")  # fmt: skip
    state = (
        "stale"
        if roll < 0.05
        else "source missing"
        if roll < 0.06
        else "checks failed"
        if roll < 0.07
        else "ok"
    )
    checks = dict.fromkeys(CHECK_NAMES, "SUCCEEDED")
    if state == "checks failed":
        checks["aspect_matches_ratio"] = "FAILED"
    return Card(
        key,
        state,
        video=True,
        source=source,
        details={
            "prompt": PROMPT,
            "prompt from": "sidecar",
            "ratio": "1280:720",
            "seed": str(rng.randrange(2**32)),
            "duration": "5.0 s",
            "request": f"{rng.getrandbits(128):032x}",
        },
        cost_usd=0.25,
        checks=checks,
    )


def write_index(folder: Path, count: int) -> tuple[float, int]:
    """A full index of ``count`` made-up cards in ``folder``: (seconds to write, page + index bytes)."""
    rng = random.Random(count)
    cards = [synthetic_card(i, rng) for i in range(count)]
    started = time.perf_counter()
    GalleryIndex(str(folder)).write_all((card.row() for card in cards), HEADER)
    return time.perf_counter() - started, folder_bytes(folder)


def folder_bytes(folder: Path) -> int:
    return (folder / GALLERY_NAME).stat().st_size + sum(
        p.stat().st_size for p in (folder / INDEX_FOLDER).iterdir()
    )


def update_index(folder: Path, count: int, batch: int) -> tuple[float, int]:
    """A write of ``batch`` changed cards into the index: (seconds, bytes rewritten)."""
    rng = random.Random(-count)
    changed = [synthetic_card(i, rng) for i in rng.sample(range(count), batch)]
    index = GalleryIndex(str(folder))
    before = {p.name: p.stat().st_mtime_ns for p in (folder / INDEX_FOLDER).iterdir()}
    started = time.perf_counter()
    index.update([card.row() for card in changed], [card.key for card in changed], HEADER)
    elapsed = time.perf_counter() - started
    rewritten = sum(
        p.stat().st_size
        for p in (folder / INDEX_FOLDER).iterdir()
        if p.stat().st_mtime_ns != before.get(p.name)
    )
    return elapsed, rewritten + (folder / GALLERY_NAME).stat().st_size


def first_screen(browser: Browser, page: Path, repeat: int) -> float:
    """The median time from navigation start to the first screen of cards drawn, in seconds."""
    times = []
    for _ in range(repeat):
        browser.execute("window.location = 'about:blank'")
        browser._call("POST", browser._s("/url"), {"url": page.as_uri()})  # returns after the load event
        deadline = time.monotonic() + 120
        while (drawn := browser.execute("return window.runwayGalleryDrawn || null")) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{page}: no cards drawn within 120 s:\n{browser.text()[:2000]}")
            time.sleep(0.02)
        assert browser.execute("return document.querySelectorAll('.card').length") > 0, browser.text()[:2000]
        times.append(drawn / 1000)
    errors = browser.console_errors()
    if errors:
        raise RuntimeError(f"{page}: console errors: {errors[:5]}")
    return statistics.median(times)


def real_case(work: Path, images: int) -> Path:
    """The demo on the emulator with ``images`` images; returns its review page."""
    make_images(work / "images", images)
    env = {k: v for k, v in os.environ.items() if k not in ("RUNCOMFY_API_TOKEN", "RUNCOMFY_BASE_URL")}
    demo = [str(Path(sys.executable).parent / "dagster-runway"), "demo", "--images", str(work / "images"),
            "--output", str(work / "videos"), "--dagster-home", str(work / "home"), "--time-scale", "0"]  # fmt: skip
    done = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(
            f"the demo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return work / "videos" / GALLERY_NAME


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--partitions", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=200, help="cards changed by one collect run")
    parser.add_argument("--real", type=int, default=8, help="images in the real small case (0: skip it)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    found = find_chromium()
    if found is None:
        sys.exit("chromium and chromedriver are needed (Debian: chromium, chromium-driver)")
    work = Path(tempfile.mkdtemp(prefix="review-page-bench-"))
    rows: dict[str, dict[str, str]] = {}
    try:
        with Browser(*found).start() as browser:
            for label, count in (("baseline", args.baseline), ("large", args.partitions)):
                folder = work / f"n{count}"
                folder.mkdir()
                write_s, size = write_index(folder, count)
                update_s, rewritten = update_index(folder, count, args.batch)
                drawn = first_screen(browser, folder / GALLERY_NAME, args.repeat)
                rows[label] = {
                    "partitions": f"{count:,}",
                    "first screen": f"{drawn:.2f} s",
                    "page + index": f"{size / 1e6:.1f} MB",
                    "full write": f"{write_s:.2f} s",
                    f"write of {args.batch}": f"{update_s:.2f} s",
                    "bytes it rewrites": f"{rewritten / 1e6:.2f} MB",
                    "_drawn": str(drawn),
                }
            if args.real:
                page = real_case(work / "real", args.real)
                drawn = first_screen(browser, page, args.repeat)
                rows["real (demo)"] = {
                    "partitions": str(args.real),
                    "first screen": f"{drawn:.2f} s",
                    "page + index": f"{folder_bytes(page.parent) / 1e6:.3f} MB",
                    "_drawn": str(drawn),
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    columns = [
        "partitions",
        "first screen",
        "page + index",
        "full write",
        f"write of {args.batch}",
        "bytes it rewrites",
    ]
    lines = [
        "S7: the review page (gallery.html + gallery/) in headless Chromium from file://",
        command_line(),
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        "| case | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(row.get(column, "") for column in columns) + " |")
    large, base = float(rows["large"]["_drawn"]), float(rows["baseline"]["_drawn"])
    lines += [
        "",
        f"first screen, large / baseline: {large / base:.2f}x; goal: under 3 s at "
        f"{args.partitions:,} partitions: {'met' if large < 3 else 'NOT met'} ({large:.2f} s)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
