"""Starting and stopping emulators: stop always returns, whatever is in flight and whoever calls it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from dagster_runway.emulator import Emulator, EmulatorConfig, FaultRule, account_id
from dagster_runway.emulator.inputs import validate_input
from dagster_runway.emulator.state import Store
from dagster_runway.emulator.worker import Worker
from tests.fixtures.emulator import INSTANT, MODEL_PATH, TLS, data_uri, make_png

IMAGE = data_uri(make_png())


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_the_worker_ends_when_stopped_in_the_loop_iteration_of_a_wake_up(tmp_path: Path, how: str) -> None:
    # The hang of Emulator.stop(): on Python 3.11, asyncio.wait_for returns normally when the cancel
    # and the wake-up land in the same loop iteration, and the worker then waited forever.
    config = EmulatorConfig(queue_seconds=(100, 100), random_seed=0)
    store = Store(config, on_change=lambda: None)
    # A queued request, so that the worker sleeps with a timeout (its next deadline).
    store.submit(account_id("t"), validate_input({"promptImage": IMAGE}, allow_any_http=False), "m", None)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            worker = Worker(store, config, tmp_path, pool)
            task = asyncio.create_task(worker.run())
            for _ in range(3):
                await asyncio.sleep(0)  # the worker is now asleep until the deadline
            worker.wake()  # as a render ending, or another thread's resume(), does
            await asyncio.sleep(0)  # the wake-up is delivered in this iteration
            if how == "close":
                worker.close()
            else:
                task.cancel()
            async with asyncio.timeout(10):
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_stop_before_the_loop_is_up_still_stops() -> None:
    for _ in range(20):
        emulator = Emulator(EmulatorConfig(**INSTANT))
        stopper = threading.Thread(target=emulator.stop)
        starting = threading.Thread(target=emulator.start)
        starting.start()
        stopper.start()  # races start(): before, during or after the loop comes up
        starting.join()
        stopper.join()
        emulator.stop()  # whichever came first, this one returns, and so would a second
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{emulator.base_url}/_emulator/ledger", timeout=5)


def _cycle(index: int, tmp_path: Path) -> None:
    """Start an emulator, leave it busy in one of six ways, and stop it."""
    mode = index % 6
    overrides: dict[str, Any] = {"random_seed": index, "max_concurrency": 2}
    if mode == 3:  # requests stay in progress (rendering, or waiting out their render time) at the stop
        overrides |= {"time_scale": 0.01, "render_seconds": (50, 50)}
    if mode == 5:  # kept on disk; started again below, rendering again what was cut short
        overrides |= {"state_dir": str(tmp_path / str(index))}
    config = EmulatorConfig(**INSTANT | overrides)
    emulator = Emulator(config).start()
    waking = threading.Event()
    try:
        headers = {"Authorization": f"Bearer {emulator.token}"}
        with httpx.Client(base_url=emulator.base_url, headers=headers, verify=TLS) as client:
            for seed in range(3 if mode in (1, 2, 3, 5) else 0):  # renders in flight at the stop
                response = client.post(MODEL_PATH, json={"promptImage": IMAGE, "seed": seed})
                assert response.status_code == 200
        if mode == 4:  # two submit answers held at the stop
            emulator.add_fault(FaultRule(kind="hold"))
            for _ in range(2):
                threading.Thread(target=_submit_quietly, args=(emulator,), daemon=True).start()
            emulator.wait_for_held(2)
        if mode == 2:  # another thread wakes the worker all through the stop
            waking.set()
            threading.Thread(target=_wake_while, args=(emulator, waking), daemon=True).start()
        emulator.stop()
        if mode == 5:
            Emulator(config).start().stop()
    finally:
        waking.clear()
        emulator.stop()


def _submit_quietly(emulator: Emulator) -> None:
    headers = {"Authorization": f"Bearer {emulator.token}"}
    with contextlib.suppress(httpx.HTTPError):  # the stop drops the held answer
        httpx.post(
            f"{emulator.base_url}{MODEL_PATH}", json={"promptImage": IMAGE}, headers=headers, timeout=30
        )


def _wake_while(emulator: Emulator, waking: threading.Event) -> None:
    while waking.is_set():
        emulator.resume()


def test_many_emulators_start_and_stop_in_threads(tmp_path: Path) -> None:
    threads, per_thread = 4, 6
    errors: list[BaseException] = []

    def run(offset: int) -> None:
        try:
            for n in range(per_thread):
                _cycle(offset * per_thread + n, tmp_path)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(offset,), daemon=True) for offset in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)  # stop() gives up with an error well before this
    assert not errors, errors
    assert not any(worker.is_alive() for worker in workers)
