"""The worker: on the server's event loop, it wakes at each deadline of the store and does the
work of each request that starts: get the image, check it, render the video in a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from dagster_runway.emulator.config import EmulatorConfig
from dagster_runway.emulator.images import ImageRejected, check_image, load_image
from dagster_runway.emulator.render import Video, copy_video, render_video
from dagster_runway.emulator.state import GenerationFailure, Job, Store

logger = logging.getLogger(__name__)

# Longest sleep between looks at the store; every change wakes the worker sooner.
_MAX_SLEEP = 30.0


class Worker:
    """Runs on the server's event loop; ``wake()`` may be called from any thread."""

    def __init__(
        self, store: Store, config: EmulatorConfig, files_dir: Path, pool: ThreadPoolExecutor
    ) -> None:
        self._store = store
        self._config = config
        self._files_dir = files_dir
        self._pool = pool
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._closing = False
        self._clips: dict[tuple[str, int], Video] = {}  # with reuse_renders: the clip of each size

    def wake(self) -> None:
        """Make the worker look at the store now; safe from any thread."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the emulator stopped
                loop.call_soon_threadsafe(event.set)

    def close(self) -> None:
        """Make ``run()`` cancel the work in hand and return; call it on the worker's loop."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Start each request's work when it starts, until ``close()`` (or a cancel)."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        try:
            while not self._closing:
                self._wake.clear()
                for job in self._store.claim_work():
                    task = asyncio.create_task(self._work(job))
                    self._jobs.add(task)
                    task.add_done_callback(self._jobs.discard)
                delay = self._store.seconds_to_next_event()
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for loses a cancel that comes in
                # the same loop iteration as the wake-up, and this loop would then never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, _MAX_SLEEP) if delay is not None else None):
                        await self._wake.wait()
        finally:
            for task in self._jobs:
                task.cancel()
            await asyncio.gather(*self._jobs, return_exceptions=True)
            if self._client is not None:
                await self._client.aclose()
            self._loop = None

    async def _work(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        outcome: Video | GenerationFailure
        try:
            data = await load_image(self._http(), job.image, self._config.fetch_timeout_seconds)
            image = await loop.run_in_executor(self._pool, check_image, data)
            if job.injected is not None:
                outcome = job.injected
            elif self._config.reuse_renders and self._clip_for(job) is not None:
                outcome = await loop.run_in_executor(
                    self._pool, self._copy, self._clips[(job.ratio, job.duration)], job.request_id
                )
            else:
                outcome = await loop.run_in_executor(
                    self._pool,
                    lambda: render_video(
                        image,
                        self._files_dir / f"{job.request_id}.mp4",
                        ratio=job.ratio,
                        duration=job.duration,
                        fps=self._config.fps,
                        scale=self._config.video_scale,
                        seed=job.seed,
                        durable=self._store.durable,
                    ),
                )
            if (
                self._config.reuse_renders
                and isinstance(outcome, Video)
                and (job.ratio, job.duration) not in self._clips
            ):
                # A file of its own: the request's video may expire and be deleted.
                kept = self._files_dir / f"clip-{job.ratio.replace(':', 'x')}-{job.duration}s.mp4"
                self._clips[(job.ratio, job.duration)] = await loop.run_in_executor(
                    self._pool, copy_video, outcome, kept
                )
        except ImageRejected as exc:
            outcome = GenerationFailure(exc.code, exc.message)
        except Exception as exc:
            logger.exception("emulator: the work of request %s failed", job.request_id)
            outcome = GenerationFailure(
                "INTERNAL.EMULATOR", f"The emulator failed to render: {type(exc).__name__}: {exc}"
            )
        self._store.finish_work(job, outcome)

    def _clip_for(self, job: Job) -> Video | None:
        clip = self._clips.get((job.ratio, job.duration))
        if clip is not None and not clip.path.exists():  # removed by a reset: render again
            del self._clips[(job.ratio, job.duration)]
            return None
        return clip

    def _copy(self, clip: Video, request_id: str) -> Video:
        return copy_video(clip, self._files_dir / f"{request_id}.mp4", durable=self._store.durable)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(headers={"User-Agent": "dagster-runway-emulator"})
        return self._client
