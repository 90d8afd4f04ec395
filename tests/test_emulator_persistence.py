"""A state directory keeps requests, videos, the ledger and the clock across restarts, and kills."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from dagster_runway.emulator import Emulator, EmulatorConfig, FaultRule, StateDirError
from tests.fixtures.emulator import INSTANT, Api, EmulatorProcess, ImageServer, data_uri, make_png

Factory = Callable[..., Emulator]
Connect = Callable[..., Api]
Launch = Callable[..., EmulatorProcess]

IMAGE = data_uri(make_png())


def wait_until(condition: Callable[[], Any], what: str) -> Any:
    """Poll until ``condition()`` is truthy and return it; fail after a generous deadline."""
    deadline = time.monotonic() + 30
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)
    return value


def without_outcome(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key not in ("state", "video_sha256", "video_bytes")}


def test_a_killed_emulator_restarts_with_its_requests_videos_and_ledger(
    emulator_process: Launch,
    http_api: Connect,
    image_server: ImageServer,
    plain_http: httpx.Client,
    tmp_path: Path,
) -> None:
    # In progress for 0.3 to 0.9 s, after a queue wait of at most 0.05 s.
    options = ["--state-dir", str(tmp_path / "state"), "--time-scale", "0.01"]
    first = emulator_process("--port", "0", *options)
    api = http_api(first)

    done = api.submit_id({"promptImage": IMAGE, "duration": 10})
    done_result = api.finish(done)
    assert done_result["status"] == "succeeded"
    video_url = done_result["output"]["video"]
    video = plain_http.get(video_url).content

    # The image server holds back this image, so that the request is in progress, its video not
    # rendered, when the emulator is killed.
    image = make_png(80, 60, (20, 160, 90))
    image_server.serve("/slow.png", image, delay=60)
    running = api.submit_id({"promptImage": f"{image_server.base_url}/slow.png", "seed": 5})
    wait_until(lambda: "/slow.png" in image_server.requests, "the worker to fetch the image")
    assert api.status(running).json()["status"] == "in_progress"
    ledger = plain_http.get(f"{first.base_url}/_emulator/ledger").json()

    first.kill()
    image_server.serve("/slow.png", image)  # served at once from now on
    second = emulator_process("--port", str(first.port), *options)
    assert second.base_url == first.base_url
    api = http_api(second)

    assert api.result(done, include_cost=True).json() == done_result  # timings, output, cost
    assert plain_http.get(video_url).content == video  # the URL from before the kill still works
    # The same ledger, but for what the running request's render may have changed meanwhile.
    restored = plain_http.get(f"{second.base_url}/_emulator/ledger").json()
    assert [without_outcome(e) for e in restored["entries"]] == [
        without_outcome(e) for e in ledger["entries"]
    ]
    assert restored["entries"][0] == ledger["entries"][0]
    assert restored["total_cost_usd"] == ledger["total_cost_usd"] == pytest.approx(0.75)

    finished = api.finish(running)
    assert finished["status"] == "succeeded" and finished["cost"] == pytest.approx(0.25)
    assert image_server.requests.count("/slow.png") == 2  # fetched and rendered again after the restart
    rendered = plain_http.get(finished["output"]["video"]).content
    entries = {
        e["request_id"]: e for e in plain_http.get(f"{second.base_url}/_emulator/ledger").json()["entries"]
    }
    assert entries[running]["video_sha256"] == hashlib.sha256(rendered).hexdigest()
    assert entries[running]["submitted_at"] == ledger["entries"][1]["submitted_at"]
    assert second.stop() == 0


def test_a_submit_is_on_disk_before_its_answer_is_sent(
    emulator_process: Launch, http_api: Connect, plain_http: httpx.Client, tmp_path: Path
) -> None:
    options = ["--state-dir", str(tmp_path / "state"), "--time-scale", "0"]
    first = emulator_process("--port", "0", *options, "--fault", "hold")
    outcome: list[BaseException | httpx.Response] = []

    def submit() -> None:
        try:
            outcome.append(http_api(first).submit({"promptImage": IMAGE}))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    client = threading.Thread(target=submit)
    client.start()
    held = wait_until(
        lambda: plain_http.get(f"{first.base_url}/_emulator/held").json()["request_ids"], "a held answer"
    )
    first.kill()  # accepted and billed, never answered
    client.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError)

    second = emulator_process("--port", "0", *options)
    ledger = plain_http.get(f"{second.base_url}/_emulator/ledger").json()
    assert [entry["request_id"] for entry in ledger["entries"]] == held
    assert ledger["billed_submissions"] == 1
    assert http_api(second).finish(held[0])["status"] == "succeeded"


def test_a_restart_keeps_refunds_failures_and_a_paused_clock(
    emulator_factory: Factory, http_api: Connect, tmp_path: Path
) -> None:
    state = {"state_dir": str(tmp_path)}
    first = emulator_factory(**state)
    first.add_fault(FaultRule(kind="generation_failed", failure_code="SAFETY.INPUT.TEXT", match_seed=13))
    api = http_api(first)
    failed = api.finish(api.submit_id({"promptImage": IMAGE, "seed": 13}))
    first.pause()
    queued, cancelled = (api.submit_id({"promptImage": IMAGE, "seed": n}) for n in (1, 2))
    assert api.cancel(cancelled).json()["outcome"] == "cancelled"
    ledger = first.ledger()
    first.stop()

    second = emulator_factory(**state)  # a new Emulator, in this process, on the same directory
    api = http_api(second)
    assert second.ledger() == ledger
    assert api.result(failed["request_id"], include_cost=True).json() == failed
    assert failed["error"]["code"] == "SAFETY.INPUT.TEXT"
    assert [second.request_state(r) for r in (queued, cancelled)] == ["in_queue", "cancelled"]
    assert api.status(queued).json()["queue_position"] == 1  # still paused
    assert second.ledger().total_cost_usd == pytest.approx(0.5)  # the refund stays refunded
    second.resume()
    assert api.finish(queued)["status"] == "succeeded"
    second.reset()
    second.stop()

    third = emulator_factory(**state)
    assert third.ledger().submissions == 0 and list((tmp_path / "files").iterdir()) == []
    api = http_api(third)
    assert (
        api.finish(api.submit_id({"promptImage": IMAGE}))["status"] == "succeeded"
    )  # not paused since the reset


def test_one_emulator_at_a_time_on_a_state_directory(emulator_factory: Factory, tmp_path: Path) -> None:
    emulator_factory(state_dir=str(tmp_path))
    with pytest.raises(StateDirError, match="another emulator"):
        Emulator(EmulatorConfig(**INSTANT, state_dir=str(tmp_path))).start()
    command = [sys.executable, "-m", "dagster_runway.emulator", "--port", "0", "--state-dir", str(tmp_path)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (
        refused.returncode == 1 and "another emulator" in refused.stderr and "Traceback" not in refused.stderr
    )
