"""The emulator's command line: fault parsing, and ``run`` serving in the foreground of a subprocess."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import httpx
import pytest

from dagster_runway.emulator import FaultRule
from dagster_runway.emulator.cli import _config, add_arguments, parse_fault
from tests.fixtures.emulator import MODEL_PATH, data_uri, make_png


def test_parse_fault_reads_kind_and_parameters() -> None:
    assert parse_fault("rate_limit:endpoint=submit,rate=0.1,retry_after=2") == FaultRule(
        kind="rate_limit", endpoint="submit", rate=0.1, retry_after=2
    )
    assert parse_fault("reset") == FaultRule(kind="reset")
    assert parse_fault("server_error:status=502,after_accept=true,times=none") == FaultRule(
        kind="server_error", status=502, after_accept=True
    )


@pytest.mark.parametrize(
    "text", ["explode", "rate_limit:rate", "rate_limit:rate=2", "slow:endpoint=everywhere"]
)
def test_parse_fault_refuses_bad_rules(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="fault"):
        parse_fault(text)


def test_the_options_map_onto_the_config() -> None:
    parser = argparse.ArgumentParser(prog="dagster-runway emulator")
    add_arguments(parser)
    args = parser.parse_args(
        ["--port", "0", "--token", "a", "--token", "b", "--time-scale", "0", "--fault", "reset"]
    )
    assert (args.port, args.tokens, args.time_scale, args.faults) == (
        0,
        ["a", "b"],
        0.0,
        [FaultRule(kind="reset")],
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault", "explode"])


def test_state_dir_maps_onto_the_config() -> None:
    parser = argparse.ArgumentParser(prog="dagster-runway emulator")
    add_arguments(parser)
    assert _config(parser.parse_args(["--state-dir", "/var/emulator"])).state_dir == "/var/emulator"
    assert _config(parser.parse_args([])).state_dir is None


def test_run_serves_in_the_foreground_until_interrupted() -> None:
    command = [
        sys.executable,
        "-m",
        "dagster_runway.emulator",
        "--port",
        "0",
        "--token",
        "cli-token",
        "--token",
        "second-token",
        "--time-scale",
        "0",
        "--price-per-second",
        "0.1",
        "--fault",
        "rate_limit:endpoint=submit,times=1,retry_after=2",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(2)]
        assert banner[0].startswith("RunComfy emulator serving on http://127.0.0.1:"), banner
        assert banner[1].strip() == "API token: cli-token"
        base_url = banner[0].split()[-1]
        with httpx.Client(base_url=base_url, headers={"Authorization": "Bearer second-token"}) as client:
            body = {"promptImage": data_uri(make_png())}
            limited = client.post(MODEL_PATH, json=body)
            assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
            assert client.post(MODEL_PATH, json=body).status_code == 200
            assert client.get(f"{base_url}/_emulator/ledger").json()["total_cost_usd"] == pytest.approx(0.5)
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in errors


def test_run_refuses_a_bad_option() -> None:
    command = [sys.executable, "-m", "dagster_runway.emulator", "--time-scale", "-1"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert finished.returncode == 2 and "time_scale" in finished.stderr and "Traceback" not in finished.stderr
