"""The emulator's state on disk: requests, the ledger and the clock in SQLite, videos beside it.

SQLite rather than a JSON snapshot rewritten through a temporary file and os.replace: a change
writes only the requests it touched, so a submit costs the same with ten requests stored or ten
thousand; several requests that change at once (a start and an end, a reset) are committed
together or not at all; and a commit is one fsync of the write-ahead log. A kill at any moment
leaves the last committed state, which SQLite recovers on the next open. The database is opened in
exclusive locking mode, so a second emulator on the same directory is refused, and the lock
goes with the process that held it, however it ended.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_SCHEMA_VERSION = 1
_DATABASE = "emulator.sqlite3"


class StateDirError(RuntimeError):
    """The state directory cannot be used: in use by another emulator, or of another version."""


class StateJournal:
    """One emulator's hold on a state directory: ``emulator.sqlite3`` and the videos in ``files/``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.files_dir = state_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        # Autocommit mode; _transaction() draws each transaction's bounds.
        self._db = sqlite3.connect(
            state_dir / _DATABASE, isolation_level=None, check_same_thread=False, timeout=1.0
        )
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            with self._transaction():  # the first write takes the exclusive lock, kept until close
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS requests "
                    "(request_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, record TEXT NOT NULL)"
                )
                version = self._meta("version")
                if version is None:
                    self._put_meta("version", _SCHEMA_VERSION)
                elif version != _SCHEMA_VERSION:
                    raise StateDirError(
                        f"{state_dir}: the emulator state is of version {version}, this emulator reads "
                        f"version {_SCHEMA_VERSION}; use another --state-dir"
                    )
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise StateDirError(
                    f"{state_dir}: another emulator is using this state directory; stop it or use "
                    "another --state-dir"
                ) from exc
            raise
        except BaseException:
            self._db.close()
            raise

    def load(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The stored requests in submission order, and the stored clock (None if there is none)."""
        rows = self._db.execute("SELECT record FROM requests ORDER BY seq").fetchall()
        return [json.loads(record) for (record,) in rows], self._meta("clock")

    def write(
        self, records: Iterable[dict[str, Any]], clock: dict[str, Any] | None, clear: bool = False
    ) -> None:
        """Store these requests (and the clock, if given) in one transaction, on disk when it returns.

        With ``clear``, every stored request is deleted first.
        """
        with self._transaction():
            if clear:
                self._db.execute("DELETE FROM requests")
            self._db.executemany(
                "INSERT OR REPLACE INTO requests (request_id, seq, record) VALUES (?, ?, ?)",
                [(r["request_id"], r["seq"], json.dumps(r, separators=(",", ":"))) for r in records],
            )
            if clock is not None:
                self._put_meta("clock", clock)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def _put_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))
