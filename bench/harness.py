"""Shared pieces of ``bench/scale.py`` and ``bench/status_tick.py``: the emulator as a process of its own
(the ``dagster-runway emulator`` command, as a user runs it), a throwaway PostgreSQL cluster, images of
varied sizes, and small statistics.

The process and PostgreSQL handling is the deployment harness of the tests
(``tests/fixtures/deployment.py``), imported from there, not copied.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from tests.fixtures.deployment import (  # noqa: E402
    Deployment,
    ManagedProcess,
    PostgresCluster,
    _executable,
    find_postgres_bin,
    free_port,
    stop_processes,
)

__all__ = [
    "REPO_ROOT",
    "Deployment",
    "EmulatorServer",
    "PostgresCluster",
    "command_line",
    "make_images",
    "postgres_cluster",
    "stats",
]


def command_line() -> str:
    """The exact command line this process was started with."""
    return "$ " + shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


class EmulatorServer:
    """``dagster-runway emulator`` in a process (and session) of its own, on a free port.

    ``with EmulatorServer(root, token, ["--latency", "0.1"]) as emulator:`` gives ``base_url``,
    ``ledger()`` and ``admin(method, path)``; the process group is stopped on exit.
    """

    def __init__(self, root: Path, token: str, args: Sequence[str], name: str = "emulator") -> None:
        self.root = root
        self.token = token
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        argv = [_executable("dagster-runway"), "emulator", "--port", str(self.port), "--token", token, *args]
        self.process = ManagedProcess(name, argv, _env(), root, root)
        self._http = httpx.Client(base_url=self.base_url, timeout=60.0)

    def __enter__(self) -> EmulatorServer:
        self.process.start()
        deadline = time.monotonic() + 60
        while True:
            if not self.process.running:
                raise RuntimeError(f"the emulator exited:\n{self.process.tails(40)}")
            with contextlib.suppress(httpx.TransportError):
                if self._http.get("/_emulator/ledger").status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the emulator did not answer within 60 s:\n{self.process.tails(40)}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self._http.close()
        stop_processes([self.process], grace=10)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, f"/_emulator/{path.lstrip('/')}", **kwargs)
        response.raise_for_status()
        return response

    def ledger(self) -> Any:
        from dagster_runway.emulator.ledger import Ledger

        return Ledger.model_validate(self.admin("GET", "ledger").json())


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "RUNWAY_", "RUNCOMFY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster (as the tests' ``postgres_cluster`` fixture), stopped and deleted after."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` small PNGs of varied sizes and aspects, all inside the service's 1:2..2:1 (exclusive).

    Widths 96..320 px, aspects log-uniform in 0.52..1.95, each with its own colours so that every image
    has a different fingerprint.
    """
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        aspect = math.exp(rng.uniform(math.log(0.52), math.log(1.95)))
        width = rng.randint(96, 320)
        height = max(48, round(width / aspect))
        while not 0.5 < width / height < 2.0:  # rounding at the edges
            height += 1 if width / height >= 2.0 else -1
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        image = Image.new("RGB", (width, height), colour)
        draw = ImageDraw.Draw(image)
        draw.ellipse(
            [width // 5, height // 5, 4 * width // 5, 4 * height // 5], fill=(255 - colour[0], 200, i % 256)
        )
        draw.text((4, 4), f"{i}", fill=(255, 255, 255))
        out = io.BytesIO()
        image.save(out, format="PNG")
        path = folder / f"image{i:05d}.png"
        path.write_bytes(out.getvalue())
        paths.append(path)
    return paths


def stats(values: Sequence[float]) -> dict[str, float]:
    """``n``, ``mean``, ``p50``, ``p95``, ``max`` of ``values`` (zeros when empty)."""
    if not values:
        return {"n": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "n": len(ordered),
        "mean": statistics.fmean(ordered),
        "p50": statistics.median(ordered),
        "p95": p95,
        "max": ordered[-1],
    }


def fmt_stats(values: Sequence[float], unit: str = "s") -> str:
    s = stats(values)
    if not s["n"]:
        return "n=0"
    return (
        f"mean {s['mean']:.2f}{unit}  p50 {s['p50']:.2f}{unit}  p95 {s['p95']:.2f}{unit}  "
        f"max {s['max']:.2f}{unit}  (n={s['n']})"
    )


class LoadSampler:
    """Samples the 1-minute load average every ``interval`` seconds while in use: the machine may be
    shared, and a figure taken at a load of 10 on 2 cores measures the neighbours as much as the design.

    ``with LoadSampler() as load: ...`` then ``load.summary()``.
    """

    def __init__(self, interval: float = 2.0) -> None:
        import threading

        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        import os

        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> str:
        if not self.samples:
            return "load average: no samples"
        return (
            f"load average (1 min) during it: mean {statistics.fmean(self.samples):.1f}, "
            f"max {max(self.samples):.1f}"
        )
