"""``dagster-runway dev`` as a user meets it: a subprocess that opens the UI on the demo's home.

Offline it starts the emulator and ``dagster dev`` together: the UI loads the pipeline, sensors turned
on from the UI make videos against that emulator (judged by its ledger, kept in the home), and stopping
the command leaves no process behind. The definitions the offline demo writes refuse to load without
the emulator it started; against the real service the session needs a spend cap or --yes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dagster_runway.emulator import Emulator, EmulatorConfig
from tests.browser import Browser
from tests.graphql_client import DagsterGraphQL, wait_until
from tests.pipeline_helpers import write_images

VIDEOS = "runway/videos"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(**extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "DAGSTER_HOME"))}
    return environment | {"DAGSTER_DISABLE_TELEMETRY": "1", **extra}


def _dev(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "dagster_runway.cli", "dev", "--dagster-home", str(tmp_path / "home"),
        "--images", str(tmp_path / "images"), "--output", str(tmp_path / "videos"), *args,
    ]  # fmt: skip


def _session_processes(session_leader: int) -> list[str]:
    """Every live process in the session of ``session_leader`` or in a process group it started."""
    found = subprocess.run(
        ["ps", "-eo", "pid=,sid=,pgid=,stat=,args="], capture_output=True, text=True
    ).stdout
    alive = []
    for line in found.splitlines():
        pid, sid, pgid, stat, command = line.split(None, 4)
        if stat.startswith("Z") or int(pid) == session_leader:
            continue
        if session_leader in (int(sid), int(pgid)):
            alive.append(f"{pid} {command}")
    return alive


def _billed(home: Path) -> int:
    """The ledger of the emulator the session ran, read back from the state it kept in the home."""
    with Emulator(EmulatorConfig(state_dir=str(home / "emulator"))) as emulator:
        return emulator.ledger().billed_submissions


@pytest.mark.deployment
def test_dev_opens_a_ui_that_makes_videos_against_the_emulator_and_stops_cleanly(tmp_path: Path) -> None:
    write_images(tmp_path / "images", valid=2, invalid=False)
    port = _free_port()
    process = subprocess.Popen(
        _dev(tmp_path, "--port", str(port), "--time-scale", "0"),
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=open(tmp_path / "dev.log", "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ui = DagsterGraphQL(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: _reachable(ui), bool, timeout=180, interval=1.0, what="the UI answers")
        (location,) = ui.locations()
        assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation", location
        ui.set_nux_seen()
        for sensor in ("runway_discovery_sensor", "runway_status_sensor"):
            ui.start_sensor(sensor)
        statuses = ui.wait_for_partitions(VIDEOS, count=2, timeout=300)
        assert len(statuses["materialized"]) == 2
        with Browser.from_env(log_dir=tmp_path / "browser") as browser:
            browser.open(
                f"http://127.0.0.1:{port}/assets/runway/videos",
                [
                    "Latest materialization",
                    "runway/state",
                    "collected",
                    "runway/request_id",
                    "runway/cost_usd",
                ],
            )
        metadata = ui.latest_materialization_metadata(VIDEOS, statuses["materialized"][0])
        assert metadata["runway/result_url"].startswith("http://127.0.0.1:"), metadata
    finally:
        ui.close()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    log = (tmp_path / "dev.log").read_text(errors="replace")
    assert code == 0, log
    assert "SupersessionWarning" not in log and "Dagster UI: http://127.0.0.1:" in log, log
    wait_until(lambda: _session_processes(process.pid), lambda alive: not alive, timeout=30, interval=0.5,
               what="every process of the session has ended")  # fmt: skip
    assert _billed(tmp_path / "home") == 2


def _reachable(ui: DagsterGraphQL) -> bool:
    try:
        ui.version()
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return True


def test_offline_definitions_refuse_to_load_without_their_emulator(tmp_path: Path) -> None:
    write_images(tmp_path / "images", valid=1, invalid=False)
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster_runway.cli",
            "demo",
            "--images",
            str(tmp_path / "images"),
            "--output",
            str(tmp_path / "videos"),
            "--dagster-home",
            str(tmp_path / "home"),
            "--time-scale",
            "0",
        ],  # fmt: skip
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"dagster-runway dev --dagster-home {tmp_path / 'home'}" in demo.stdout
    definitions = tmp_path / "home" / "definitions.py"
    load = subprocess.run(
        [sys.executable, str(definitions)], env=_environment(RUNCOMFY_API_TOKEN="rc-live-secret"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert load.returncode != 0
    assert (
        "runs only against its emulator" in load.stderr and "dagster-runway dev --dagster-home" in load.stderr
    )
    assert "model-api.runcomfy.net" not in definitions.read_text()


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({"RUNCOMFY_API_TOKEN": "rc-live-secret"}, (), "pass --yes, or --max-spend USD"),
        (
            {"RUNCOMFY_BASE_URL": "https://example.invalid"},
            ("--max-spend", "1"),
            "export RUNCOMFY_API_TOKEN=",
        ),
    ],
    ids=["no-cap", "no-token"],
)
def test_dev_against_the_real_service_needs_a_cap_and_a_token(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...], expected: str
) -> None:
    write_images(tmp_path / "images", valid=1, invalid=False)
    done = subprocess.run(
        _dev(tmp_path, *args), env=_environment(**env), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr and "rc-live-secret" not in done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "home" / "emulator").exists()  # nothing was started
