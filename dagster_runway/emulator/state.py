"""The requests' state machine on the emulator clock, per account, and the ledger beside it.

A request waits ``in_queue`` for its drawn queue time and for a free slot of its account (at most
``max_concurrency`` in progress; the oldest ready request goes first), then is ``in_progress`` for
its drawn render time and until its work (image fetch, checks, rendering) is done, then ends
``succeeded`` or ``failed``. Only a queued request can be ``cancelled``; it is then refunded. A submit
is billed the configured price (per second of video, or per output); a failed one is refunded when
the config's ``bill_failed`` is off.

All state sits behind one lock and is advanced from timestamps each time it is read, so answers
are right however often and from however many threads it is polled. The worker also advances it
at each deadline, so that work starts on time without polling.

With a journal (a state directory), every change is on disk before the lock is let go: a submit
is stored before its answer is sent. A store that opens a journal takes its requests and its
clock from it; the requests whose work was not done are worked again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dagster_runway.emulator.config import EmulatorConfig
from dagster_runway.emulator.inputs import ModelInput
from dagster_runway.emulator.ledger import Ledger, LedgerEntry
from dagster_runway.emulator.persist import StateJournal
from dagster_runway.emulator.render import Video

logger = logging.getLogger(__name__)

State = Literal["in_queue", "in_progress", "succeeded", "failed", "cancelled"]
TERMINAL: tuple[State, ...] = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class GenerationFailure:
    """Why a request failed: a code such as ``SAFETY.INPUT.IMAGE`` and a message."""

    code: str
    message: str


class UnknownRequest(Exception):
    """No such request id, or it expired."""


class ForeignRequest(Exception):
    """The request id belongs to another account."""


class InsufficientBalance(Exception):
    """The submit would take the account past its balance."""


class Clock:
    """Wall-clock seconds that stand still while paused."""

    def __init__(self, paused: bool, at: float | None = None) -> None:
        """A clock that reads ``at`` now (by default the wall clock's time), frozen if ``paused``."""
        now = time.time() if at is None else at
        self._offset = now - time.monotonic()
        self._frozen: float | None = now if paused else None

    @classmethod
    def restore(cls, saved: dict[str, Any]) -> Clock:
        """The clock of ``saved()``: a running clock counts the time since as passed, a paused one not."""
        if saved["paused"]:
            return cls(True, saved["at"])
        return cls(False, saved["at"] + max(0.0, time.time() - saved["wall"]))

    def saved(self) -> dict[str, Any]:
        return {"at": self.now(), "wall": time.time(), "paused": self.paused}

    @property
    def paused(self) -> bool:
        return self._frozen is not None

    def now(self) -> float:
        return self._frozen if self._frozen is not None else time.monotonic() + self._offset

    def pause(self) -> None:
        if self._frozen is None:
            self._frozen = self.now()

    def resume(self) -> None:
        if self._frozen is not None:
            self._offset = self._frozen - time.monotonic()
            self._frozen = None


@dataclass
class _Record:
    request_id: str
    account: str
    seq: int
    generation: int
    fields: dict[str, Any]
    render: dict[str, Any]  # ratio, duration, seed: what the video is made of
    image: str | None
    fingerprint: str
    cost: float
    created: float
    queue_wait: float
    render_time: float
    injected: GenerationFailure | None
    state: State = "in_queue"
    started: float | None = None
    finished: float | None = None
    expired: bool = False
    claimed: bool = False
    work_done: float | None = None
    outcome: Video | GenerationFailure | None = None


@dataclass(frozen=True)
class RequestView:
    """A consistent snapshot of one request, for an answer."""

    request_id: str
    state: State
    queue_position: int | None
    fields: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    cost: float
    video: Video | None
    failure: GenerationFailure | None


@dataclass(frozen=True)
class Job:
    """The work of a request that just started: get and check its image, then render."""

    request_id: str
    generation: int
    image: str
    ratio: str
    duration: int
    seed: int
    injected: GenerationFailure | None


class Store:
    """Every request and the ledger, advanced lazily on the emulator clock."""

    def __init__(self, config: EmulatorConfig, on_change: Callable[[], None]) -> None:
        self._config = config
        self._on_change = on_change
        self._lock = threading.RLock()
        self._generation = 0
        self._journal: StateJournal | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._records: dict[str, _Record] = {}
        self._seq = 0
        self._rng = random.Random(self._config.random_seed)
        self.clock = Clock(self._config.paused)
        # What the journal lacks: changed requests, the clock, and whether to delete every request first.
        self._dirty: set[str] = set()
        self._clock_dirty = True
        self._clear = True

    # Persistence

    def open(self, journal: StateJournal) -> None:
        """Take the requests and the clock stored in ``journal``, and write every change to it from now on."""
        rows, clock = journal.load()
        with self._lock:
            if self._records:
                raise RuntimeError("the store already holds requests; open the journal before any submit")
            self._records = {row["request_id"]: _load(row, journal.files_dir) for row in rows}
            self._seq = max((record.seq for record in self._records.values()), default=0)
            if clock is not None:
                self.clock = Clock.restore(clock)
            self._journal, self._clear, self._clock_dirty = journal, False, True
            self._flush()
            known = set(self._records)
            to_render = sum(r.state == "in_progress" and r.outcome is None for r in self._records.values())
        for path in journal.files_dir.iterdir():  # renders cut short by a kill, videos of forgotten requests
            if path.suffix != ".mp4" or path.stem not in known:
                path.unlink(missing_ok=True)
        logger.info(
            "emulator: %d requests restored from %s, %d to render again",
            len(known),
            journal.state_dir,
            to_render,
        )
        self._on_change()

    def close(self) -> None:
        """Write what is left to the journal and let it go; from then on the store lives in memory only."""
        with self._lock:
            if self._journal is not None:
                self._flush()
                self._journal.close()
                self._journal = None

    # Control

    def reset(self) -> None:
        """Forget every request and the ledger, delete the videos, and start afresh."""
        with self._lock:
            gone = list(self._records.values())
            self._generation += 1
            self._reset_state()
            self._flush()  # forgotten on disk before their videos go
            for record in gone:
                _delete_video(record)
        self._on_change()

    def pause(self) -> None:
        with self._session():
            self.clock.pause()
            self._clock_dirty = True

    def resume(self) -> None:
        with self._session():
            self.clock.resume()
            self._clock_dirty = True
            self._advance()
        self._on_change()

    @property
    def paused(self) -> bool:
        with self._lock:
            return self.clock.paused

    # Requests

    def submit(
        self,
        account: str,
        model_input: ModelInput,
        model_id: str,
        injected: GenerationFailure | None,
        price: tuple[float, str] | None = None,
    ) -> str:
        """Record and bill a new request (on disk too, with a journal); its queue and render times
        are drawn now. ``price`` is (USD, unit) of a catalog model; the config's price by default."""
        config = self._config
        render = model_input.render
        duration = render["duration"]
        usd, unit = price if price is not None else (config.price_usd, config.price_unit)
        cost = round(usd * (duration if unit == "second" else 1), 6)
        with self._session():
            if config.balance_usd is not None:
                spent = sum(self._charged(r) for r in self._records.values() if r.account == account)
                if spent + cost > config.balance_usd + 1e-9:
                    raise InsufficientBalance(
                        f"balance too low: this request costs ${cost:.2f}, "
                        f"${max(config.balance_usd - spent, 0.0):.2f} of ${config.balance_usd:.2f} is left"
                    )
            factor = config.long_render_factor if duration == 10 else 1.0
            record = _Record(
                request_id=uuid.uuid4().hex,
                account=account,
                seq=self._seq + 1,
                generation=self._generation,
                fields=model_input.fields,
                render=render,
                image=model_input.prompt_image,
                fingerprint=model_input.fingerprint(model_id),
                cost=cost,
                created=self.clock.now(),
                queue_wait=self._rng.uniform(*config.queue_seconds) * config.time_scale,
                render_time=self._rng.uniform(*config.render_seconds) * factor * config.time_scale,
                injected=injected,
            )
            self._records[record.request_id] = record
            self._dirty.add(record.request_id)
            try:
                self._advance()
                self._flush()
            except BaseException:  # not on disk, so not accepted
                del self._records[record.request_id]
                self._dirty.discard(record.request_id)
                raise
            self._seq = record.seq
        self._on_change()
        return record.request_id

    def view(self, account: str, request_id: str) -> RequestView:
        """The request as its owner sees it now."""
        with self._session():
            return self._view(self._owned(account, request_id))

    def cancel(self, account: str, request_id: str) -> tuple[RequestView, bool]:
        """Cancel the request if it is still queued (refunding it); say whether it was."""
        with self._session():
            record = self._owned(account, request_id)
            cancelled = record.state == "in_queue"
            if cancelled:
                record.state, record.finished = "cancelled", self.clock.now()
                record.cost, record.image = 0.0, None  # refunded
                self._dirty.add(record.request_id)
                self._advance()
            view = self._view(record)
        if cancelled:
            self._on_change()
        return view, cancelled

    def peek(self, request_id: str) -> RequestView | None:
        """The request whoever asks, or None if unknown or expired (for unauthenticated file downloads)."""
        with self._session():
            record = self._records.get(request_id)
            return None if record is None or record.expired else self._view(record)

    def state_of(self, request_id: str) -> str:
        """The request's internal state, or ``expired``; KeyError if unknown."""
        with self._session():
            record = self._records[request_id]
            return "expired" if record.expired else record.state

    def times_of(self, request_id: str) -> tuple[float, float]:
        """The request's drawn queue wait and render time, in seconds (time scale applied); KeyError if unknown."""
        with self._session():
            record = self._records[request_id]
            return record.queue_wait, record.render_time

    def input_of(self, request_id: str) -> dict[str, Any]:
        """The input fields the request was submitted with (what the service generates from); KeyError if unknown."""
        with self._session():
            return dict(self._records[request_id].fields)

    def ledger(self) -> Ledger:
        with self._session():
            entries = []
            for record in self._records.values():
                video = record.outcome if isinstance(record.outcome, Video) else None
                entries.append(
                    LedgerEntry(
                        request_id=record.request_id,
                        account=record.account,
                        fingerprint=record.fingerprint,
                        duration=record.render["duration"],
                        cost_usd=self._charged(record),
                        billed=self._billed(record),
                        state=record.state,
                        expired=record.expired,
                        submitted_at=datetime.fromtimestamp(record.created, UTC),
                        video_sha256=video.sha256 if video else None,
                        video_bytes=video.size if video else None,
                    )
                )
            return Ledger.of(entries)

    def _billed(self, record: _Record) -> bool:
        """Whether the request stays charged: not once cancelled, nor once failed without bill_failed."""
        return record.state != "cancelled" and (record.state != "failed" or self._config.bill_failed)

    def _charged(self, record: _Record) -> float:
        return record.cost if self._billed(record) else 0.0

    # The worker's side

    @property
    def durable(self) -> bool:
        """Whether changes go to disk; then a video must be on disk before its request says it is done."""
        return self._journal is not None

    def claim_work(self) -> list[Job]:
        """The jobs of requests that started and have no worker yet, now claimed."""
        with self._session():
            jobs = []
            for record in self._records.values():
                if record.state == "in_progress" and not record.claimed and record.image is not None:
                    record.claimed = True
                    render = record.render
                    jobs.append(
                        Job(
                            request_id=record.request_id,
                            generation=record.generation,
                            image=record.image,
                            ratio=render["ratio"],
                            duration=render["duration"],
                            seed=render["seed"],
                            injected=record.injected,
                        )
                    )
            return jobs

    def finish_work(self, job: Job, outcome: Video | GenerationFailure) -> None:
        """Store a job's outcome; the request ends once its render time is over too."""
        with self._session():
            record = self._records.get(job.request_id)
            if record is None or record.generation != job.generation or record.expired:
                if isinstance(outcome, Video):
                    outcome.path.unlink(missing_ok=True)
                return
            record.outcome, record.work_done, record.image = outcome, self.clock.now(), None
            self._dirty.add(record.request_id)
            self._advance()
        self._on_change()

    def seconds_to_next_event(self) -> float | None:
        """Emulator seconds until the next start, end or expiry; None while paused or idle."""
        with self._session():
            if self.clock.paused:
                return None
            now, ttl = self.clock.now(), self._config.ttl_seconds
            times = []
            for record in self._records.values():
                if record.expired:
                    continue
                times.append(record.created + ttl)
                # A ready request that waits for a slot starts when a running one ends.
                if record.state == "in_queue" and record.created + record.queue_wait > now:
                    times.append(record.created + record.queue_wait)
                elif record.state == "in_progress" and record.outcome is not None:
                    assert record.started is not None
                    times.append(record.started + record.render_time)
            return max(0.0, min(times) - now) if times else None

    # Internals, called with the lock held

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """The lock, held with every request brought up to the clock; what changed is on disk after."""
        with self._lock:
            try:
                self._advance()
                yield
            finally:
                self._flush()

    def _flush(self) -> None:
        """Write what changed to the journal in one transaction (if there is a journal)."""
        if self._journal is not None and (self._dirty or self._clock_dirty or self._clear):
            records = [_dump(self._records[i]) for i in self._dirty if i in self._records]
            self._journal.write(records, self.clock.saved() if self._clock_dirty else None, clear=self._clear)
        self._dirty.clear()
        self._clock_dirty = self._clear = False

    def _owned(self, account: str, request_id: str) -> _Record:
        record = self._records.get(request_id)
        if record is None or record.expired:
            raise UnknownRequest(request_id)
        if record.account != account:
            raise ForeignRequest(request_id)
        return record

    def _view(self, record: _Record) -> RequestView:
        position = None
        if record.state == "in_queue":
            position = 1 + sum(
                1
                for other in self._records.values()
                if other.account == record.account and other.state == "in_queue" and other.seq < record.seq
            )
        outcome = record.outcome if record.state in TERMINAL else None
        return RequestView(
            request_id=record.request_id,
            state=record.state,
            queue_position=position,
            fields=record.fields,
            created=record.created,
            started=record.started,
            finished=record.finished,
            cost=self._charged(record),
            video=outcome if isinstance(outcome, Video) else None,
            failure=outcome if isinstance(outcome, GenerationFailure) else None,
        )

    def _advance(self) -> None:
        """Bring every request up to the emulator clock: expire, finish, then start in order."""
        if self.clock.paused:
            return
        now, config = self.clock.now(), self._config
        started = False
        running: dict[str, int] = {}
        # The dict keeps submission order.
        for record in self._records.values():
            if record.expired:
                continue
            if now >= record.created + config.ttl_seconds:
                record.expired, record.image = True, None
                _delete_video(record)
                self._dirty.add(record.request_id)
                continue
            if record.state == "in_progress" and record.outcome is not None:
                assert record.started is not None and record.work_done is not None
                due = record.started + record.render_time
                if now >= due:
                    record.finished = max(due, record.work_done)
                    record.state = "succeeded" if isinstance(record.outcome, Video) else "failed"
                    self._dirty.add(record.request_id)
            if record.state == "in_progress":
                running[record.account] = running.get(record.account, 0) + 1
        for record in self._records.values():
            if record.state != "in_queue" or record.expired or now < record.created + record.queue_wait:
                continue
            if running.get(record.account, 0) < config.max_concurrency:
                running[record.account] = running.get(record.account, 0) + 1
                record.state, record.started = "in_progress", now
                self._dirty.add(record.request_id)
                started = True
        if started:
            self._on_change()


def _delete_video(record: _Record) -> None:
    if isinstance(record.outcome, Video):
        record.outcome.path.unlink(missing_ok=True)


# The _Record fields the journal keeps as they are; "claimed" is not kept (unfinished work is redone),
# nor "generation" (a count of resets in this process).
_PLAIN_FIELDS = (
    "request_id",
    "account",
    "seq",
    "fields",
    "render",
    "image",
    "fingerprint",
    "cost",
    "created",
    "queue_wait",
    "render_time",
    "state",
    "started",
    "finished",
    "expired",
    "work_done",
)


def _dump(record: _Record) -> dict[str, Any]:
    """A request as the journal stores it: JSON-ready."""
    outcome: dict[str, Any] | None = None
    if isinstance(record.outcome, Video):
        outcome = {"video": {"sha256": record.outcome.sha256, "size": record.outcome.size}}
    elif isinstance(record.outcome, GenerationFailure):
        outcome = {"failure": vars(record.outcome)}
    injected = vars(record.injected) if record.injected is not None else None
    return {key: getattr(record, key) for key in _PLAIN_FIELDS} | {"injected": injected, "outcome": outcome}


def _load(row: dict[str, Any], files_dir: Path) -> _Record:
    """A request from the journal; its video, if any, is in ``files_dir``."""
    outcome: Video | GenerationFailure | None = None
    if row["outcome"] is not None and "video" in row["outcome"]:
        video = row["outcome"]["video"]
        outcome = Video(files_dir / f"{row['request_id']}.mp4", video["sha256"], video["size"])
    elif row["outcome"] is not None:
        outcome = GenerationFailure(**row["outcome"]["failure"])
    injected = GenerationFailure(**row["injected"]) if row["injected"] is not None else None
    if "render" not in row:  # a journal of an emulator before catalog models: Gen-4 Turbo's names
        row = {**row, "render": {name: row["fields"][name] for name in ("ratio", "duration", "seed")}}
    return _Record(
        **{key: row[key] for key in _PLAIN_FIELDS}, generation=0, injected=injected, outcome=outcome
    )
