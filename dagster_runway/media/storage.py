"""Streaming, atomic storage of generated videos on any fsspec filesystem.

:func:`store_video` streams the body of a video URL in 1 MiB pieces (memory stays flat whatever the
size), hashing it (sha256) and counting it on the way, checks that it is complete (``Content-Length``)
and that it is a video (its ``Content-Type``, its MP4 ``ftyp`` box, and an optional ``verify`` such as
a decoding probe), and only then publishes it under its final name (:mod:`.publish`: a rename locally,
a multipart upload committed only then on S3, aborted on any failure). A reader never sees a partial
or broken file.

A truncated body (the connection closes early, ``httpx.RemoteProtocolError``, or fewer bytes than
``Content-Length``), a transport error, or a 408/425/429/5xx answer is retried with exponential
backoff and full jitter by the package's one retry rule (:class:`dagster_runway.retry.RetryPolicy`,
``DOWNLOAD_RETRY`` unless given). A retry resumes with a ``Range`` request when the
server supports ranges (guarded by ``If-Range`` on the ETag), and starts over otherwise. On final
failure nothing is published and no temporary file or upload is left behind.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import httpx

from dagster_runway._redact import redact_url
from dagster_runway.retry import DOWNLOAD_RETRY, RetryPolicy, retry_after_seconds

from ._fs import full_url, url_to_fs
from .errors import DownloadError, MediaError, NotAVideoError, redact_message
from .publish import Sink, guess_content_type, open_sink
from .validation import content_sha256

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream", "application/mp4"})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True)
class StoredVideo:
    """A video stored at ``uri``: its size, sha256 and content type, and the attempts it took."""

    uri: str
    size: int
    sha256: str
    content_type: str
    attempts: int = 1


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


#: Transport failures worth another attempt: timeouts, resets, refused connections, bodies cut short.
_RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


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
        self.sink: Sink | None = None
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
        served = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if served and not served.startswith("video/") and served not in _BINARY_TYPES:
            raise NotAVideoError(
                f"{self.shown}: the video URL answered with Content-Type {served!r}, not a video; nothing was "
                "stored. Fetch the request's result again; if it persists, the service served an error page"
            )
        if self.content_type is None:
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

    def fetch(self, http: httpx.Client, retry: RetryPolicy, chunk_size: int) -> int:
        """The whole body into the sink, retried by ``retry``; returns the attempts it took."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                self.attempt(http, chunk_size)
                return attempt
            except _Retryable as exc:
                reason = redact_message(exc.reason)
                delay = retry.next_delay(attempt, time.monotonic() - started, exc.retry_after)
                if delay is None:
                    raise DownloadError(
                        f"{self.shown}: download failed after {attempt} attempt(s), last error: {reason}; "
                        "nothing was stored. Retry later"
                    ) from None
                logger.warning(
                    "retrying download of %s (attempt %d of %d) in %.2fs: %s",
                    redact_url(self.url),
                    attempt + 1,
                    retry.max_attempts,
                    delay,
                    reason,
                )
                if delay > 0:
                    time.sleep(delay)

    def publish(self, verify: Callable[[str], Any] | None) -> None:
        """Check the complete body is a video (signature, then ``verify``), then make it visible."""
        assert self.sink is not None
        self.sink.close()
        _check_signature(self.sink.local_path, self.shown, self.dest)
        if verify is not None:
            try:
                verify(self.sink.local_path)
            except MediaError as exc:
                raise NotAVideoError(
                    f"{self.shown}: the downloaded file is not a playable video ({exc}); nothing was stored"
                ) from None
        try:
            self.sink.commit()
        except Exception as exc:
            raise DownloadError(
                f"{self.shown}: could not publish the video ({type(exc).__name__}: {exc}); check write access "
                "to the destination"
            ) from None
        self.sink = None

    def _consume(self, response: httpx.Response, resuming: bool, chunk_size: int) -> None:
        status = response.status_code
        if status in _RETRY_STATUSES:
            retry_after = retry_after_seconds(response.headers.get("retry-after"))
            waited = f" (the server asked to wait {retry_after:.0f} s)" if retry_after is not None else ""
            raise _Retryable(f"HTTP {status}{waited}", retry_after)
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
            self.sink = open_sink(self.fs, self.path, self.content_type or guess_content_type(self.dest))
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
    retry: RetryPolicy = DOWNLOAD_RETRY,
    timeout: float = 120.0,
    content_type: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    verify: Callable[[str], Any] | None = None,
) -> StoredVideo:
    """Stream ``url`` into ``dest`` (a local path or any fsspec URL) and publish it atomically.

    Returns the stored URI, size, sha256 and content type. ``client`` is reused if given (its own
    timeouts apply); otherwise one is made with ``timeout`` per read. ``content_type`` defaults to the
    response's ``video/*`` type, else a guess from ``dest``'s extension, else ``video/mp4``. Raises
    :class:`DownloadError` (with the URL's query redacted) once ``retry`` gives up, or on an answer
    that retrying cannot fix (e.g. 403/404 for an expired link); then nothing is published and
    no temporary file or upload is left.

    Only a video is published: an answer whose Content-Type is neither ``video/*`` nor binary, or
    whose body lacks the MP4 ``ftyp`` box (for ``.mp4``/``.mov``/``.m4v`` destinations), raises
    :class:`NotAVideoError`, and so does ``verify(local_path)`` raising a ``MediaError`` (e.g. a probe
    that fails), called on the complete body before it is published.
    """
    fs, path = url_to_fs(dest, storage_options)
    state = _Download(url, dest, fs, path, content_type)
    own_client = client is None
    http = client or httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)), follow_redirects=True
    )
    try:
        attempts = state.fetch(http, retry, chunk_size)
        state.publish(verify)
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
        attempts=attempts,
    )


def _check_signature(local_path: str, shown: str, dest: str) -> None:
    if not dest.lower().endswith((".mp4", ".mov", ".m4v")):
        return
    with open(local_path, "rb") as handle:
        head = handle.read(12)
    if head[4:8] != b"ftyp":
        raise NotAVideoError(
            f"{shown}: the downloaded body is not an MP4 (it starts with {head[:12]!r}, with no 'ftyp' box); "
            "nothing was stored. Fetch the request's result again"
        )


def sha256_of(
    dest: str, storage_options: Mapping[str, Any] | None = None, *, chunk_size: int = 4 * 2**20
) -> str:
    """Re-hash a stored object by streaming it (for the checksum-at-rest check)."""
    fs, path = url_to_fs(dest, storage_options)
    return content_sha256(fs, path, chunk_size=chunk_size)
