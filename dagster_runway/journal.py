"""The submission journal: a durable, atomic claim on every paid generation, written before the POST.

The API has no idempotency key and no way to list an account's requests, so the only protection
against paying twice is a record made *before* the submit that every run, process and host can see.
The journal keeps it on the output's own filesystem (a local folder or a bucket), beside the videos
it pays for, with one primitive: an exclusive create (``O_EXCL``-like ``os.link`` locally, a
conditional PUT with ``If-None-Match: *`` on S3). Two writers can never both create the same object;
``Journal.verify_store`` proves that of a store before anything is paid through it.

Layout under the journal root (``<output>/.runway`` by default)::

    claims/<fp[:2]>/<fp>/<attempt>.json   one per submit attempt of a generation fingerprint
    settled/<fp[:2]>/<fp>/<attempt>.json  the attempt's final cost is counted (at most once)
    spend/<bucket>/<seq>.json             an append-only log of spend with running totals
    probe/<uuid>.json                     the store check's object (removed at once)
    outputs/<hash>.json                   the image source each output's videos are made from

A claim goes ``claimed`` (created exclusively, nothing sent yet) -> ``submitted`` (the request id,
written the moment the answer arrives) or ``rejected`` (provably not accepted: nothing billed) or
``ambiguous`` (the answer was lost; it may have been billed). A claim left ``claimed`` by an owner
that is gone is ambiguous too: the POST may have been in flight when the process died. An operator
who finds the request in their RunComfy history attaches it with ``adopt``.

The spend log serialises every reservation through the same exclusive create: entry ``n + 1`` holds
the running total, so two processes that both read total ``T`` cannot both append, and the cap is
checked against what is really there. Its timestamps are the store's clock (the modification time of
the object written just before), never the host's, and never decrease along the log: hosts whose
clocks differ agree on what a rolling window holds. Every object written carries a writer nonce, so
a create retried after its first try landed is recognised as one's own. Every object is written
whole (a complete temporary file linked or renamed into place locally, one PUT on S3), so one that
cannot be read is damage, never "being written". This module imports nothing from Dagster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from dagster_runway._process import pid_alive
from dagster_runway._redact import redact_url
from dagster_runway.media._fs import is_local, url_to_fs
from dagster_runway.schema import REQUEST_ID_PATTERN

CLAIMED = "claimed"
SUBMITTED = "submitted"
REJECTED = "rejected"
AMBIGUOUS = "ambiguous"
STATES = (CLAIMED, SUBMITTED, REJECTED, AMBIGUOUS)

_SPEND_BUCKET = 1000
_APPEND_TRIES = 1000  # each failed try means another writer appended; a stuck log fails instead of spinning
_TEMP_MAX_AGE_S = 3600.0  # a temporary file older than this is litter whoever wrote it


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


def _known(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in raw.items() if key in names}


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
    nonce: str = ""  # the writer's: a retried create that finds these bytes there is its own

    @property
    def answered(self) -> bool:
        return self.state != CLAIMED

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Claim:
        raw = json.loads(data)
        raw["owner"] = Owner(**_known(Owner, raw["owner"]))
        claim = cls(**_known(cls, raw))
        if claim.state not in STATES or not isinstance(claim.attempt, int):
            raise ValueError(f"state {claim.state!r}, attempt {claim.attempt!r}")
        return claim


@dataclass(frozen=True)
class SpendEntry:
    seq: int
    at: float  # the store's clock, never less than the previous entry's
    delta_usd: float
    total_usd: float
    kind: str  # "reserve" or "settle"
    fingerprint: str
    attempt: int
    nonce: str = ""


@dataclass(frozen=True)
class SpendSummary:
    """The spend log in figures: estimates until settled, then final costs."""

    total_usd: float
    entries: int
    window_s: float | None = None
    window_usd: float | None = None


class JournalError(Exception):
    """The journal cannot be used as it stands; the message names what, why and the fix."""


class JournalStoreUnsafe(JournalError):
    """The journal's store does not honour exclusive creates: two runs could pay for one image."""


