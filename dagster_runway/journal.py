"""The submission journal: a durable, atomic claim on every paid generation, written before the POST.

The API has no idempotency key and no way to list an account's requests, so the only protection
against paying twice is a record made *before* the submit that every run, process and host can see.
The journal keeps it on the output's own filesystem (a local folder or a bucket), beside the videos
it pays for, with one primitive: an exclusive create (``O_EXCL`` locally, a conditional PUT with
``If-None-Match: *`` on S3). Two writers can never both create the same object.

Layout under the journal root (``<output>/.runway`` by default)::

    claims/<fp[:2]>/<fp>/<attempt>.json   one per submit attempt of a generation fingerprint
    settled/<fp[:2]>/<fp>/<attempt>.json  the attempt's final cost is counted (at most once)
    spend/<bucket>/<seq>.json             an append-only log of spend with running totals

A claim goes ``claimed`` (created exclusively, nothing sent yet) -> ``submitted`` (the request id,
written the moment the answer arrives) or ``rejected`` (provably not accepted: nothing billed) or
``ambiguous`` (the answer was lost; it may have been billed). A claim left ``claimed`` by an owner
that is gone is ambiguous too: the POST may have been in flight when the process died.

The spend log serialises every reservation through the same exclusive create: entry ``n + 1`` holds
the running total, so two processes that both read total ``T`` cannot both append, and the cap is
checked against what is really there. This module imports nothing from Dagster.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dagster_runway._process import pid_alive
from dagster_runway.media._fs import is_local, url_to_fs

CLAIMED = "claimed"
SUBMITTED = "submitted"
REJECTED = "rejected"
AMBIGUOUS = "ambiguous"
STATES = (CLAIMED, SUBMITTED, REJECTED, AMBIGUOUS)

_SPEND_BUCKET = 1000


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: the Dagster run (if any), the host and the process."""

    run_id: str | None
    host: str
    pid: int

    @classmethod
    def current(cls, run_id: str | None = None) -> Owner:
        return cls(run_id=run_id, host=socket.gethostname(), pid=os.getpid())

    def process_alive(self) -> bool | None:
        """Whether the owning process still runs: known on this host only (``None`` elsewhere)."""
        if self.host != socket.gethostname():
            return None
        return pid_alive(self.pid)

    def describe(self) -> str:
        run = f"run {self.run_id} " if self.run_id else ""
        return f"{run}(pid {self.pid} on {self.host})"


@dataclass(frozen=True)
class Claim:
    """One submit attempt of one generation, as the journal holds it."""

    fingerprint: str
    attempt: int
    state: str
    partition: str
    owner: Owner
    claimed_at: float
    estimate_usd: float
    input: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    answered_at: float | None = None
    reason: str | None = None

    @property
    def answered(self) -> bool:
        return self.state != CLAIMED

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Claim:
        raw = json.loads(data)
        raw["owner"] = Owner(**raw["owner"])
        return cls(**raw)


@dataclass(frozen=True)
class SpendEntry:
    seq: int
    at: float
    delta_usd: float
    total_usd: float
    kind: str  # "reserve" or "settle"
    fingerprint: str
    attempt: int


class ClaimTaken(Exception):
    """Another writer holds this attempt; ``claim`` is what it wrote (``None`` if unreadable yet)."""

    def __init__(self, claim: Claim | None) -> None:
        super().__init__("the claim is taken")
        self.claim = claim


class SpendCapReached(Exception):
    """A reservation would take spend past the cap. The message says by how much and what to do."""

    def __init__(self, message: str, *, spent_usd: float, cap_usd: float, retry_at: float | None) -> None:
        super().__init__(message)
        self.spent_usd, self.cap_usd, self.retry_at = spent_usd, cap_usd, retry_at


@dataclass(frozen=True)
class SpendCap:
    max_usd: float
    window_s: float | None = None


