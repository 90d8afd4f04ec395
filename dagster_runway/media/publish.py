"""Atomic publishing: what a reader sees at a destination is the old object or the whole new one.

* local disk: a hidden temporary file in the destination's own folder (``.name.<pid>.<random>.part``),
  fsynced, then renamed over the final name with ``os.replace`` (atomic on POSIX);
  :func:`remove_stale_parts` deletes what a killed process left;
* S3: spooled to a local temporary file, then uploaded as a multipart upload opened with
  ``autocommit=False``: the object appears only at ``commit()``, and ``discard()`` aborts the upload
  (a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` removes one a killed process left);
* other filesystems: spooled, uploaded to a temporary sibling, then moved.
"""

from __future__ import annotations

import contextlib
import glob
import mimetypes
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import Any, BinaryIO

import fsspec

from dagster_runway._process import pid_alive

from ._fs import full_url, is_local, is_s3, url_to_fs

S3_PART_SIZE = 8 * 1024 * 1024


def part_prefix(path: str) -> str:
    """The name prefix of the temporary files of ``path`` (``.name.``): each is ``.name.<pid>.<random>.part``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.")


class _Body:
    """The temporary file a body is written to before it is published."""

    handle: BinaryIO | None

    def write(self, data: bytes) -> None:
        assert self.handle is not None
        self.handle.write(data)

    def reset(self) -> None:
        """Start the body again (a retried download)."""
        assert self.handle is not None
        self.handle.seek(0)
        self.handle.truncate()


class LocalSink(_Body):
    """A hidden temporary file beside the destination, renamed over it on commit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path) or "."
        os.makedirs(self.folder, exist_ok=True)
        self.local_path = f"{part_prefix(path)}{os.getpid()}.{uuid.uuid4().hex[:12]}.part"
        self.handle = open(self.local_path, "wb")  # noqa: SIM115 - closed in commit/abort

    def close(self) -> None:
        """Flush the body to disk, so that it can be checked before the commit."""
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None

    def commit(self) -> None:
        self.close()
        os.replace(self.local_path, self.path)
        with contextlib.suppress(OSError):  # not every platform can fsync a directory
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path)


class SpoolSink(_Body):
    """Any remote filesystem: the body is spooled to a local temporary file (so it can be checked), then
    uploaded. On S3 the upload is a multipart upload opened with ``autocommit=False``: the object
    appears only at ``commit()``, and ``discard()`` aborts it. Elsewhere, a temporary sibling is moved
    over the destination."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, content_type: str) -> None:
        self.fs, self.path, self.content_type = fs, path, content_type
        handle, self.local_path = tempfile.mkstemp(prefix="dagster-runway-", suffix=".part")
        self.handle = os.fdopen(handle, "wb")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def commit(self) -> None:
        self.close()
        try:
            if is_s3(self.fs):
                self._upload(self.path, autocommit=False)
            else:
                folder, _, name = self.path.rpartition("/")
                temp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.part" if folder else f".{name}.part"
                self._upload(temp, autocommit=True)
                self.fs.mv(temp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.local_path)

    def _upload(self, path: str, *, autocommit: bool) -> None:
        extra = {"ContentType": self.content_type} if is_s3(self.fs) else {}
        remote = self.fs.open(path, "wb", block_size=S3_PART_SIZE, autocommit=autocommit, **extra)
        try:
            with open(self.local_path, "rb") as local:
                while chunk := local.read(S3_PART_SIZE):
                    remote.write(chunk)
            if autocommit:
                remote.close()
            else:
                remote.close()  # uploads the last part; nothing is visible yet
                remote.commit()  # completes the upload: the object appears now
        except BaseException:
            with contextlib.suppress(Exception):
                remote.discard()  # aborts the multipart upload
            raise

    def abort(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path)


Sink = LocalSink | SpoolSink


def open_sink(fs: fsspec.AbstractFileSystem, path: str, content_type: str) -> Sink:
    return LocalSink(path) if is_local(fs) else SpoolSink(fs, path, content_type)


def guess_content_type(dest: str, default: str = "video/mp4") -> str:
    guessed, _ = mimetypes.guess_type(dest.split("?", 1)[0])
    return guessed or default


def write_bytes_atomic(
    dest: str,
    data: bytes,
    *,
    storage_options: Mapping[str, Any] | None = None,
    content_type: str | None = None,
) -> str:
    """Write small ``data`` to ``dest`` atomically (a temporary file renamed locally, one PUT on object
    stores); return the URI."""
    fs, path = url_to_fs(dest, storage_options)
    if is_local(fs):
        sink = LocalSink(path)
        try:
            sink.write(data)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    else:
        extra = {"ContentType": content_type or guess_content_type(dest, "application/octet-stream")}
        fs.pipe_file(path, data, **(extra if is_s3(fs) else {}))
    return full_url(fs, path)


def remove_stale_parts(
    dest: str, storage_options: Mapping[str, Any] | None = None, *, older_than_s: float = 3600
) -> int:
    """Delete temporary files that earlier attempts left beside a local ``dest`` (a kill mid-download):
    those of processes that are gone, and any older than ``older_than_s``. Returns how many."""
    fs, path = url_to_fs(dest, storage_options)
    if not is_local(fs):
        return 0  # remote uploads are never visible before their commit
    prefix = part_prefix(path)
    removed = 0
    for candidate in glob.glob(glob.escape(prefix) + "*.part"):
        pid_text = candidate[len(prefix) :].split(".", 1)[0]
        try:
            stale = time.time() - os.path.getmtime(candidate) > older_than_s or not pid_alive(int(pid_text))
        except (OSError, ValueError):
            stale = True
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(candidate)
                removed += 1
    return removed
