"""Benchmark of the media layer, each figure against a baseline measured in the same run.

    .venv/bin/python bench/media.py [--video-mb 256] [--repeat 5]

1. Header validation of a large image (a real 7000x7000 PNG of ~12 MB), on local disk and on moto's
   S3 server: time and bytes read by ``validate_image`` against a full Pillow decode of the same file
   (which is what "open it and check" costs).
   Then the pipeline's pixel check that follows the header check before any submit (``check_pixels``:
   the whole file read and every pixel decoded): time and peak RSS growth, local and on moto S3.
2. Storing a video of at least 200 MB with ``store_video`` from a local HTTP server, to local disk and
   to moto's S3: throughput, and peak RSS growth of this process (sampled from /proc every 2 ms),
   against the naive way: read the whole body into memory, then write it.

The HTTP server and moto run in child processes, so that their memory does not count as ours.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dagster_runway.media import ImageSource, check_pixels, store_video, validate_image  # noqa: E402

MB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1.0)
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def _child(args: list[str], probe_url: str) -> Iterator[None]:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(probe_url)
        yield
    finally:
        process.terminate()
        process.wait(10)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's RSS every 2 ms while active; ``growth`` is peak minus the start."""

    def __init__(self) -> None:
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.start = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


class CountingRead:
    """Counts the bytes an fs returns from cat_file (the only read validate_image makes)."""

    def __init__(self, fs: Any) -> None:
        self.fs, self.bytes = fs, 0
        self._original = fs.cat_file

        def cat_file(path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
            data = self._original(path, start=start, end=end, **kw)
            self.bytes += len(data)
            return data

        fs.cat_file = cat_file

    def reset(self) -> None:
        self.bytes = 0


def _big_png() -> bytes:
    noise = Image.effect_noise((7000 // 64, 7000 // 64), 80).resize((7000, 7000), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    noise.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _full_decode(data_or_path: bytes | str) -> tuple[int, int]:
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(source) as image:
        image.load()
        return image.size


def _fmt_bytes(n: float) -> str:
    return f"{n / MB:.2f} MB" if n >= MB else f"{n / 1024:.1f} KB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--video-mb", type=int, default=256, help="size of the video to store (>= 200)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of each validation timing")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []

    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp_dir:
        tmp = Path(tmp_dir)
        moto_port = _free_port()
        endpoint = f"http://127.0.0.1:{moto_port}"
        moto_cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)]
        env_region = os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        del env_region
        with _child(moto_cmd, f"{endpoint}/moto-api/"):
            options = {
                "endpoint_url": endpoint,
                "key": "bench",
                "secret": "bench",
                "skip_instance_cache": True,
            }
            s3 = fsspec.filesystem("s3", **options)
            s3.mkdir("bench")

            # -- 1. header validation vs full decode --------------------------------------------
            png = _big_png()
            local_png = tmp / "seven-k.png"
            local_png.write_bytes(png)
            s3.pipe("bench/seven-k.png", png)
            local_fs = fsspec.filesystem("file", skip_instance_cache=True)
            local_count = CountingRead(local_fs)

            def validate_local() -> Any:
                local_count.reset()
                return validate_image(local_fs, str(local_png))

            t_val, info = _timed(validate_local, args.repeat)
            t_dec, size = _timed(lambda: _full_decode(str(local_png)), max(1, args.repeat // 2))
            assert (info.width, info.height) == size == (7000, 7000)
            rows.append(
                (
                    "validate 7000x7000 PNG, local: time",
                    f"{t_val * 1e3:.2f} ms",
                    f"{t_dec * 1e3:.0f} ms",
                    f"{t_dec / t_val:.0f}x faster",
                )
            )
            rows.append(
                (
                    "validate 7000x7000 PNG, local: bytes read",
                    _fmt_bytes(local_count.bytes),
                    _fmt_bytes(len(png)),
                    f"{len(png) / local_count.bytes:.0f}x fewer",
                )
            )

            s3_count = CountingRead(s3)

            def validate_s3() -> Any:
                s3_count.reset()
                return validate_image(s3, "bench/seven-k.png")

            def decode_s3() -> tuple[int, int]:
                s3_count.reset()
                return _full_decode(bytes(s3.cat_file("bench/seven-k.png")))

            t_val_s3, info = _timed(validate_s3, args.repeat)
            val_bytes = s3_count.bytes
            t_dec_s3, _ = _timed(decode_s3, max(1, args.repeat // 2))
            dec_bytes = s3_count.bytes
            rows.append(
                (
                    "validate 7000x7000 PNG, moto S3: time",
                    f"{t_val_s3 * 1e3:.1f} ms",
                    f"{t_dec_s3 * 1e3:.0f} ms",
                    f"{t_dec_s3 / t_val_s3:.0f}x faster",
                )
            )
            rows.append(
                (
                    "validate 7000x7000 PNG, moto S3: bytes read",
                    _fmt_bytes(val_bytes),
                    _fmt_bytes(dec_bytes),
                    f"{dec_bytes / val_bytes:.0f}x fewer",
                )
            )

            # -- the pipeline's pixel check before a submit: read it all and decode every pixel ----
            # (header check first, then this; what it costs, against the header check alone)
            for where, fs, path, t_header in (
                ("local", local_fs, str(local_png), t_val),
                ("moto S3", s3, "bench/seven-k.png", t_val_s3),
            ):

                def pixel_check(fs: Any = fs, path: str = path) -> None:
                    check_pixels(bytes(fs.cat_file(path)), path)

                gc.collect()
                with PeakRss() as rss:
                    t_pix, _ = _timed(pixel_check, max(1, args.repeat // 2))
                rows.append(
                    (
                        f"pixel check of the {_fmt_bytes(len(png))} PNG, {where}: time, peak RSS growth",
                        f"{t_pix * 1e3:.0f} ms, {_fmt_bytes(rss.growth)}",
                        f"header {t_header * 1e3:.1f} ms",
                        f"{t_pix / t_header:.0f}x the header check",
                    )
                )

            # -- listing ------------------------------------------------------------------------
            many = tmp / "many"
            for folder in range(20):
                sub = many / f"f{folder:02d}"
                sub.mkdir(parents=True)
                for index in range(1000):
                    (sub / f"img {index:04d}.png").touch()
            source = ImageSource(str(many))
            t_list, entries = _timed(source.list, 3)
            t_find, found = _timed(lambda: local_fs.find(str(many), detail=True), 3)
            assert len(entries) == len(found) == 20_000
            rows.append(
                (
                    "ImageSource.list(), 20,000 local files",
                    f"{t_list * 1e3:.0f} ms",
                    f"{t_find * 1e3:.0f} ms (fs.find)",
                    f"{t_list / t_find:.2f}x",
                )
            )

            # -- 2. storing a large video ---------------------------------------------------------
            serve_dir = tmp / "serve"
            serve_dir.mkdir()
            video_size = -(-max(200, args.video_mb) // 16) * 16 * MB  # whole 16 MB chunks
            with open(serve_dir / "video.mp4", "wb") as handle:
                # An MP4's first box, so that store_video's signature check passes; random bytes after it.
                handle.write(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom")
                handle.write(os.urandom(16 * MB - 24))
                for _ in range(video_size // (16 * MB) - 1):
                    handle.write(os.urandom(16 * MB))
            http_port = _free_port()
            http_cmd = [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(serve_dir),
                str(http_port),
            ]
            video_url = f"http://127.0.0.1:{http_port}/video.mp4"
            with _child(http_cmd, f"http://127.0.0.1:{http_port}/"):
                out = tmp / "out"
                out.mkdir()

                source_file = serve_dir / "video.mp4"

                def naive_local() -> float:
                    data = httpx.get(video_url, timeout=120).content
                    (out / "naive.mp4").write_bytes(data)
                    return 0.0

                def naive_s3() -> float:
                    data = httpx.get(video_url, timeout=120).content
                    s3.pipe("bench/naive.mp4", data)
                    return 0.0

                def from_memory_local() -> float:
                    data = source_file.read_bytes()  # the bytes are in memory; only the write is timed
                    started = time.perf_counter()
                    (out / "memory.mp4").write_bytes(data)
                    return time.perf_counter() - started

                def from_memory_s3() -> float:
                    data = source_file.read_bytes()
                    started = time.perf_counter()
                    s3.pipe("bench/memory.mp4", data)
                    return time.perf_counter() - started

                def ours_local() -> float:
                    assert store_video(video_url, str(out / "streamed.mp4")).size == video_size
                    return 0.0

                def ours_s3() -> float:
                    stored = store_video(video_url, "s3://bench/streamed.mp4", storage_options=options)
                    assert stored.size == video_size
                    return 0.0

                mb = video_size / MB
                cases = [
                    ("local disk", ours_local, from_memory_local, naive_local),
                    ("moto S3", ours_s3, from_memory_s3, naive_s3),
                ]
                for label, ours, from_memory, naive in cases:
                    measured = {}
                    for name, fn in (("ours", ours), ("memory", from_memory), ("naive", naive)):
                        gc.collect()
                        with PeakRss() as rss:
                            started = time.perf_counter()
                            inner = fn()
                            elapsed = inner or (time.perf_counter() - started)
                        measured[name] = (elapsed, rss.growth)
                    (t_ours, g_ours), (t_mem, g_mem), (t_naive, g_naive) = (
                        measured["ours"],
                        measured["memory"],
                        measured["naive"],
                    )
                    rows.append(
                        (
                            f"{mb:.0f} MB video -> {label}: store_video vs write from memory",
                            f"{mb / t_ours:.0f} MB/s",
                            f"{mb / t_mem:.0f} MB/s",
                            f"{t_mem / t_ours:.2f}x",
                        )
                    )
                    rows.append(
                        (
                            f"{mb:.0f} MB video -> {label}: store_video vs download-then-write",
                            f"{mb / t_ours:.0f} MB/s",
                            f"{mb / t_naive:.0f} MB/s",
                            f"{t_naive / t_ours:.2f}x",
                        )
                    )
                    rows.append(
                        (
                            f"{mb:.0f} MB video -> {label}: peak RSS growth vs from memory",
                            _fmt_bytes(g_ours),
                            _fmt_bytes(g_mem),
                            f"{g_mem / max(g_ours, 1):.0f}x less",
                        )
                    )
                    rows.append(
                        (
                            f"{mb:.0f} MB video -> {label}: peak RSS growth vs download-then-write",
                            _fmt_bytes(g_ours),
                            _fmt_bytes(g_naive),
                            f"{g_naive / max(g_ours, 1):.0f}x less",
                        )
                    )

    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[i]) for r in rows) for i in range(1, 4)]
    header = ("measure", "media layer", "baseline", "ratio")
    cols = [max(c, len(h)) for c, h in zip(cols, header[1:], strict=True)]
    print(f"{header[0]:<{width}}  {header[1]:>{cols[0]}}  {header[2]:>{cols[1]}}  {header[3]:>{cols[2]}}")
    print("-" * (width + sum(cols) + 6))
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>{cols[0]}}  {row[2]:>{cols[1]}}  {row[3]:>{cols[2]}}")
    print(
        "\nbaselines: a full Pillow decode of the same PNG (on S3: download it, then decode); a bare "
        "fs.find(detail=True) of the folder; writing the video's bytes already held in memory (one write; "
        "on S3 one put), and downloading it into memory with httpx, then writing it. Throughput is MB/s of "
        "video; RSS is sampled from /proc every 2 ms; the HTTP server and moto run in child processes."
    )


if __name__ == "__main__":
    main()
