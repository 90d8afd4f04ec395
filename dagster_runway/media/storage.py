"""Streaming, atomic storage of generated videos on any fsspec filesystem.

:func:`store_video` streams the body of a video URL to its destination in 1 MiB pieces (memory stays
flat whatever the size), hashing it (sha256) and counting it on the way, and publishes the final path
only once the body is complete and matches ``Content-Length``. A reader never sees a partial file:

* local disk: the body goes to a hidden temporary file in the destination's own folder
  (``.name.<random>.part``), which is fsynced and then renamed over the final name with
  ``os.replace`` (atomic on POSIX), and the folder is fsynced;
* S3: the body goes straight to the final key as a multipart upload (8 MiB parts). S3 makes an
  object visible only when ``CompleteMultipartUpload`` (or the single ``PutObject`` of a small file)
  succeeds, so the final key appears whole or not at all, with no temporary key, no server-side copy
  of the whole video, and nothing to clean up after a crash but an incomplete upload, which is
  aborted on every failure (and which a bucket lifecycle rule ``AbortIncompleteMultipartUpload``
  removes if the process dies). A copy from a temporary key would double the I/O and leave a visible
  temporary object behind after a crash;
* other filesystems: a temporary sibling path, then ``fs.mv`` to the final path.

A truncated body (the connection closes early, ``httpx.RemoteProtocolError``, or fewer bytes than
``Content-Length``), a transport error, or a 408/425/429/5xx answer is retried with exponential
backoff and full jitter, up to ``attempts`` in all. A retry resumes with a ``Range`` request when the
server supports ranges (guarded by ``If-Range`` on the ETag), and starts over otherwise. On final
failure nothing is published and no temporary file or upload is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mimetypes
import os
import random
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import fsspec
import httpx

from dagster_runway._redact import redact_url

from ._fs import full_url, is_local, protocols, url_to_fs
from .errors import DownloadError, redact_message

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
S3_PART_SIZE = 8 * 1024 * 1024
RETRY_AFTER_MAX_S = 30.0
BACKOFF_MAX_S = 10.0
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True)
class StoredVideo:
    """A video stored at ``uri``: its size, sha256 and content type, and the attempts it took."""

    uri: str
    size: int
    sha256: str
    content_type: str
    attempts: int = 1


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    def reset(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class _LocalSink:
    """A hidden temporary file beside the destination, renamed over it on commit."""

    def __init__(self, path: str) -> None:
        folder, name = os.path.split(path)
        self.path = path
        self.folder = folder or "."
        os.makedirs(self.folder, exist_ok=True)
        self.tmp = os.path.join(self.folder, f".{name}.{uuid.uuid4().hex[:12]}.part")
        self.handle: BinaryIO | None = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> None:
        assert self.handle is not None
        self.handle.write(data)

    def reset(self) -> None:
        assert self.handle is not None
        self.handle.seek(0)
        self.handle.truncate()

    def commit(self) -> None:
        assert self.handle is not None
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.handle = None
        os.replace(self.tmp, self.path)
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
            os.unlink(self.tmp)


class _S3Sink:
    """A multipart upload straight to the final key: invisible until completed, aborted on failure."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, content_type: str) -> None:
        self.fs, self.path, self.content_type = fs, path, content_type
        self.handle: Any = None
        self._open()

    def _open(self) -> None:
        self.handle = self.fs.open(self.path, "wb", block_size=S3_PART_SIZE, ContentType=self.content_type)

    def write(self, data: bytes) -> None:
        self.handle.write(data)

    def _discard(self) -> None:
        if self.handle is not None:
            try:
                self.handle.discard()  # aborts the multipart upload, if one was started
            finally:
                self.handle.closed = True  # so neither close() nor the garbage collector commits it
                self.handle = None

    def reset(self) -> None:
        self._discard()
        self._open()

    def commit(self) -> None:
        handle = self.handle
        try:
            handle.close()  # uploads the last part and completes the upload: the object appears now
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()
            handle.closed = True
            raise
        finally:
            self.handle = None

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._discard()