class JournalDamaged(JournalError):
    """A journal object exists but cannot be read; ``path`` names it (a redacted URL or local path)."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class SourceMismatch(JournalError):
    """The output (its journal) belongs to another image source than the one given."""

    def __init__(self, reason: str, fix: str, *, bound: str, given: str) -> None:
        super().__init__(f"{reason} Fix: {fix}")
        self.reason, self.fix, self.bound, self.given = reason, fix, bound, given


class ClaimTaken(Exception):
    """Another writer holds this attempt; ``claim`` is what it wrote (``None`` if it is gone again)."""

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


_verified: set[tuple[str, str]] = set()
_verify_lock = threading.Lock()

STORES_THAT_WORK = (
    "a local disk or a shared filesystem (NFS, SMB), AWS S3, and S3-compatible stores that honour "
    "If-None-Match: * (current MinIO releases; older MinIO and Ceph releases do not)"
)


class Journal:
    """Claims, answers and spend of paid submits, on any fsspec filesystem that can create exclusively.

    ``clock`` is the host's clock, for the times a claim shows; the spend log's window is judged by
    the store's clock, read from the objects the journal writes.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url, storage_options)
        self.root = root.rstrip("/")
        self._local = is_local(self.fs)
        self._clock = clock
        self._options_key = json.dumps(dict(storage_options or {}), sort_keys=True, default=repr)
        self._spend_lock = threading.Lock()  # one writer per process at a time; processes race on the create
        self._spend_tip: SpendEntry | None = None
        self._spend_cache: dict[int, SpendEntry] = {}
        self._store_offset = 0.0  # the store's clock minus ours, as last observed
        # S3 gives whole seconds, rounded down: a stamp is put that much later, never earlier
        self._store_resolution = 0.0 if self._local else 1.0

    def __repr__(self) -> str:
        return f"Journal({redact_url(self.url)!r})"

    def where(self, path: str) -> str:
        """A journal object's location as a user can find it (a local path, or a redacted URL)."""
        return path if self._local else redact_url(self.fs.unstrip_protocol(path))

    # The store

    def verify_store(self) -> None:
        """Prove, once per journal root and process, that the store refuses a second exclusive create.

        Raises ``JournalStoreUnsafe`` (saying which stores work and how to move the journal) if it
        does not; a failed check is made again on the next call. On local disk, first removes the
        temporary files of writers that died."""
        key = (self.url, self._options_key)
        with _verify_lock:
            if key in _verified:
                return
            if self._local:
                self._sweep_temps()
            path = f"{self.root}/probe/{uuid.uuid4().hex}.json"
            try:
                first = self._create_exclusive(path, self._probe_bytes())
                second = self._create_exclusive(path, self._probe_bytes())
            except (NotImplementedError, TypeError) as exc:
                raise self._unsafe(f"it has no exclusive create ({type(exc).__name__}: {exc})") from exc
            finally:
                self._remove(path)
            if not first or second:
                raise self._unsafe(
                    f"it accepted a second exclusive create of the same object ({self.where(path)}): "
                    "it ignores conditional writes (If-None-Match: *)"
                )
            _verified.add(key)

    def _probe_bytes(self) -> bytes:
        return json.dumps(
            {"probe": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        ).encode()

    def _unsafe(self, why: str) -> JournalStoreUnsafe:
        return JournalStoreUnsafe(
            f"the submission journal's store {redact_url(self.url)} cannot be trusted: {why}, so two runs "
            "could both claim one image and pay for it twice; nothing was submitted. Stores that work: "
            f"{STORES_THAT_WORK}. Fix: set the pipeline option `journal` (and `journal_storage_options`) "
            "to such a store, for example a local folder shared by every run or another bucket."
        )

    def _sweep_temps(self) -> None:
        """Remove temporary files left by a kill: a dead writer's on this host, or anyone's over an hour
        old. They live in one folder, so the sweep reads one listing however large the journal; the
        temporary files older releases left beside their targets are swept once per root."""
        legacy_done = f"{self._temp_dir}/legacy-swept"
        if os.path.exists(legacy_done):
            folders: Iterable[tuple[str, list[str]]] = [(self._temp_dir, _listdir(self._temp_dir))]
        else:
            folders = ((folder, names) for folder, _, names in os.walk(self.root))
        host, now = socket.gethostname(), time.time()
        legacy_left = 0
        for folder, names in folders:
            for name in names:
                if not name.endswith(".tmp"):  # the journal writes no other .tmp files
                    continue
                path = os.path.join(folder, name)
                writer = name[1:-4].rsplit(".", 2)  # .<host>.<pid>.<hex>.tmp
                dead = (
                    len(writer) == 3
                    and writer[0] == host
                    and writer[1].isdigit()
                    and not pid_alive(int(writer[1]))
                )
                with contextlib.suppress(FileNotFoundError):
                    if dead or now - os.stat(path).st_mtime > _TEMP_MAX_AGE_S:
                        os.unlink(path)
                    elif folder != self._temp_dir:
                        legacy_left += 1
        if not legacy_left and not os.path.exists(legacy_done):
            os.makedirs(self._temp_dir, exist_ok=True)
            with open(legacy_done, "w") as handle:
                handle.write("temporary files of older releases were swept\n")

    # The output's source

    def bind_output(self, output: str, source: str, *, adopt: bool = False) -> str | None:
        """Record that the videos in ``output`` are made from the image source ``source`` (both compared
        as :func:`location_identity` gives them); return the source it belonged to before, if another.

        The first call for an output writes its record exclusively; later calls with the same source
        only read it. Another source raises :class:`SourceMismatch` naming both, unless ``adopt``: then
        the output is re-bound to ``source`` (the old source's videos stay where they are). One journal
        may serve several outputs, each bound to its own source."""
        where, given = location_identity(output), location_identity(source)
        path = f"{self.root}/outputs/{hashlib.sha256(where.encode()).hexdigest()[:24]}.json"
        data = json.dumps(
            {"output": where, "source": given, "bound_at": self._clock(), "nonce": uuid.uuid4().hex}
        ).encode()
        if self._create_exclusive(path, data):
            return None
        try:
            bound = json.loads(self.fs.cat_file(path))["source"]
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise self._damaged(path, "output record", exc) from None
        if bound == given:
            return None
        if not adopt:
            raise SourceMismatch(
                f"the output {where} holds videos of the image source {bound} ({self.where(path)} says so), "
                f"not of {given}: mixing them would show the other source's videos as this one's.",
                f"give this source an output of its own, or adopt the output for {given} (the demo's "
                "--adopt-output, the pipeline option adopt_output=True); the old source's videos then stay in it "
                "unmanaged.",
                bound=str(bound),
                given=given,
            )
        self._overwrite(path, data)
        return str(bound)

    # Claims

    def _claim_dir(self, fingerprint: str) -> str:
        return f"{self.root}/claims/{fingerprint[:2]}/{fingerprint}"

    def claim_path(self, fingerprint: str, attempt: int) -> str:
        return f"{self._claim_dir(fingerprint)}/{attempt:04d}.json"

    def claims(self, fingerprint: str) -> list[Claim]:
        """Every attempt of a fingerprint, oldest first. Raises ``JournalDamaged`` for an unreadable one."""
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

    def fingerprints(self, prefix: str = "") -> list[str]:
        """The fingerprints that have claims (those starting with ``prefix``), sorted. A full listing."""
        groups = (
            [f"{self.root}/claims/{prefix[:2]}"]
            if len(prefix) >= 2
            else sorted(self._list(f"{self.root}/claims"))
        )
        found = []
        for group in groups:
            for path in self._list(group):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if not name.startswith(".") and name.startswith(prefix):
                    found.append(name)
        return sorted(found)

    def iter_claims(self, on_damaged: Callable[[JournalDamaged], None] | None = None) -> Iterator[Claim]:
        """The latest claim of every fingerprint. An unreadable one raises ``JournalDamaged``, or is
        handed to ``on_damaged`` and skipped."""
        for fingerprint in self.fingerprints():
            try:
                claim = self.latest(fingerprint)
            except JournalDamaged as exc:
                if on_damaged is None:
                    raise
                on_damaged(exc)
                continue
            if claim is not None:
                yield claim

    def _read_claim(self, path: str) -> Claim | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return Claim.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._damaged(path, "claim", exc) from exc

    def _damaged(self, path: str, kind: str, exc: Exception) -> JournalDamaged:
        where = self.where(path)
        if kind == "claim":
            removing = (
                "removing a claim frees its attempt, so the next run submits (and pays for) that image again: "
                "first check your RunComfy history for a request of that image, and if there is one, adopt it "
                "with `dagster-runway journal adopt` once the file is restored"
            )
        elif kind == "output record":
            removing = "removing it lets the next run bind the output to its own image source"
        else:
            removing = (
                "if it is the newest entry of the spend log, removing it drops that one reservation (one "
                "submit's estimate) from the spend totals, so the spend cap counts that much less"
            )
        return JournalDamaged(
            f"the journal's {kind} {where} is damaged ({type(exc).__name__}: {str(exc)[:120]}): journal files are "
            "written whole, so it was truncated or changed by something else (a full disk, a copy, an edit). "
            f"Fix: restore it from a backup, or remove it after checking: {removing}.",
            path=where,
        )

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

        Raises ``ClaimTaken`` if another writer has it, ``JournalDamaged`` if what is there cannot be
        read, and ``SpendCapReached`` (after recording the claim as rejected, so the attempt is free
        again) if the cap would be passed.
        """
        claim = Claim(
            fingerprint=fingerprint,
            attempt=attempt,
            state=CLAIMED,
            partition=partition,
            owner=owner,
            claimed_at=self._clock(),
            estimate_usd=estimate_usd,
            input=dict(input),
            nonce=uuid.uuid4().hex,
        )
        path = self.claim_path(fingerprint, attempt)
        if not self._create_exclusive(path, claim.to_json()):
            raise ClaimTaken(self._read_claim(path))
        self._observe_store_clock(path)
        try:
            self._append_spend(estimate_usd, "reserve", fingerprint, attempt, cap=cap)
        except SpendCapReached as exc:
            refused = replace(claim, state=REJECTED, reason=str(exc), answered_at=self._clock())
            self._overwrite(path, refused.to_json())
            raise
        except Exception as exc:
            # Nothing was sent: free the attempt (best effort) rather than leave it open, later "ambiguous".
            reason = f"not sent: the spend log could not be written ({type(exc).__name__}: {str(exc)[:300]})"
            with contextlib.suppress(Exception):
                self._overwrite(
                    path, replace(claim, state=REJECTED, reason=reason, answered_at=self._clock()).to_json()
                )
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

    def _answer(
        self, claim: Claim, state: str, *, request_id: str | None = None, reason: str | None = None
    ) -> Claim:
        answered = replace(
            claim, state=state, request_id=request_id, reason=reason, answered_at=self._clock()
        )
        self._overwrite(self.claim_path(claim.fingerprint, claim.attempt), answered.to_json())
        return answered

    def adopt(
        self,
        fingerprint: str,
        attempt: int,
        request_id: str,
        *,
        note: str = "",
        verify: Callable[[str], None] | None = None,
    ) -> Claim:
        """Attach a request the operator found in their RunComfy history to an ambiguous (or open,
        abandoned) claim: it becomes ``submitted`` with that id, and is collected instead of paid again.
        ``verify`` (asking the service whether it knows the id) runs after the journal's own checks and
        before the claim is written; what it raises leaves the claim as it was."""
        claim = self.read(fingerprint, attempt)
        where = self.where(self.claim_path(fingerprint, attempt))
        if claim is None:
            raise JournalError(
                f"no claim {where}: attempt {attempt} of {fingerprint} was never made; "
                "list the claims with `dagster-runway journal list` and adopt one of those"
            )
        if not REQUEST_ID_PATTERN.match(request_id):
            raise JournalError(
                f"request id {request_id[:40]!r} is not 1-128 characters of [A-Za-z0-9_-]; copy the request "
                "id from your RunComfy history"
            )
        if claim.state in (SUBMITTED, REJECTED):
            known = f"request {claim.request_id}" if claim.state == SUBMITTED else "nothing was billed"
            raise JournalError(
                f"claim {where} is {claim.state} ({known}), not ambiguous: there is nothing to adopt; only an "
                "ambiguous or abandoned claimed attempt can be given a request id"
            )
        if claim.state == CLAIMED and claim.owner.process_alive():
            raise JournalError(
                f"claim {where} is still held by {claim.owner.describe()}, which is running and will record "
                "its answer; adopt it only once that process has ended"
            )
        if verify is not None:
            verify(request_id)
        reason = "adopted by the operator" + (f": {note}" if note else "")
        if claim.reason:
            reason += f" (was {claim.state}: {claim.reason})"
        adopted = replace(
            claim, state=SUBMITTED, request_id=request_id, reason=reason, answered_at=self._clock()
        )
        self._overwrite(self.claim_path(fingerprint, attempt), adopted.to_json())
        return adopted

    # Spend

    def settle(self, claim: Claim, cost_usd: float) -> bool:
        """Count an attempt's final cost (0 when refunded) in place of its estimate, at most once."""
        marker = f"{self.root}/settled/{claim.fingerprint[:2]}/{claim.fingerprint}/{claim.attempt:04d}.json"
        data = json.dumps({"cost_usd": cost_usd, "at": self._clock(), "nonce": uuid.uuid4().hex}).encode()
        if not self._create_exclusive(marker, data):
            return False
        self._observe_store_clock(marker)
        delta = round(cost_usd - claim.estimate_usd, 6)
        if delta:
            self._append_spend(delta, "settle", claim.fingerprint, claim.attempt, cap=None)
        return True

    def spent_usd(self, window_s: float | None = None) -> float:
        """Spend recorded in all (or over the last ``window_s`` seconds): estimates until settled."""
        with self._spend_lock:
            tip = self._find_tip()
            return round(self._window_total(tip, window_s, self._store_now()), 6)

    def spend_summary(self, window_s: float | None = None) -> SpendSummary:
        with self._spend_lock:
            tip = self._find_tip()
            window = (
                None if window_s is None else round(self._window_total(tip, window_s, self._store_now()), 6)
            )
            total = round(tip.total_usd, 6) if tip else 0.0
            return SpendSummary(
                total_usd=total, entries=tip.seq if tip else 0, window_s=window_s, window_usd=window
            )

    def _store_now(self) -> float:
        """The store's clock now, as last observed (never later than it really is)."""
        return self._clock() + self._store_offset

    def _observe_store_clock(self, path: str) -> None:
        """Learn the store's clock from the object just written (its modification time)."""
        try:
            written = os.stat(path).st_mtime if self._local else self.fs.modified(path).timestamp()
        except Exception:  # noqa: BLE001 - a store that tells no time: keep the last offset
            return
        self._store_offset = written - self._clock()

    def _append_spend(
        self, delta: float, kind: str, fingerprint: str, attempt: int, *, cap: SpendCap | None
    ) -> None:
        with self._spend_lock:
            tip = self._find_tip()
            for _ in range(_APPEND_TRIES):
                now = self._store_now()
                if cap is not None and delta > 0:
                    spent = self._window_total(tip, cap.window_s, now)
                    if spent + delta > cap.max_usd + 1e-9:
                        raise self._cap_error(tip, cap, spent, delta, now)
                seq = (tip.seq if tip else 0) + 1
                entry = SpendEntry(
                    seq=seq,
                    at=max(
                        now + self._store_resolution, tip.at if tip else 0.0
                    ),  # monotone: the search stays valid
                    delta_usd=delta,
                    total_usd=round((tip.total_usd if tip else 0.0) + delta, 6),
                    kind=kind,
                    fingerprint=fingerprint,
                    attempt=attempt,
                    nonce=uuid.uuid4().hex,
                )
                if self._create_exclusive(self._spend_path(seq), json.dumps(asdict(entry)).encode()):
                    self._spend_cache[seq] = self._spend_tip = entry
                    return
                tip = self._advance_tip(seq)  # another process appended first: read on, then retry
        raise JournalError(
            f"the spend log {self.where(f'{self.root}/spend')} did not take entry {seq} after {_APPEND_TRIES} tries "
            "(each create found an entry there); nothing was sent. Check that no tool rewrites the journal's folder."
        )

    def _cap_error(
        self, tip: SpendEntry | None, cap: SpendCap, spent: float, delta: float, now: float
    ) -> SpendCapReached:
        retry_at = None
        if cap.window_s is not None:
            fits = self._when_fits(tip, cap, delta, now)
            retry_at = None if fits is None else fits - self._store_offset  # on our clock
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
        """When (store clock) enough of the window's spend will have aged out for ``delta`` to fit."""
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
        """The first sequence number whose entry is at or after ``since`` (binary search over monotone stamps)."""
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
        """Entry ``seq``, ``None`` if it does not exist; ``JournalDamaged`` if it cannot be read."""
        if seq in self._spend_cache:
            return self._spend_cache[seq]
        path = self._spend_path(seq)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            entry = SpendEntry(**_known(SpendEntry, json.loads(data)))
            if entry.seq != seq:
                raise ValueError(f"it says it is entry {entry.seq}")
        except (ValueError, TypeError, AttributeError) as exc:
            raise self._damaged(path, "spend entry", exc) from exc
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

    @property
    def _temp_dir(self) -> str:
        return f"{self.root}/tmp"

    def _temp_path(self) -> str:
        """A temporary file under the root (the same filesystem as its target, for os.link), named after
        its writer so that the next run can tell a dead writer's litter from a live one's file."""
        return f"{self._temp_dir}/.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"

    def _write_temp(self, parent: str, data: bytes) -> str:
        os.makedirs(parent, exist_ok=True)
        os.makedirs(self._temp_dir, exist_ok=True)
        temp = self._temp_path()
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temp

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` with ``data`` only if it does not exist; ``False`` if it does.

        An object that exists holding exactly ``data`` is ours (``data`` carries a writer nonce): a
        create retried after its first try landed and its answer was lost."""
        if self._local:
            temp = self._write_temp(path.rsplit("/", 1)[0], data)
            try:
                os.link(temp, path)  # atomic and exclusive, and readers never see a partial file
                return True
            except FileExistsError:
                pass
            finally:
                os.unlink(temp)
        else:
            try:
                # One PUT with If-None-Match: * on S3. Not fs.open(path, "xb"): when its close fails, the file
                # object retries the PUT again from __del__.
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                pass
        try:
            return bool(self.fs.cat_file(path) == data)
        except FileNotFoundError:
            return False

    def _overwrite(self, path: str, data: bytes) -> None:
        if self._local:
            os.replace(self._write_temp(path.rsplit("/", 1)[0], data), path)
            return
        self.fs.pipe_file(path, data)

    def _remove(self, path: str) -> None:
        """Best effort: a store that grants no delete (the journal deletes nothing else) keeps the object."""
        with contextlib.suppress(OSError):
            self.fs.rm_file(path)


def location_identity(location: str) -> str:
    """How a source or an output is named in an output record: a local folder by its resolved absolute
    path, anything else by its URL without credentials or a trailing ``/``."""
    if "://" not in location or location.startswith("file://"):
        return os.path.realpath(location.removeprefix("file://"))
    return redact_url(location).rstrip("/")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


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
    again before each judgement: ``claim`` may be a copy taken before its owner answered and ended.
    A claim that has become unreadable raises ``JournalDamaged``."""
    deadline = time.monotonic() + timeout_s
    current = claim
    while True:
        try:
            current = journal.read(claim.fingerprint, claim.attempt) or current
        except JournalDamaged:
            raise
        except Exception:  # noqa: BLE001, S110 - a passing store error: judge the copy we have
            pass
        if current.state != CLAIMED or time.monotonic() >= deadline or not owner_alive(current.owner):
            return current
        time.sleep(poll_s)


__all__ = [
    "AMBIGUOUS",
    "CLAIMED",
    "REJECTED",
    "STATES",
    "SUBMITTED",
    "Claim",
    "ClaimTaken",
    "Journal",
    "JournalDamaged",
    "JournalError",
    "JournalStoreUnsafe",
    "Owner",
    "SpendCap",
    "SpendCapReached",
    "SpendEntry",
    "SpendSummary",
    "wait_for_answer",
]
