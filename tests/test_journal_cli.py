"""``dagster-runway journal`` as an operator meets it: list what needs them, show an image's attempts,
adopt a request found in the RunComfy history (so it is collected, never paid again), sum the spend."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dagster_runway.journal import AMBIGUOUS, REJECTED, SUBMITTED, Journal, JournalError, Owner

FP_DONE, FP_LOST, FP_GONE, FP_FREE = ("aa" + c * 62 for c in "1234")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with no RunComfy settings in its environment but those given."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCOMFY_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "dagster_runway.journal_cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env=environment,
    )


def _dead_owner() -> Owner:
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    assert process.pid is not None
    return Owner(run_id="run-dead", host=socket.gethostname(), pid=process.pid)


@pytest.fixture
def output(tmp_path: Path) -> Path:
    """An output folder whose journal holds one image of each kind."""
    journal = Journal(str(tmp_path / "out" / ".runway"))
    me = Owner.current("run-1")

    def claim(fingerprint: str, seed: int, owner: Owner = me, attempt: int = 1):
        return journal.claim(
            fingerprint,
            attempt,
            partition=f"{seed}.png",
            owner=owner,
            estimate_usd=0.25,
            input={"seed": seed},
        )

    journal.record_submitted(claim(FP_DONE, 1), "req-done")
    journal.record_rejected(claim(FP_LOST, 2), "422: bad ratio")
    journal.record_ambiguous(claim(FP_LOST, 2, attempt=2), "the connection was reset after the body was sent")
    claim(FP_GONE, 3, owner=_dead_owner())  # its run was killed mid-submit
    journal.record_rejected(claim(FP_FREE, 4), "not sent: the run was stopped")
    return tmp_path / "out"


def test_list_puts_what_needs_the_operator_first_with_the_seed_and_time(output: Path) -> None:
    listed = _cli("list", "--output", str(output))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "STATE",
        "PARTITION",
        "FINGERPRINT",
        "ATTEMPT",
        "CLAIMED",
        "AT",
        "(UTC)",
        "SEED",
        "OWNER",
        "REQUEST",
        "ID",
    ]
    assert lines[1].startswith(AMBIGUOUS) and FP_LOST[:12] in lines[1] and " 2 " in lines[1]
    assert (
        lines[2].startswith("claimed (owner gone)")
        and FP_GONE[:12] in lines[2]
        and "run run-dead" in lines[2]
    )
    assert any(FP_DONE[:12] in line and "req-done" in line for line in lines[3:5])
    assert time.strftime("%Y-%m-%d", time.gmtime()) in lines[1]
    assert "adopt FINGERPRINT REQUEST_ID" in listed.stdout


def test_show_prints_every_attempt_of_a_fingerprint_from_a_prefix(output: Path) -> None:
    shown = _cli("show", FP_LOST[:12], "--journal", str(output / ".runway"))
    assert shown.returncode == 0, shown.stderr
    records = json.loads("[" + shown.stdout.replace("}\n{", "},\n{") + "]")
    assert [r["attempt"] for r in records] == [1, 2] and records[1]["file"].endswith("0002.json")
    assert shown.stdout.count('"attempt"') == 2 and REJECTED in shown.stdout and AMBIGUOUS in shown.stdout
    assert "0002.json" in shown.stdout and "connection was reset" in shown.stdout


def test_adopting_an_ambiguous_attempt_records_the_request_so_it_is_collected(output: Path) -> None:
    adopted = _cli(
        "adopt",
        FP_LOST[:12],
        "req-found-1",
        "--output",
        str(output),
        "--note",
        "seed 2 at 10:02",
        "--no-check",
    )
    assert adopted.returncode == 0, adopted.stderr
    assert "request req-found-1" in adopted.stdout and "collects it instead of paying again" in adopted.stdout
    claim = Journal(str(output / ".runway")).latest(FP_LOST)
    assert claim is not None and claim.state == SUBMITTED and claim.request_id == "req-found-1"
    assert claim.attempt == 2 and "adopted by the operator: seed 2 at 10:02" in (claim.reason or "")
    assert "was ambiguous" in (claim.reason or "")

    gone = _cli("adopt", FP_GONE, "req-found-2", "--attempt", "1", "--output", str(output), "--no-check")
    assert gone.returncode == 0, gone.stderr
    assert Journal(str(output / ".runway")).latest(FP_GONE).request_id == "req-found-2"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["adopt", FP_DONE, "req-x"], "is submitted (request req-done), not ambiguous"),
        (["adopt", FP_FREE, "req-x"], "is rejected (nothing was billed)"),
        (["adopt", FP_LOST, "req x/../1"], "is not 1-128 characters of [A-Za-z0-9_-]"),
        (["adopt", FP_LOST, "req-x", "--attempt", "9"], "attempt 9 of"),
        (["adopt", "ff", "req-x"], "no claims of a fingerprint starting 'ff'"),
        (["adopt", "aa", "req-x"], "4 fingerprints start 'aa'; give more of it"),
        (["show", "a"], "too short"),
        (["spend", "--window-h", "0"], "must be more than 0 hours"),
        (["list", "--storage-options", "{nope"], "--storage-options is not JSON"),
        (["list", "--storage-options", "[]"], "must be a JSON object"),
    ],
)
def test_a_wrong_command_is_one_line_naming_it_and_the_fix(output: Path, args: list[str], says: str) -> None:
    before = Journal(str(output / ".runway")).latest(FP_DONE)
    done = _cli(*args, "--output", str(output))
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("dagster-runway journal: error: ") and says in line
    assert Journal(str(output / ".runway")).latest(FP_DONE) == before


def test_where_the_journal_is_must_be_said(tmp_path: Path) -> None:
    done = _cli("list")
    assert done.returncode == 2 and "--journal URL, or --output URL" in done.stderr


def test_spend_sums_all_and_a_window(output: Path) -> None:
    done = _cli("spend", "--output", str(output), "--window-h", "1")
    assert done.returncode == 0, done.stderr
    # three $0.25 reservations stand (the answered, the ambiguous and the open attempt); the rejected are refunded
    assert "spent in all: $0.75" in done.stdout and "spent in the last 1 h: $0.75" in done.stdout


def test_a_damaged_claim_is_named_in_the_listing_and_the_rest_is_listed(output: Path) -> None:
    journal = Journal(str(output / ".runway"))
    path = Path(journal.claim_path(FP_DONE, 1))
    path.write_bytes(path.read_bytes()[:30])
    done = _cli("list", "--output", str(output))
    assert done.returncode == 2 and FP_LOST[:12] in done.stdout
    assert str(path) in done.stderr and "restore it from a backup" in done.stderr


def test_adopt_refuses_an_attempt_whose_owner_still_runs(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal"))
    journal.claim(FP_LOST, 1, partition="a.png", owner=Owner.current(), estimate_usd=0.25, input={})
    with pytest.raises(JournalError, match="still held by .* which is running"):
        journal.adopt(FP_LOST, 1, "req-1")


def test_adopt_asks_the_service_first_and_a_request_it_never_issued_leaves_the_attempt_ambiguous(
    output: Path, emulator
) -> None:
    from dagster_runway.client import RunComfyClient
    from tests.test_client import png_data_uri

    with RunComfyClient(api_token=emulator.token, base_url=emulator.base_url) as client:
        real = client.submit({"promptImage": png_data_uri()}).request_id
    service = {"RUNCOMFY_API_TOKEN": emulator.token, "RUNCOMFY_BASE_URL": emulator.base_url}
    journal = Journal(str(output / ".runway"))

    unchecked = _cli("adopt", FP_LOST, "req-typo", "--output", str(output), env={})
    assert (
        unchecked.returncode == 2
        and "set RUNCOMFY_API_TOKEN" in unchecked.stderr
        and "--no-check" in unchecked.stderr
    )
    typo = _cli("adopt", FP_LOST, "req-typo", "--output", str(output), env=service)
    assert typo.returncode == 2 and "does not know request 'req-typo'" in typo.stderr, typo.stderr
    assert emulator.token not in typo.stderr + typo.stdout
    assert (
        journal.read(FP_LOST, 2).state == AMBIGUOUS
    )  # nothing was adopted: a later run still refuses to pay

    adopted = _cli("adopt", FP_LOST, real, "--output", str(output), env=service)
    assert adopted.returncode == 0, adopted.stderr
    assert journal.read(FP_LOST, 2).request_id == real and journal.read(FP_LOST, 2).state == SUBMITTED
