"""The submission journal: exclusive claims and a spend cap that hold across processes, locally and on S3."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from dagster_runway.journal import (
    AMBIGUOUS,
    CLAIMED,
    REJECTED,
    SUBMITTED,
    ClaimTaken,
    Journal,
    Owner,
    SpendCap,
    SpendCapReached,
    wait_for_answer,
)

FP = "ab" + "0" * 62


def _journal(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if kind == "local":
        return str(tmp_path / "journal"), {}
    s3 = request.getfixturevalue("s3")
    return s3.url("journal"), s3.storage_options


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    return _journal(request.param, tmp_path, request)


def _claim(journal: Journal, attempt: int = 1, fingerprint: str = FP, **kwargs: Any):
    return journal.claim(
        fingerprint,
        attempt,
        partition="a.png",
        owner=Owner.current("run-1"),
        estimate_usd=kwargs.pop("estimate_usd", 0.25),
        input={"duration": 5, "seed": 7},
        **kwargs,
    )


def test_a_claim_is_exclusive_and_carries_its_answer(where) -> None:
    url, options = where
    journal = Journal(url, options)
    claim = _claim(journal)
    assert claim.state == CLAIMED and journal.latest(FP) == claim
    with pytest.raises(ClaimTaken) as taken:
        _claim(Journal(url, options))
    assert taken.value.claim == claim

    answered = journal.record_submitted(claim, "req-1")
    assert Journal(url, options).latest(FP) == answered
    assert answered.state == SUBMITTED and answered.request_id == "req-1" and answered.answered_at

    second = _claim(journal, attempt=2)
    ambiguous = journal.record_ambiguous(second, "the connection was reset after the body was sent")
    assert [c.state for c in journal.claims(FP)] == [SUBMITTED, AMBIGUOUS]
    assert journal.latest(FP) == ambiguous


def test_spend_is_reserved_at_claim_settled_once_and_refunded_when_rejected(where) -> None:
    url, options = where
    journal = Journal(url, options)
    first = journal.record_submitted(_claim(journal, estimate_usd=0.25), "req-1")
    assert journal.spent_usd() == 0.25
    assert journal.settle(first, 0.30) and not journal.settle(first, 0.30)
    assert journal.spent_usd() == 0.30
    rejected = journal.record_rejected(_claim(journal, attempt=2, estimate_usd=0.5), "422: bad ratio")
    assert rejected.state == REJECTED
    assert Journal(url, options).spent_usd() == 0.30  # a fresh reader finds the same tip


def test_the_cap_refuses_before_anything_is_sent_and_frees_the_attempt(where) -> None:
    url, options = where
    journal = Journal(url, options)
    cap = SpendCap(max_usd=0.5)
    _claim(journal, fingerprint="aa" + "1" * 62, cap=cap)
    _claim(journal, fingerprint="aa" + "2" * 62, cap=cap)
    with pytest.raises(SpendCapReached) as refused:
        _claim(journal, fingerprint="aa" + "3" * 62, cap=cap)
    assert "spend cap reached: $0.50 of $0.50" in str(refused.value) and "Raise max_spend_usd" in str(
        refused.value
    )
    assert journal.latest("aa" + "3" * 62).state == REJECTED  # the attempt is free for a later try
    assert journal.spent_usd() == 0.5


def test_a_rolling_window_forgets_old_spend_and_says_when_it_fits(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal"))
    cap = SpendCap(max_usd=0.5, window_s=0.6)
    _claim(journal, fingerprint="aa" + "1" * 62, cap=cap)
    _claim(journal, fingerprint="aa" + "2" * 62, cap=cap)
    with pytest.raises(SpendCapReached) as refused:
        _claim(journal, fingerprint="aa" + "3" * 62, cap=cap)
    assert refused.value.retry_at is not None and "wait until" in str(refused.value)
    time.sleep(max(0.0, refused.value.retry_at - time.time()) + 0.05)
    _claim(journal, fingerprint="aa" + "4" * 62, cap=cap)
    assert journal.spent_usd(window_s=0.6) <= 0.5 and journal.spent_usd() == 0.75


def _race_claim(url: str, options: dict[str, Any], fingerprint: str, barrier: Any, results: Any) -> None:
    journal = Journal(url, options)
    barrier.wait()
    try:
        journal.claim(fingerprint, 1, partition="p", owner=Owner.current(), estimate_usd=0.25, input={})
        results.put("won")
    except ClaimTaken:
        results.put("taken")


def _race_spend(url: str, options: dict[str, Any], index: int, barrier: Any, results: Any) -> None:
    journal = Journal(url, options)
    barrier.wait()
    outcomes = []
    for i in range(4):
        fingerprint = f"{index:02d}{i:02d}" + "f" * 60
        try:
            journal.claim(
                fingerprint,
                1,
                partition="p",
                owner=Owner.current(),
                estimate_usd=0.25,
                input={},
                cap=SpendCap(max_usd=2.0),
            )
            outcomes.append("ok")
        except SpendCapReached:
            outcomes.append("capped")
    results.put(outcomes)


def _run_processes(target: Any, args_for: Any, count: int) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(count), context.Queue()
    processes = [context.Process(target=target, args=(*args_for(i), barrier, results)) for i in range(count)]
    for process in processes:
        process.start()
    found = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return found


def test_separate_processes_never_both_hold_a_claim(where) -> None:
    url, options = where
    for round_ in range(3):
        fingerprint = f"{round_:02d}" + "e" * 62
        outcomes = _run_processes(_race_claim, lambda i, f=fingerprint: (url, options, f), 4)
        assert sorted(outcomes) == ["taken", "taken", "taken", "won"]


def test_concurrent_processes_cannot_overshoot_the_cap(where) -> None:
    url, options = where
    outcomes = _run_processes(_race_spend, lambda i: (url, options, i), 3)
    flat = [o for per_process in outcomes for o in per_process]
    assert flat.count("ok") == 8 and flat.count("capped") == 4  # $2.00 / $0.25
    assert Journal(url, options).spent_usd() == 2.0


def test_waiting_on_a_live_owner_returns_its_answer_and_stops_when_it_is_gone(tmp_path: Path) -> None:
    import threading

    journal = Journal(str(tmp_path / "journal"))
    claim = _claim(journal)
    threading.Timer(0.3, lambda: journal.record_submitted(claim, "req-9")).start()
    answered = wait_for_answer(journal, claim, owner_alive=lambda owner: True, timeout_s=10)
    assert answered.request_id == "req-9"

    orphan = _claim(journal, attempt=2)
    gone = wait_for_answer(journal, orphan, owner_alive=lambda owner: False, timeout_s=10)
    assert gone.state == CLAIMED  # nobody will answer it: the caller reports it ambiguous


def test_a_copy_taken_before_its_owner_answered_and_ended_is_read_again(tmp_path: Path) -> None:
    """A run that saw another's claim open, and judged it only after that owner had rejected it and
    ended, reported the claim ambiguous ("may have been billed") though nothing had been sent."""
    journal = Journal(str(tmp_path / "journal"))
    seen = _claim(journal)  # the copy the other run holds
    journal.record_rejected(seen, "spend cap reached; nothing was sent or billed")  # then its owner ends
    judged = wait_for_answer(journal, seen, owner_alive=lambda owner: False, timeout_s=0)
    assert judged.state == REJECTED and "nothing was sent" in (judged.reason or "")


def test_owner_liveness_is_known_on_this_host_only() -> None:
    me = Owner.current()
    assert me.process_alive() is True
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    assert Owner(run_id=None, host=me.host, pid=dead.pid).process_alive() is False
    assert Owner(run_id=None, host="elsewhere", pid=1).process_alive() is None
