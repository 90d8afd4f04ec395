"""A property test of the journal under interleavings of claim, answer, failure and crash.

Several "processes" (Journal objects on one local root, each with its own owner) follow the submit
step's protocol against an oracle service that counts POSTs per (fingerprint, attempt) and hands out
request ids. Hypothesis interleaves their steps, kills them between any two, and checks after every
step: at most one POST per claim, and no answered request lost (each request id the service gave out
is in the journal as ``submitted`` on the claim that sent it, or that claim is flagged ambiguous and
can be adopted with it). Derandomised with no example database: the same examples on every machine. On local disk
(required) and, fewer examples, on moto's S3 server.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dagster_runway.journal import (
    AMBIGUOUS,
    CLAIMED,
    REJECTED,
    SUBMITTED,
    Claim,
    ClaimTaken,
    Journal,
    Owner,
    SpendCap,
    SpendCapReached,
)

PROCESSES, IMAGES, ESTIMATE = 3, 3, 0.25
CAP = SpendCap(max_usd=0.5)  # two of the three images may stand at once: the cap is met often
FINGERPRINTS = [f"{i:02d}" + "c" * 62 for i in range(IMAGES)]


@dataclass
class Process:
    journal: Journal
    owner: Owner
    plan: tuple[str, int] | None = None  # the attempt it decided to claim, read from the journal
    claim: Claim | None = None  # taken, not yet sent
    answer: str | None = None  # a request id that arrived and is not yet journalled


@dataclass
class Service:
    posts: Counter[tuple[str, int]] = field(default_factory=Counter)
    accepted: dict[str, tuple[str, int]] = field(default_factory=dict)  # request id -> (fingerprint, attempt)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def post(self, claim: Claim, accept: bool) -> str | None:
        self.posts[(claim.fingerprint, claim.attempt)] += 1
        if not accept:
            return None
        request_id = f"req-{next(self.ids)}"
        self.accepted[request_id] = (claim.fingerprint, claim.attempt)
        return request_id


class JournalProtocol(RuleBasedStateMachine):
    def __init__(self, root: str, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.root, self.options = root, options or {}
        self.pids = itertools.count(1000)
        self.dead: set[int] = set()
        self.processes = [self._spawn(i) for i in range(PROCESSES)]
        self.service = Service()
        self.reader = self._journal()  # what any later process sees

    def _spawn(self, index: int) -> Process:
        owner = Owner(run_id=f"run-{index}", host="model-host", pid=next(self.pids))
        return Process(self._journal(), owner)

    def _journal(self) -> Journal:
        return Journal(self.root, self.options)

    def _idle(self, index: int) -> bool:
        process = self.processes[index]
        return process.plan is None and process.claim is None and process.answer is None

    @rule(index=st.integers(0, PROCESSES - 1), image=st.integers(0, IMAGES - 1))
    def decide(self, index: int, image: int) -> None:
        """The submit step's decision for one image: reuse, leave alone, or plan the next attempt."""
        if not self._idle(index):
            return
        process, fingerprint = self.processes[index], FINGERPRINTS[image]
        latest = process.journal.latest(fingerprint)
        if latest is not None and latest.state != REJECTED:
            return  # submitted: reuse; ambiguous or open: never paid again (waited on, or adopted)
        process.plan = (fingerprint, latest.attempt + 1 if latest else 1)

    def _pick(self, choice: int, has: str) -> Process:
        ready = [p for p in self.processes if getattr(p, has) is not None]
        return ready[choice % len(ready)]

    @precondition(lambda self: any(p.plan is not None for p in self.processes))
    @rule(choice=st.integers(0, PROCESSES - 1))
    def take(self, choice: int) -> None:
        """Claim the planned attempt: another process may have decided the same meanwhile."""
        process = self._pick(choice, "plan")
        assert process.plan is not None
        (fingerprint, attempt), process.plan = process.plan, None
        try:
            process.claim = process.journal.claim(
                fingerprint,
                attempt,
                partition=f"{fingerprint[:2]}.png",
                owner=process.owner,
                estimate_usd=ESTIMATE,
                input={"seed": attempt},
                cap=CAP,
            )
        except ClaimTaken as taken:
            assert taken.claim is not None and taken.claim.owner != process.owner
            event("a race lost on the exclusive create")
        except SpendCapReached:
            event("the spend cap refused a claim")
            refused = process.journal.read(fingerprint, attempt)
            assert refused is not None and refused.state == REJECTED

    @precondition(lambda self: any(p.claim is not None for p in self.processes))
    @rule(
        choice=st.integers(0, PROCESSES - 1),
        outcome=st.sampled_from(["accepted", "rejected", "lost", "failed"]),
    )
    def send(self, choice: int, outcome: str) -> None:
        """POST a taken claim: accepted (the answer arrives), rejected (a 4xx: nothing billed), lost
        (accepted, but the connection dropped before the answer), or failed before sending."""
        process = self._pick(choice, "claim")
        claim, process.claim = process.claim, None
        assert claim is not None
        if outcome == "failed":
            process.journal.record_rejected(claim, "not sent: the request could not be built")
            return
        request_id = self.service.post(claim, accept=outcome != "rejected")
        event(f"POST {outcome}")
        if outcome == "rejected":
            process.journal.record_rejected(claim, "422: rejected")
        elif outcome == "lost":
            process.journal.record_ambiguous(claim, "the connection was reset after the body was sent")
        else:
            process.answer = request_id

    @precondition(lambda self: any(p.answer is not None for p in self.processes))
    @rule(choice=st.integers(0, PROCESSES - 1))
    def record(self, choice: int) -> None:
        """The answer that arrived is journalled."""
        process = self._pick(choice, "answer")
        assert process.answer is not None
        fingerprint, attempt = self.service.accepted[process.answer]
        claim = process.journal.read(fingerprint, attempt)
        assert claim is not None and claim.owner == process.owner
        process.journal.record_submitted(claim, process.answer)
        process.answer = None

    @precondition(lambda self: any(not self._idle(i) for i in range(PROCESSES)))
    @rule(choice=st.integers(0, PROCESSES - 1))
    def crash(self, choice: int) -> None:
        """SIGKILL mid-protocol: whatever the process held is gone with it; a new one takes its place."""
        busy = [i for i in range(PROCESSES) if not self._idle(i)]
        index = busy[choice % len(busy)]
        self.dead.add(self.processes[index].owner.pid)
        self.processes[index] = self._spawn(index)

    def _in_flight(self, request_id: str) -> bool:
        return any(p.answer == request_id for p in self.processes)

    @invariant()
    def at_most_one_post_per_claim(self) -> None:
        assert all(count == 1 for count in self.service.posts.values()), self.service.posts
        reader = self.reader
        for fingerprint, attempt in self.service.posts:
            claim = reader.read(fingerprint, attempt)
            assert claim is not None  # a POST only after a successful claim

    @invariant()
    def no_answered_request_is_lost(self) -> None:
        reader = self.reader
        for request_id, (fingerprint, attempt) in self.service.accepted.items():
            claim = reader.read(fingerprint, attempt)
            assert claim is not None and claim.state != REJECTED
            if claim.state == SUBMITTED:
                assert claim.request_id == request_id
            elif claim.state == CLAIMED:
                assert claim.owner.pid in self.dead or self._in_flight(request_id)
            else:
                assert claim.state == AMBIGUOUS

    @invariant()
    def spend_counts_every_attempt_that_may_be_billed(self) -> None:
        reader = self.reader
        standing = [c for f in FINGERPRINTS for c in reader.claims(f) if c.state != REJECTED]
        assert reader.spent_usd() == round(ESTIMATE * len(standing), 6) <= CAP.max_usd

    def teardown(self) -> None:
        reader = self.reader
        for request_id, (fingerprint, attempt) in self.service.accepted.items():
            claim = reader.read(fingerprint, attempt)
            assert claim is not None
            if claim.state != SUBMITTED and not self._in_flight(request_id):
                adopted = reader.adopt(fingerprint, attempt, request_id, note="found in the history")
                assert reader.read(fingerprint, attempt) == adopted and adopted.request_id == request_id


def _stable(examples: int, steps: int) -> settings:
    """Bounded, and the same examples on every machine (derandomised, no example database)."""
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def test_the_protocol_holds_on_local_disk(tmp_path: Path) -> None:
    run_state_machine_as_test(
        lambda: JournalProtocol(str(tmp_path / uuid.uuid4().hex)),  # type: ignore[arg-type]
        settings=_stable(60, 40),
    )


def test_the_protocol_holds_on_s3(s3: Any) -> None:
    run_state_machine_as_test(
        lambda: JournalProtocol(s3.url(uuid.uuid4().hex), s3.storage_options),  # type: ignore[arg-type]
        settings=_stable(4, 20),
    )
