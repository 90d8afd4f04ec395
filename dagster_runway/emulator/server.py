"""``Emulator``: the app served by uvicorn in a background thread, with a Python handle on its state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from dagster_runway.emulator.app import EmulatorApp
from dagster_runway.emulator.config import EmulatorConfig
from dagster_runway.emulator.faults import FaultBook, FaultRule
from dagster_runway.emulator.holds import Holds
from dagster_runway.emulator.ledger import Ledger
from dagster_runway.emulator.persist import StateJournal
from dagster_runway.emulator.state import Store
from dagster_runway.emulator.worker import Worker

logger = logging.getLogger(__name__)

# How long a stop waits for answers in flight before dropping their connections.
_STOP_GRACE_SECONDS = 1.0
# How long stop() waits for the server thread before giving up with an error; it never takes this
# long unless something in the thread is stuck.
_STOP_TIMEOUT_SECONDS = 30.0


class Emulator:
    """A local RunComfy Model API on ``host:port`` (port 0 picks a free one).

    Use it as a context manager, or call ``start()`` and ``stop()``. The Python methods act on the
    running emulator from any thread.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self.port = port
        self._faults = FaultBook(self.config.faults, self.config.random_seed)
        self._holds = Holds()
        self._store = Store(self.config, on_change=self._wake)
        self._app = EmulatorApp(self.config, self._store, self._faults, self._holds)
        self._worker: Worker | None = None
        self._server: _Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._files_dir: Path | None = None
        # Guards _loop and _stopping, so that a stop() can never miss the loop coming up.
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def base_url(self) -> str:
        """The URL clients use, e.g. ``http://127.0.0.1:54321`` (loopback when bound to all interfaces)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def token(self) -> str:
        """The first configured API token."""
        return self.config.tokens[0]

    def start(self) -> Emulator:
        """Bind, serve in a background thread, and return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the emulator was already started; an Emulator runs once")
        journal = StateJournal(Path(self.config.state_dir).expanduser()) if self.config.state_dir else None
        try:
            if journal is not None:
                self._store.open(journal)
            sock = _bind(self.host, self.port)
        except BaseException:
            self._store.close()
            if journal is not None:
                journal.close()
            raise
        self.port = sock.getsockname()[1]
        if journal is not None:
            self._files_dir = journal.files_dir
        else:
            self._files_dir = Path(tempfile.mkdtemp(prefix="dagster-runway-emulator-"))
        self._pool = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="emulator-work"
        )
        self._worker = Worker(self._store, self.config, self._files_dir, self._pool)
        started = threading.Event()
        self._server = _Server(
            uvicorn.Config(
                self._app.asgi,
                loop="asyncio",
                lifespan="off",
                log_config=None,
                access_log=False,
                proxy_headers=False,
            ),
            on_started=started.set,
        )
        self._app.server_state = self._server.server_state
        failure: list[BaseException] = []
        thread = threading.Thread(
            target=self._serve, args=(sock, failure, started), name="runway-emulator", daemon=True
        )
        thread.start()
        with self._lock:  # only a started thread is published: stop() joins it
            self._thread = thread
        started.wait()
        if failure:
            self.stop()
            raise RuntimeError(f"the emulator failed to start on {self.host}:{self.port}") from failure[0]
        logger.info("emulator: serving on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving and finish or drop answers in flight (held ones are dropped). Without a state
        directory, the videos are deleted; with one, everything stays there for the next start."""
        with self._lock:
            thread, loop, server = self._thread, self._loop, self._server
            if thread is None:
                return
            self._stopping = True
        self._holds.drop_all()
        # Without a loop yet, _main sees _stopping once it sets one.
        if loop is not None and server is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(server.request_stop)
        thread.join(_STOP_TIMEOUT_SECONDS)
        if thread.is_alive():
            raise RuntimeError(
                f"the emulator on {self.base_url} did not stop within {_STOP_TIMEOUT_SECONDS:g} s: "
                "its server thread is stuck (a bug in the emulator)"
            )
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._store.close()
        if self._files_dir is not None and not self.config.state_dir:
            shutil.rmtree(self._files_dir, ignore_errors=True)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # State and control, from Python

    def ledger(self) -> Ledger:
        """Every accepted submit, with totals overall and per input fingerprint."""
        return self._store.ledger()

    def request_state(self, request_id: str) -> str:
        """A request's internal state: in_queue, in_progress, succeeded, failed, cancelled or expired.

        Raises KeyError for an id the emulator never issued.
        """
        return self._store.state_of(request_id)

    def request_times(self, request_id: str) -> tuple[float, float]:
        """The queue wait and render time drawn for a request at its submit (seconds, time scale applied),
        before any scheduling lag. Raises KeyError for an id the emulator never issued."""
        return self._store.times_of(request_id)

    def request_input(self, request_id: str) -> dict[str, Any]:
        """The input fields a request was submitted with, as the service received them (``promptText`` is
        absent when none was sent). Raises KeyError for an id the emulator never issued."""
        return self._store.input_of(request_id)

    def add_fault(self, rule: FaultRule) -> None:
        self._faults.add(rule)

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults(self) -> list[dict[str, Any]]:
        """The active fault rules, each with its remaining firings (None is unlimited)."""
        return self._faults.listing()

    def held(self) -> list[str]:
        """The request ids of the submit answers a ``hold`` fault holds now, oldest first."""
        return self._holds.held()

    def release(self, count: int | None = None) -> list[str]:
        """Send the oldest ``count`` held submit answers (all if None); return their request ids."""
        return self._holds.release(count)

    def wait_for_held(self, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Block until exactly ``count`` submit answers are held; return their request ids.

        Raises TimeoutError after ``timeout`` seconds. ``wait_for_held(0)`` waits for every held
        answer to be released, or its client to leave.
        """
        return self._holds.wait_for(count, timeout)

    def pause(self) -> None:
        """Freeze every request where it is (the emulator clock stops) until ``resume()``."""
        self._store.pause()

    def resume(self) -> None:
        self._store.resume()

    def reset(self) -> None:
        """Wipe requests, videos, ledger and faults, as at start: the pause state is the config's again
        and the random draws start again from the seed."""
        self._app.reset()

    # Internals

    def _wake(self) -> None:
        if self._worker is not None:
            self._worker.wake()

    def _serve(self, sock: socket.socket, failure: list[BaseException], started: threading.Event) -> None:
        try:
            asyncio.run(self._main(sock))
        except BaseException as exc:  # SystemExit from uvicorn's start-up too
            failure.append(exc)
            logger.error("emulator: the server stopped with an error", exc_info=exc)
        finally:
            started.set()
            sock.close()

    async def _main(self, sock: socket.socket) -> None:
        assert self._server is not None and self._worker is not None
        with self._lock:
            self._loop = asyncio.get_running_loop()
            if self._stopping:  # stop() came first: serve just long enough to start and stop cleanly
                self._server.request_stop()
        worker = asyncio.create_task(self._worker.run())
        try:
            await self._server.serve(sockets=[sock])
        finally:
            self._worker.close()
            await asyncio.gather(worker, return_exceptions=True)
            with self._lock:
                self._loop = None


class _Server(uvicorn.Server):
    """uvicorn's server that stops as soon as asked, instead of after its 0.1 s polls and waits."""

    def __init__(self, config: uvicorn.Config, on_started: Any) -> None:
        super().__init__(config)
        self._on_started = on_started
        # Made on the server's loop by main_loop; request_stop runs on that loop too.
        self._wakeup: asyncio.Event | None = None

    def request_stop(self) -> None:
        """Make the server stop now; call it on the server's loop."""
        self.should_exit = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()

    async def main_loop(self) -> None:
        # on_tick refreshes the Date header when its counter is a multiple of 10: once a second here.
        self._wakeup = asyncio.Event()
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wakeup.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # closes idle keep-alive connections now, busy ones after their answer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STOP_GRACE_SECONDS
        while self.server_state.connections and loop.time() < deadline:
            await asyncio.sleep(0.005)
        for connection in list(self.server_state.connections):
            connection.transport.abort()
        for task in list(self.server_state.tasks):
            task.cancel()
        await self.lifespan.shutdown()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; with
    # proto 0, every answer after the first on a keep-alive connection waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
