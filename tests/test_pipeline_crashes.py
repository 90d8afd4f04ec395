"""Money under real failures: runs in separate processes, at once, killed with real signals at controlled
points (the emulator holds submit answers on request). The emulator's ledger is the judge:

- billed equals the distinct valid inputs (no second payment);
- after one plain re-run every partition has a video or a classified failure;
- every paid request whose answer reached a process is collected or cancelled, and one whose answer
  never arrived is flagged ambiguous on its partition;
- every file under a final name decodes, and no temporary file survives a successful collect.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from dagster_runway.emulator import FaultRule
from dagster_runway.journal import CLAIMED, SUBMITTED, Journal
from dagster_runway.media import probe_video
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    PARTITIONS,
    latest_failure,
    make_defs,
    run_until_idle,
    video_metadata,
    write_images,
)

ROOT = Path(__file__).resolve().parent.parent


class World:
    """Images, an output, a Dagster home shared by every process, and the emulator they all call."""

    def __init__(self, tmp_path: Path, emulator: Any, images: int, **options: Any) -> None:
        self.emulator = emulator
        self.source, self.output = tmp_path / "images", tmp_path / "videos"
        write_images(self.source, valid=images, invalid=False)
        self.home = tmp_path / "home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        self.options = {"missing_prompt": "service_default", **options}
        self.keys = sorted(p.name for p in self.source.glob("*.png"))

    def params(self, action: str, **more: Any) -> dict[str, Any]:
        return {
            "action": action,
            "source": str(self.source),
            "output": str(self.output),
            "base_url": self.emulator.base_url,
            "token": self.emulator.token,
            "options": self.options,
            **more,
        }

    def spawn(self, action: str, **more: Any) -> subprocess.Popen[str]:
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "DAGSTER_DISABLE_TELEMETRY": "1"}
        return subprocess.Popen(
            [sys.executable, "-m", "tests.pipeline_process", json.dumps(self.params(action, **more))],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def submit_job(self, first: str, last: str) -> subprocess.Popen[str]:
        return self.spawn("job", job="runway_submit_job", range=[first, last])

    def instance(self) -> DagsterInstance:
        return DagsterInstance.from_config(str(self.home))

    def rerun(self) -> list[str]:
        """One plain re-run, as a user (or the daemon's next ticks) would do it."""
        with self.instance() as instance:
            daemon = LocalDaemon(
                make_defs(self.emulator, str(self.source), str(self.output), **self.options), instance
            )
            daemon.tick("runway_discovery_sensor")
            return run_until_idle(daemon)

    def journal(self) -> Journal:
        return Journal(f"{self.output}/.runway")

    def claims(self) -> list[Any]:
        found = []
        root = self.output / ".runway" / "claims"
        for folder in root.glob("*/*"):
            found.extend(self.journal().claims(folder.name))
        return found

    def add_partitions(self) -> None:
        with self.instance() as instance:
            instance.add_dynamic_partitions(PARTITIONS, self.keys)

    def outcome(self) -> dict[str, Any]:
        """Per partition: the video's request id, or the failure's class."""
        found: dict[str, Any] = {}
        with self.instance() as instance:
            for key in instance.get_dynamic_partitions(PARTITIONS):
                meta = video_metadata(instance, key)
                if meta is not None:
                    found[key] = ("video", meta["runway/request_id"])
                else:
                    failure = latest_failure(instance, key)
                    found[key] = ("failed", failure.failure_class if failure else None)
        return found

    def assert_videos_sound(self) -> None:
        assert not list(self.output.rglob("*.part")), "a temporary file survived"
        for video in self.output.glob("*.mp4"):
            assert probe_video(str(video)).decodable, video


def _finish(process: subprocess.Popen[str], timeout: float = 180) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return out


def _wait(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def world(tmp_path: Path, emulator) -> Iterator[Any]:
    def make(images: int, **options: Any) -> World:
        return World(tmp_path, emulator, images, **options)

    yield make


def _overlapped(w: World, outputs: list[str]) -> bool:
    """Whether the runs printed in ``outputs`` were all in progress at one moment."""
    with w.instance() as instance:
        records = [
            instance.get_run_record_by_id(json.loads(out.splitlines()[-1])["run_id"]) for out in outputs
        ]
    return max(r.start_time for r in records) < min(r.end_time for r in records)


def test_two_runs_over_the_same_partitions_at_once_pay_once(world, emulator) -> None:
    w = world(20)
    w.add_partitions()
    emulator.add_fault(
        FaultRule(kind="slow", endpoint="submit", delay_seconds=1.0)
    )  # accepted, answered late
    runs = [w.submit_job(w.keys[0], w.keys[-1]) for _ in range(2)]
    assert _overlapped(w, [_finish(run) for run in runs])
    emulator.clear_faults()
    ledger = emulator.ledger()
    assert ledger.billed_submissions == 20 and len(ledger.by_fingerprint) == 20
    assert w.rerun() == []
    assert all(kind == "video" for kind, _ in w.outcome().values())
    assert emulator.ledger().billed_submissions == 20
    w.assert_videos_sound()


def test_three_overlapping_runs_over_different_ranges_pay_once(world, emulator) -> None:
    w = world(15)
    w.add_partitions()
    k = w.keys
    emulator.add_fault(FaultRule(kind="slow", endpoint="submit", delay_seconds=1.0))
    runs = [w.submit_job(k[0], k[9]), w.submit_job(k[5], k[14]), w.submit_job(k[0], k[14])]
    assert _overlapped(w, [_finish(run) for run in runs])
    emulator.clear_faults()
    assert emulator.ledger().billed_submissions == 15
    assert w.rerun() == []
    assert len({rid for _, rid in w.outcome().values()}) == 15
    assert emulator.ledger().billed_submissions == 15


def test_the_spend_cap_holds_under_two_concurrent_runs(world, emulator) -> None:
    w = world(12, max_spend_usd=1.0)
    w.add_partitions()
    emulator.add_fault(FaultRule(kind="slow", endpoint="submit", delay_seconds=1.0))
    runs = [w.submit_job(w.keys[0], w.keys[-1]) for _ in range(2)]
    assert _overlapped(w, [_finish(run) for run in runs])
    emulator.clear_faults()
    ledger = emulator.ledger()
    assert ledger.billed_submissions == 4 and ledger.total_cost_usd == 1.0  # $1.00 / $0.25, never more
    w.rerun()
    outcome = w.outcome()
    assert sorted(kind for kind, _ in outcome.values()) == ["failed"] * 8 + ["video"] * 4
    assert {cls for kind, cls in outcome.values() if kind == "failed"} == {"spend_cap"}
    assert emulator.ledger().billed_submissions == 4


def test_sigint_mid_submit_cancels_every_request_the_run_received(world, emulator) -> None:
    w = world(3)
    w.add_partitions()
    emulator.pause()  # every request stays queued, so it can be cancelled
    emulator.add_fault(FaultRule(kind="hold", endpoint="submit"))
    run = w.submit_job(w.keys[0], w.keys[-1])
    emulator.wait_for_held(3, timeout=60)
    run.send_signal(signal.SIGINT)
    time.sleep(0.5)
    emulator.clear_faults()
    emulator.release()  # the answers reach the run while it stops: it must record and cancel them all
    run.communicate(timeout=120)
    ledger = emulator.ledger()
    assert ledger.submissions == 3 and ledger.billed_submissions == 0  # all cancelled, all refunded
    assert {e.state for e in ledger.entries} == {"cancelled"}
    assert sorted(c.state for c in w.claims()) == [SUBMITTED] * 3  # recorded the moment they arrived

    emulator.resume()
    assert w.rerun() == []
    assert all(kind == "video" for kind, _ in w.outcome().values())
    assert emulator.ledger().billed_submissions == 3


def test_sigkill_of_the_driver_during_submits_then_one_plain_rerun(world, emulator) -> None:
    w = world(10)
    emulator.add_fault(FaultRule(kind="hold", endpoint="submit", times=4))
    driver = w.spawn("drive")
    emulator.wait_for_held(4, timeout=120)
    _wait(lambda: sum(c.state == SUBMITTED for c in w.claims()) == 6, "six answers to be journaled")
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=30)
    emulator.clear_faults()
    emulator.release()  # their client is gone: billed, and nobody will ever read the answer
    assert emulator.ledger().billed_submissions == 10
    held_open = {c.partition for c in w.claims() if c.state == CLAIMED}
    assert len(held_open) == 4

    w.rerun()
    outcome = w.outcome()
    assert len(outcome) == 10
    answered = {k: v for k, v in outcome.items() if k not in held_open}
    assert all(kind == "video" for kind, _ in answered.values())  # every answer that arrived is collected
    assert {outcome[k] for k in held_open} == {("failed", "ambiguous")}  # and the lost ones are flagged
    assert emulator.ledger().billed_submissions == 10  # nothing paid twice
    with w.instance() as instance:
        failure = latest_failure(instance, sorted(held_open)[0])
    assert "force_after_ambiguous: true" in failure.next_step
    w.assert_videos_sound()


def test_sigkill_during_the_first_collect_run_then_one_plain_rerun(world, emulator) -> None:
    w = world(5)
    emulator.add_fault(FaultRule(kind="slow", endpoint="files", times=5, delay_seconds=60))
    driver = w.spawn("drive")
    _wait(lambda: emulator.faults()[0]["remaining"] < 5, "the first collect run to start downloading", 120)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=30)
    emulator.clear_faults()
    assert emulator.ledger().billed_submissions == 5
    (w.output / f".{w.keys[0]}.mp4.999999.dead.part").write_bytes(b"partial")  # what a killed download leaves
    assert w.rerun() == []
    assert all(kind == "video" for kind, _ in w.outcome().values())
    assert emulator.ledger().billed_submissions == 5
    w.assert_videos_sound()


def test_an_error_body_served_as_a_video_is_never_published_and_is_collected_again(world, emulator) -> None:
    w = world(2)
    emulator.add_fault(FaultRule(kind="error_code_200", endpoint="files", times=1))
    failed = w.rerun()
    assert len(failed) == 1  # the collect that refused the error body; the status sensor collected it again
    outcome = w.outcome()
    assert all(kind == "video" for kind, _ in outcome.values())
    assert emulator.ledger().billed_submissions == 2
    w.assert_videos_sound()
