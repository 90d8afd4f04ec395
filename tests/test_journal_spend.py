"""The spend log under skewed host clocks and damage: a rolling cap holds whatever the hosts' clocks
say, and a damaged entry or claim stops with an error naming the file instead of looping."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dagster_runway.journal import (
    CLAIMED,
    REJECTED,
    Claim,
    ClaimTaken,
    Journal,
    JournalDamaged,
    Owner,
    SpendCap,
    SpendCapReached,
)

HOUR = 3600.0


def _fp(i: int) -> str:
    return f"{i:04x}" + "a" * 60


def _try(journal: Journal, i: int, cap: SpendCap) -> bool:
    try:
        journal.claim(
            _fp(i), 1, partition=f"{i}.png", owner=Owner.current(), estimate_usd=0.25, input={}, cap=cap
        )
    except SpendCapReached:
        return False
    return True


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("skew_h", [2.0, -2.0])
def test_hosts_whose_clocks_are_hours_apart_never_pass_a_rolling_cap(
    tmp_path: Path, skew_h: float, store: str, request: pytest.FixtureRequest
) -> None:
    """Two hosts 2 h apart take turns within seconds of each other: $1.00 per hour allows four $0.25
    submits in all, whichever host goes first (before, the ahead host's view let $2.00 through)."""
    root, options = str(tmp_path / "journal"), {}
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        root, options = s3.url(".runway"), s3.storage_options
    here = Journal(root, options)
    there = Journal(root, options, clock=lambda: time.time() + skew_h * HOUR)
    cap = SpendCap(max_usd=1.0, window_s=HOUR)
    taken = [_try(journal, i, cap) for i, journal in enumerate([there, here] * 4)]
    assert taken.count(True) == 4
    assert here.spent_usd(HOUR) == there.spent_usd(HOUR) == 1.0
    with pytest.raises(SpendCapReached) as refused:
        there.claim(
            _fp(99), 1, partition="99.png", owner=Owner.current(), estimate_usd=0.25, input={}, cap=cap
        )
    # when it fits again is said on the caller's own clock: about an hour from its now
    assert refused.value.retry_at is not None
    assert 0.9 * HOUR < refused.value.retry_at - (time.time() + skew_h * HOUR) <= HOUR + 2


def test_the_log_is_stamped_by_the_store_and_never_goes_back(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    ahead, behind = (
        Journal(str(root), clock=lambda: time.time() + 2 * HOUR),
        Journal(str(root), clock=lambda: time.time() - 2 * HOUR),
    )
    for i, journal in enumerate([ahead, behind, ahead, behind]):
        _try(journal, i, SpendCap(max_usd=10.0))
    stamps = [json.loads(p.read_text())["at"] for p in sorted((root / "spend").rglob("*.json"))]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 600  # the store's clock, not ±2 h


def _spend_files(root: Path) -> list[Path]:
    return sorted((root / "spend").rglob("*.json"))


def test_a_truncated_newest_spend_entry_fails_the_claim_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    journal = Journal(str(root))
    for i in range(3):
        _try(journal, i, SpendCap(max_usd=10.0))
    newest = _spend_files(root)[-1]
    newest.write_bytes(newest.read_bytes()[:17])  # a full disk or a copy cut it short

    fresh = Journal(str(root))
    with pytest.raises(JournalDamaged) as damaged:
        fresh.claim(_fp(7), 1, partition="7.png", owner=Owner.current(), estimate_usd=0.25, input={})
    assert damaged.value.path == str(newest)
    message = str(damaged.value)
    assert str(newest) in message and "written whole" in message
    assert "restore it from a backup" in message and "drops that one reservation" in message
    # nothing was sent: the attempt is free again, not left open to turn "ambiguous"
    refused = fresh.read(_fp(7), 1)
    assert refused is not None and refused.state == REJECTED and "not sent" in (refused.reason or "")

    newest.unlink()  # the fix the message names
    assert _try(Journal(str(root)), 8, SpendCap(max_usd=10.0))
    assert Journal(str(root)).spent_usd() == 0.75  # two of the three older reservations, and the new one


def test_a_truncated_claim_is_damage_naming_the_file_not_a_claim_being_written(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal"))
    claim = journal.claim(
        _fp(1), 1, partition="1.png", owner=Owner.current(), estimate_usd=0.25, input={"seed": 3}
    )
    path = Path(journal.claim_path(claim.fingerprint, 1))
    path.write_bytes(path.read_bytes()[:40])
    for read in (
        lambda: journal.latest(_fp(1)),
        lambda: journal.read(_fp(1), 1),
        lambda: journal.claims(_fp(1)),
    ):
        with pytest.raises(JournalDamaged) as damaged:
            read()
        assert damaged.value.path == str(path) and str(path) in str(damaged.value)
        assert "removing a claim frees its attempt" in str(damaged.value)
    with pytest.raises(JournalDamaged):  # not ClaimTaken(None): the submit step names the file
        journal.claim(_fp(1), 1, partition="1.png", owner=Owner.current(), estimate_usd=0.25, input={})
    journal.claim(_fp(2), 1, partition="2.png", owner=Owner.current(), estimate_usd=0.25, input={})
    with pytest.raises(ClaimTaken):  # a readable claim is still simply taken
        journal.claim(_fp(2), 1, partition="2.png", owner=Owner.current(), estimate_usd=0.25, input={})


def test_a_claim_written_before_writer_nonces_still_reads(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal"))
    path = Path(journal.claim_path(_fp(1), 1))
    path.parent.mkdir(parents=True)
    old = {
        "fingerprint": _fp(1),
        "attempt": 1,
        "state": CLAIMED,
        "partition": "1.png",
        "owner": {"run_id": None, "host": "h", "pid": 1},
        "claimed_at": 1.0,
        "estimate_usd": 0.25,
        "input": {},
        "request_id": None,
        "answered_at": None,
        "reason": None,
    }
    path.write_text(json.dumps(old))
    claim = journal.latest(_fp(1))
    assert isinstance(claim, Claim) and claim.nonce == "" and claim.state == CLAIMED