class Journal:
    """Claims, answers and spend of paid submits, on any fsspec filesystem that can create exclusively."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url, storage_options)
        self.root = root.rstrip("/")
        self._local = is_local(self.fs)
        self._spend_lock = threading.Lock()  # one writer per process at a time; processes race on the create
        self._spend_tip: SpendEntry | None = None
        self._spend_cache: dict[int, SpendEntry] = {}

    def __repr__(self) -> str:
        return f"Journal({self.url!r})"

    # Claims

    def _claim_dir(self, fingerprint: str) -> str:
        return f"{self.root}/claims/{fingerprint[:2]}/{fingerprint}"

    def claim_path(self, fingerprint: str, attempt: int) -> str:
        return f"{self._claim_dir(fingerprint)}/{attempt:04d}.json"

    def claims(self, fingerprint: str) -> list[Claim]:
        """Every attempt of a fingerprint, oldest first (a claim still being written is skipped)."""
        names = self._list(self._claim_dir(fingerprint))
        found = []
        for name in sorted(n for n in names if n.endswith(".json")):
            claim = self._read_claim(name)
            if claim is not None:
                found.append(claim)
        return found

    def latest(self, fingerprint: str) -> Claim | None:
        claims = self.claims(fingerprint)
        return claims[-1] if claims else None

    def read(self, fingerprint: str, attempt: int) -> Claim | None:
        return self._read_claim(self.claim_path(fingerprint, attempt))

    def _read_claim(self, path: str) -> Claim | None:
        try:
            return Claim.from_json(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # an exclusive create still being written (local files only)

    def claim(
        self,
        fingerprint: str,
        attempt: int,
        *,
        partition: str,
        owner: Owner,
        estimate_usd: float,
        input: Mapping[str, Any],
        cap: SpendCap | None = None,
    ) -> Claim:
        """Take attempt ``attempt`` of ``fingerprint``, then reserve its estimated cost.

        Raises ``ClaimTaken`` if another writer has it, and ``SpendCapReached`` (after recording the
        claim as rejected, so the attempt is free again) if the cap would be passed.
        """
        claim = Claim(
            fingerprint=fingerprint,
            attempt=attempt,
            state=CLAIMED,
            partition=partition,
            owner=owner,
            claimed_at=time.time(),
            estimate_usd=estimate_usd,
            input=dict(input),
        )
        path = self.claim_path(fingerprint, attempt)
        if not self._create_exclusive(path, claim.to_json()):
            raise ClaimTaken(self._read_claim(path))
        try:
            self._append_spend(estimate_usd, "reserve", fingerprint, attempt, cap=cap)
        except SpendCapReached as exc:
            self._overwrite(path, replace(claim, state=REJECTED, reason=str(exc), answered_at=time.time()).to_json())
            raise
        return claim

    def record_submitted(self, claim: Claim, request_id: str) -> Claim:
        return self._answer(claim, SUBMITTED, request_id=request_id)

    def record_rejected(self, claim: Claim, reason: str) -> Claim:
        """The submit was provably not accepted (4xx, refused connection): nothing billed; refund the estimate."""
        answered = self._answer(claim, REJECTED, reason=reason)
        self.settle(answered, 0.0)
        return answered

    def record_ambiguous(self, claim: Claim, reason: str) -> Claim:
        return self._answer(claim, AMBIGUOUS, reason=reason)

    def _answer(self, claim: Claim, state: str, *, request_id: str | None = None, reason: str | None = None) -> Claim:
        answered = replace(claim, state=state, request_id=request_id, reason=reason, answered_at=time.time())
        self._overwrite(self.claim_path(claim.fingerprint, claim.attempt), answered.to_json())
        return answered

    # Spend

    def settle(self, claim: Claim, cost_usd: float) -> bool:
        """Count an attempt's final cost (0 when refunded) in place of its estimate, at most once."""
        marker = f"{self.root}/settled/{claim.fingerprint[:2]}/{claim.fingerprint}/{claim.attempt:04d}.json"
        if not self._create_exclusive(marker, json.dumps({"cost_usd": cost_usd, "at": time.time()}).encode()):
            return False
        delta = round(cost_usd - claim.estimate_usd, 6)
        if delta:
            self._append_spend(delta, "settle", claim.fingerprint, claim.attempt, cap=None)
        return True

    def spent_usd(self, window_s: float | None = None) -> float:
        """Spend recorded in all (or over the last ``window_s`` seconds): estimates until settled."""
        with self._spend_lock:
            tip = self._find_tip()
            return round(self._window_total(tip, window_s, time.time()), 6)

    def _append_spend(self, delta: float, kind: str, fingerprint: str, attempt: int, *, cap: SpendCap | None) -> None:
        with self._spend_lock:
            tip = self._find_tip()
            while True:
                now = time.time()
                if cap is not None and delta > 0:
                    spent = self._window_total(tip, cap.window_s, now)
                    if spent + delta > cap.max_usd + 1e-9:
                        raise self._cap_error(tip, cap, spent, delta, now)
                seq = (tip.seq if tip else 0) + 1
                entry = SpendEntry(
                    seq=seq,
                    at=now,
                    delta_usd=delta,
                    total_usd=round((tip.total_usd if tip else 0.0) + delta, 6),
                    kind=kind,
                    fingerprint=fingerprint,
                    attempt=attempt,
                )
                if self._create_exclusive(self._spend_path(seq), json.dumps(asdict(entry)).encode()):
                    self._spend_cache[seq] = self._spend_tip = entry
                    return
                tip = self._advance_tip(seq)  # another process appended first: read on, then retry

    def _cap_error(self, tip: SpendEntry | None, cap: SpendCap, spent: float, delta: float, now: float) -> SpendCapReached:
        retry_at = None
        if cap.window_s is not None:
            retry_at = self._when_fits(tip, cap, delta, now)
        where = f"in the last {cap.window_s / 3600:g} h" if cap.window_s else "in all"
        wait = (
            f" or wait until {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(retry_at))}"
            if retry_at is not None
            else ""
        )
        return SpendCapReached(
            f"spend cap reached: ${spent:.2f} of ${cap.max_usd:.2f} spent {where}, and this submit would add "
            f"${delta:.2f}; nothing was sent or billed. Raise max_spend_usd{wait}.",
            spent_usd=spent,
            cap_usd=cap.max_usd,
            retry_at=retry_at,
        )

    def _when_fits(self, tip: SpendEntry | None, cap: SpendCap, delta: float, now: float) -> float | None:
        """When enough of the window's spend will have aged out for ``delta`` to fit (``None``: never)."""
        assert cap.window_s is not None
        if tip is None or delta > cap.max_usd:
            return None
        excess = self._window_total(tip, cap.window_s, now) + delta - cap.max_usd
        aged = 0.0
        for seq in range(self._first_in_window(tip, now - cap.window_s), tip.seq + 1):
            entry = self._spend_entry(seq)
            if entry is None:
                continue
            aged += entry.delta_usd
            if aged >= excess - 1e-9:
                return entry.at + cap.window_s
        return None

    def _window_total(self, tip: SpendEntry | None, window_s: float | None, now: float) -> float:
        if tip is None:
            return 0.0
        if window_s is None:
            return tip.total_usd
        first = self._first_in_window(tip, now - window_s)
        before = self._spend_entry(first - 1) if first > 1 else None
        return tip.total_usd - (before.total_usd if before else 0.0)

    def _first_in_window(self, tip: SpendEntry, since: float) -> int:
        """The first sequence number whose entry is at or after ``since`` (binary search; entries are immutable)."""
        low, high = 1, tip.seq + 1
        while low < high:
            mid = (low + high) // 2
            entry = self._spend_entry(mid)
            if entry is not None and entry.at >= since:
                high = mid
            else:
                low = mid + 1
        return low

    def _spend_path(self, seq: int) -> str:
        return f"{self.root}/spend/{seq // _SPEND_BUCKET:06d}/{seq:09d}.json"

    def _spend_entry(self, seq: int) -> SpendEntry | None:
        if seq in self._spend_cache:
            return self._spend_cache[seq]
        try:
            entry = SpendEntry(**json.loads(self.fs.cat_file(self._spend_path(seq))))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        self._spend_cache[seq] = entry
        return entry

    def _find_tip(self) -> SpendEntry | None:
        """The newest spend entry: from the cached tip, read forward; on first use, list the newest bucket."""
        if self._spend_tip is None:
            for bucket in reversed(sorted(self._list(f"{self.root}/spend"))):
                names = sorted(n for n in self._list(bucket) if n.endswith(".json"))
                if names:
                    self._spend_tip = self._spend_entry(int(names[-1].rsplit("/", 1)[-1][:-5]))
                    break
        return self._advance_tip((self._spend_tip.seq if self._spend_tip else 0) + 1)

    def _advance_tip(self, seq: int) -> SpendEntry | None:
        """Read entries from ``seq`` on until one is missing; return the last one found."""
        while (entry := self._spend_entry(seq)) is not None:
            self._spend_tip = entry
            seq += 1
        return self._spend_tip

    # Storage primitives

    def _list(self, path: str) -> list[str]:
        """A fresh listing. The listing cache is dropped at once: s3fs would otherwise answer "not
        found" for objects created after it, without asking."""
        try:
            return list(self.fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(path)

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` with ``data`` only if it does not exist; ``False`` if it does."""
        parent = path.rsplit("/", 1)[0]
        if self._local:
            os.makedirs(parent, exist_ok=True)
            temp = f"{parent}/.{uuid.uuid4().hex}.tmp"
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temp, path)  # atomic and exclusive, and readers never see a partial file
            except FileExistsError:
                return False
            finally:
                os.unlink(temp)
            return True
        try:
            # One PUT with If-None-Match: * on S3. Not fs.open(path, "xb"): when its close fails, the file
            # object retries the PUT again from __del__.
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _overwrite(self, path: str, data: bytes) -> None:
        if self._local:
            temp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
            return
        self.fs.pipe_file(path, data)


def wait_for_answer(
    journal: Journal,
    claim: Claim,
    *,
    owner_alive: Callable[[Owner], bool],
    timeout_s: float,
    poll_s: float = 0.2,
) -> Claim:
    """Wait while another live owner's claim has no answer; return it answered, or as it stands when
    the owner is gone or ``timeout_s`` has passed (then it is still ``claimed``). The claim is read
    again before each judgement: ``claim`` may be a copy taken before its owner answered and ended."""
    deadline = time.monotonic() + timeout_s
    current = claim
    while True:
        with contextlib.suppress(Exception):
            current = journal.read(claim.fingerprint, claim.attempt) or current
        if current.state != CLAIMED or time.monotonic() >= deadline or not owner_alive(current.owner):
            return current
        time.sleep(poll_s)


__all__ = [
    "AMBIGUOUS",
    "CLAIMED",
    "REJECTED",
    "SUBMITTED",
    "Claim",
    "ClaimTaken",
    "Journal",
    "Owner",
    "SpendCap",
    "SpendCapReached",
    "SpendEntry",
    "wait_for_answer",
]