class _TempRenameSink:
    """Any other fsspec filesystem: a temporary sibling path, moved over the destination on commit."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        folder, _, name = path.rpartition("/")
        self.fs, self.path = fs, path
        self.tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.part" if folder else f".{name}.part"
        self.handle: Any = fs.open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        self.handle.write(data)

    def reset(self) -> None:
        self.handle.close()
        self.handle = self.fs.open(self.tmp, "wb")

    def commit(self) -> None:
        self.handle.close()
        self.handle = None
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(Exception):
                self.handle.close()
            self.handle = None
        with contextlib.suppress(Exception):
            self.fs.rm(self.tmp)


def _open_sink(fs: fsspec.AbstractFileSystem, path: str, content_type: str) -> _Sink:
    if is_local(fs):
        return _LocalSink(path)
    if {"s3", "s3a"} & set(protocols(fs)):
        return _S3Sink(fs, path, content_type)
    return _TempRenameSink(fs, path)


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
    """Write ``data`` to ``dest`` with the same atomic publish as :func:`store_video`; return the URI."""
    fs, path = url_to_fs(dest, storage_options)
    sink = _open_sink(fs, path, content_type or guess_content_type(dest, "application/octet-stream"))
    try:
        sink.write(data)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return full_url(fs, path)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


#: Transport failures worth another attempt: timeouts, resets, refused connections, bodies cut short.
_RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(RETRY_AFTER_MAX_S, float(value)))
    except ValueError:
        return None


def _permanent_fix(status: int) -> str:
    if status in (401, 403, 404, 410):
        return (
            "the link may have expired or be private (generated videos are kept only for a limited time); "
            "fetch the request's result again for a fresh URL"
        )
    return "check the URL"


class _Download:
    """The state of one :func:`store_video` call across its attempts."""

    def __init__(
        self, url: str, dest: str, fs: fsspec.AbstractFileSystem, path: str, content_type: str | None
    ) -> None:
        self.url, self.dest, self.fs, self.path = url, dest, fs, path
        self.shown = f"{redact_url(url)} -> {full_url(fs, path)}"
        self.sink: _Sink | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        self.total: int | None = None
        self.etag: str | None = None
        self.resumable = False
        self.content_type = content_type

    def _restart(self, response: httpx.Response, length: int | None, encoded: bool) -> None:
        if self.sink is not None and self.received:
            logger.info("restarting download of %s from the first byte", redact_url(self.url))
            self.sink.reset()
        self.digest, self.received = hashlib.sha256(), 0
        self.total = None if encoded else length
        self.etag = response.headers.get("etag")
        self.resumable = (
            not encoded
            and response.headers.get("accept-ranges", "").lower() == "bytes"
            and self.etag is not None
            and not self.etag.startswith("W/")
        )
        if self.content_type is None:
            served = response.headers.get("content-type", "").split(";")[0].strip().lower()
            self.content_type = served if served.startswith("video/") else guess_content_type(self.dest)

    def attempt(self, http: httpx.Client, chunk_size: int) -> None:
        """One GET: resumes with a Range request when it can. Raises _Retryable or DownloadError."""
        headers = {"Accept-Encoding": "identity"}
        resuming = self.sink is not None and self.received > 0 and self.resumable
        if resuming:
            headers["Range"] = f"bytes={self.received}-"
            headers["If-Range"] = str(self.etag)
        try:
            with http.stream("GET", self.url, headers=headers) as response:
                self._consume(response, resuming, chunk_size)
        except _RETRY_ERRORS as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a bad URL, a redirect loop: retrying cannot help
            raise DownloadError(f"{self.shown}: {type(exc).__name__}: {exc}; check the video URL") from None

    def _consume(self, response: httpx.Response, resuming: bool, chunk_size: int) -> None:
        status = response.status_code
        if status in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}", _retry_after(response))
        if status not in (200, 206):
            raise DownloadError(f"{self.shown}: HTTP {status} from the video URL; {_permanent_fix(status)}")
        length_header = response.headers.get("content-length", "")
        length = int(length_header) if length_header.isdigit() else None
        encoded = response.headers.get("content-encoding", "identity").lower() not in ("identity", "")
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if not resuming or not match or int(match.group(1)) != self.received:
                raise _Retryable("the server answered with a range that was not asked for")
            if match.group(3) != "*":
                self.total = int(match.group(3))
        else:
            self._restart(response, length, encoded)
        if self.sink is None:
            self.sink = _open_sink(self.fs, self.path, self.content_type or guess_content_type(self.dest))
        # Raw network reads, not re-buffered: whatever arrived before a failure is kept for a resume.
        chunks = response.iter_bytes(chunk_size) if encoded else response.iter_raw()
        for chunk in chunks:
            self.sink.write(chunk)
            self.digest.update(chunk)
            self.received += len(chunk)
        if length is not None and response.num_bytes_downloaded != length:
            raise _Retryable(
                f"body truncated: {response.num_bytes_downloaded} of {length} bytes in this response"
            )
        if self.total is not None and self.received != self.total:
            raise _Retryable(f"body truncated: {self.received} of {self.total} bytes")
        if self.received == 0:
            raise DownloadError(
                f"{self.shown}: the video URL returned an empty body; fetch the request's result again, and "
                "report it if it stays empty"
            )


def store_video(
    url: str,
    dest: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    client: httpx.Client | None = None,
    attempts: int = 3,
    timeout: float = 120.0,
    backoff_s: float = 0.5,
    content_type: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> StoredVideo:
    """Stream ``url`` into ``dest`` (a local path or any fsspec URL) and publish it atomically.

    Returns the stored URI, size, sha256 and content type. ``client`` is reused if given (its own
    timeouts apply); otherwise one is made with ``timeout`` per read. ``content_type`` defaults to the
    response's ``video/*`` type, else a guess from ``dest``'s extension, else ``video/mp4``. Raises
    :class:`DownloadError` (with the URL's query redacted) once ``attempts`` are used up or on an
    answer that retrying cannot fix (e.g. 403/404 for an expired link); then nothing is published and
    no temporary file or upload is left.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    fs, path = url_to_fs(dest, storage_options)
    state = _Download(url, dest, fs, path, content_type)
    own_client = client is None
    http = client or httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)), follow_redirects=True
    )
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                state.attempt(http, chunk_size)
                break
            except _Retryable as exc:
                reason = redact_message(exc.reason)
                if attempt >= attempts:
                    raise DownloadError(
                        f"{state.shown}: download failed after {attempt} attempt(s), last error: {reason}; "
                        "nothing was stored. Retry later, or raise attempts"
                    ) from None
                delay = exc.retry_after
                if delay is None:  # exponential backoff with full jitter
                    delay = random.uniform(0, min(BACKOFF_MAX_S, backoff_s * 2 ** (attempt - 1)))
                logger.warning(
                    "retrying download of %s (attempt %d of %d) in %.2fs: %s",
                    redact_url(url),
                    attempt + 1,
                    attempts,
                    delay,
                    reason,
                )
                if delay > 0:
                    time.sleep(delay)
        assert state.sink is not None
        try:
            state.sink.commit()
        except Exception as exc:
            raise DownloadError(
                f"{state.shown}: could not publish the video ({type(exc).__name__}: {exc}); check write access "
                "to the destination"
            ) from None
        state.sink = None
    except BaseException as exc:
        if state.sink is not None:
            state.sink.abort()
        if isinstance(exc, OSError):
            raise DownloadError(
                f"{state.shown}: cannot write the video ({type(exc).__name__}: {exc}); check the destination "
                "path, the bucket and write access"
            ) from None
        raise
    finally:
        if own_client:
            http.close()
    return StoredVideo(
        uri=full_url(fs, path),
        size=state.received,
        sha256=state.digest.hexdigest(),
        content_type=state.content_type or guess_content_type(dest),
        attempts=attempt,
    )


def sha256_of(
    dest: str, storage_options: Mapping[str, Any] | None = None, *, chunk_size: int = 4 * 2**20
) -> str:
    """Re-hash a stored object by streaming it (for the checksum-at-rest check)."""
    fs, path = url_to_fs(dest, storage_options)
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=chunk_size) as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
