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

A video URL comes from the service's answer, so it is data, not an instruction. A download:

- ends within ``deadline_s`` in all, retries included (a body that drips keeps no worker);
- refuses a body over ``max_bytes``: by its ``Content-Length`` before reading it, and by the bytes
  received while streaming;
- follows redirects itself, hop by hop (at most ``max_redirects``), checking each URL before it
  connects: https only, and every address the host resolves to must be global (no loopback,
  private, link-local or reserved address), except for ``trusted_origins`` (the API's own origin
  when it is such a host, as for the emulator on 127.0.0.1), which may also use plain http. The
  host is resolved for the check and again by the connection, so a name whose answers change
  between the two (DNS rebinding) is not caught.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Collection, Mapping
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
DEFAULT_MAX_BYTES = 1024**3
DEFAULT_DEADLINE_S = 900.0
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
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


class VideoTooLargeError(DownloadError):
    """The video is larger than the download's size limit (``max_video_bytes``); nothing was stored."""


class DownloadTimeoutError(DownloadError):
    """The download did not finish within its total deadline (``download_timeout_s``); nothing was stored."""


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


def origin(url: str | httpx.URL) -> str:
    """``scheme://host:port`` of a URL (the scheme's default port if none is given), lower case."""
    parsed = httpx.URL(url) if isinstance(url, str) else url
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.scheme}://{parsed.host.lower()}:{port}"


def _non_global(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to that are not global (loopback, private, link-local, ...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _Retryable(f"cannot resolve {host}: {exc}") from None
    found = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            found.append(str(address))
    return sorted(set(found))


def trusted_origins_for(base_url: str) -> frozenset[str]:
    """The origins a download may reach although they are not public https: the API's own origin when
    its host is loopback, private or otherwise not global (the emulator on 127.0.0.1), else none."""
    try:
        parsed = httpx.URL(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            return frozenset()
        return frozenset({origin(parsed)}) if _non_global(parsed.host, parsed.port or 443) else frozenset()
    except (_Retryable, httpx.InvalidURL, ValueError):
        return frozenset()


class _Download:
    """The state of one :func:`store_video` call across its attempts."""

    def __init__(
        self,
        url: str,
        dest: str,
        fs: fsspec.AbstractFileSystem,
        path: str,
        content_type: str | None,
        *,
        max_bytes: int | None,
        deadline_s: float | None,
        trusted_origins: Collection[str],
        max_redirects: int,
    ) -> None:
        self.url, self.dest, self.fs, self.path = url, dest, fs, path
        self.shown = f"{redact_url(url)} -> {full_url(fs, path)}"
        self.max_bytes, self.deadline_s, self.max_redirects = max_bytes, deadline_s, max_redirects
        self.trusted = frozenset(o.lower() for o in trusted_origins)
        self.deadline = float("inf") if deadline_s is None else time.monotonic() + deadline_s
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
            url, came_from = httpx.URL(self.url), None
            for hop in range(self.max_redirects + 1):
                self.check_url(url, hop, came_from)
                timeout = self._timeout(http)
                with http.stream(
                    "GET", url, headers=headers, follow_redirects=False, timeout=timeout
                ) as response:
                    if response.status_code in _REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise DownloadError(
                                f"{self.shown}: HTTP {response.status_code} redirect with no Location; check the URL"
                            )
                        url, came_from = url.join(location), url
                        continue
                    self._consume(response, resuming, chunk_size)
                    return
            raise DownloadError(
                f"{self.shown}: more than {self.max_redirects} redirects; nothing was stored. Fetch the request's "
                "result again; if it persists, report the URL's host"
            )
        except _RETRY_ERRORS as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a bad URL, a redirect loop: retrying cannot help
            raise DownloadError(f"{self.shown}: {type(exc).__name__}: {exc}; check the video URL") from None

    def check_url(self, url: httpx.URL, hop: int, came_from: httpx.URL | None) -> None:
        """Refuse a URL before connecting to it: https only, and a public host, unless its origin is trusted;
        never from https down to http."""
        where = "the video URL" if hop == 0 else f"redirect {hop} of the video URL"
        shown = redact_url(str(url))
        if came_from is not None and came_from.scheme == "https" and url.scheme != "https":
            raise DownloadError(
                f"{self.shown}: {where} goes from https down to {shown} over plain http, which is refused; nothing was "
                "stored. Fetch the request's result again; if it persists, report the URL to the service"
            )
        if url.scheme not in ("http", "https") or not url.host:
            raise DownloadError(
                f"{self.shown}: {where} goes to {shown}: only http(s) URLs are fetched; nothing was stored, check the "
                "video URL"
            )
        if origin(url) in self.trusted:
            return
        if url.scheme != "https":
            raise DownloadError(
                f"{self.shown}: {where} goes to {shown} over plain http: a video is fetched over https only (plain http "
                "only from the API's own loopback or private host); nothing was stored. Fetch the request's result "
                "again; if it persists, report the URL to the service"
            )
        blocked = _non_global(url.host, url.port or 443)
        if blocked:
            raise DownloadError(
                f"{self.shown}: {where} goes to {shown}, whose host resolves to {', '.join(blocked)}: a loopback, private, "
                "link-local or reserved address, which a download may reach only when the API's base URL is on that "
                "host; nothing was requested from it or stored. Fetch the request's result again; if it persists, "
                "report the URL to the service"
            )

    def _timeout(self, http: httpx.Client) -> httpx.Timeout:
        """The client's timeouts, each cut to what is left of the deadline (so one read cannot outlast it)."""
        left = self.left()
        base = http.timeout

        def cap(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(
            connect=cap(base.connect), read=cap(base.read), write=cap(base.write), pool=cap(base.pool)
        )

    def left(self) -> float:
        """Seconds left before the deadline; raises DownloadTimeoutError once it has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            assert self.deadline_s is not None
            raise DownloadTimeoutError(
                f"{self.shown}: the download did not finish within {self.deadline_s:g} s, retries included "
                f"(download_timeout_s; {self.received} bytes received); nothing was stored. It is tried again at the "
                "next collect; if the video host is this slow, raise download_timeout_s"
            )
        return left

    def _too_large(self, what: str) -> VideoTooLargeError:
        return VideoTooLargeError(
            f"{self.shown}: the video is {what}, over the limit of {self.max_bytes} bytes (max_video_bytes); nothing "
            "was read further or stored. If videos this large are expected, raise max_video_bytes"
        )

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
                if delay >= self.left():
                    raise DownloadTimeoutError(
                        f"{self.shown}: the download did not finish within {self.deadline_s:g} s, retries included "
                        f"(download_timeout_s), after {attempt} attempt(s), last error: {reason}; nothing was stored. It "
                        "is tried again at the next collect; if the video host is this slow, raise download_timeout_s"
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

    def publish(
        self, verify: Callable[[str], Any] | None, rewrite: Callable[[str], Any] | None = None
    ) -> None:
        """Check the complete body is a video (signature, then ``verify``), ``rewrite`` it in place if
        that works (a failed rewrite leaves the body as it was: a paid video is never lost to it), then
        make it visible; the size and sha256 are of the bytes stored."""
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
        if rewrite is not None:
            try:
                rewrite(self.sink.local_path)
            except MediaError as exc:
                logger.warning("%s: stored as downloaded, without its rewrite: %s", self.shown, exc)
            self.digest, self.received = _file_digest(self.sink.local_path)
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
        limit = self.max_bytes
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if not resuming or not match or int(match.group(1)) != self.received:
                raise _Retryable("the server answered with a range that was not asked for")
            if match.group(3) != "*":
                self.total = int(match.group(3))
                if limit is not None and self.total > limit:
                    raise self._too_large(f"announced as {self.total} bytes (Content-Range)")
        else:
            if limit is not None and length is not None and not encoded and length > limit:
                raise self._too_large(f"announced as {length} bytes (Content-Length)")
            self._restart(response, length, encoded)
        if self.sink is None:
            self.sink = open_sink(self.fs, self.path, self.content_type or guess_content_type(self.dest))
        # Raw network reads, not re-buffered: whatever arrived before a failure is kept for a resume.
        chunks = response.iter_bytes(chunk_size) if encoded else response.iter_raw()
        for chunk in chunks:
            if limit is not None and self.received + len(chunk) > limit:
                announced = (
                    f"{length} bytes were announced" if length is not None else "no size was announced"
                )
                raise self._too_large(f"at least {self.received + len(chunk)} bytes ({announced})")
            self.sink.write(chunk)
            self.digest.update(chunk)
            self.received += len(chunk)
            self.left()
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
    rewrite: Callable[[str], Any] | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    deadline_s: float | None = DEFAULT_DEADLINE_S,
    trusted_origins: Collection[str] | None = None,
    max_redirects: int = MAX_REDIRECTS,
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
    that fails), called on the complete body before it is published. ``rewrite(local_path)`` may then
    change the body in place (the lineage tags, :mod:`.provenance`; it checks its own result); the size
    and sha256 returned are those of the bytes stored. A rewrite that raises ``MediaError`` is logged
    and the body stored as downloaded.

    Limits (see the module's docstring): ``deadline_s`` in all, retries included
    (:class:`DownloadTimeoutError`); ``max_bytes`` (:class:`VideoTooLargeError`); redirects followed
    here, at most ``max_redirects``, each checked before connecting. ``trusted_origins`` (``scheme://host:port``,
    see :func:`trusted_origins_for`) may be non-public or plain http; ``None`` trusts the origin of
    ``url`` itself (a caller who names a loopback URL has chosen it), never one a redirect leads to.
    """
    fs, path = url_to_fs(dest, storage_options)
    state = _Download(
        url,
        dest,
        fs,
        path,
        content_type,
        max_bytes=max_bytes,
        deadline_s=deadline_s,
        trusted_origins=_first_origin(url) if trusted_origins is None else trusted_origins,
        max_redirects=max_redirects,
    )
    own_client = client is None
    http = client or httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)), follow_redirects=False
    )
    try:
        attempts = state.fetch(http, retry, chunk_size)
        state.publish(verify, rewrite)
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


def _file_digest(local_path: str) -> tuple[Any, int]:
    digest, size = hashlib.sha256(), 0
    with open(local_path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest, size


def _first_origin(url: str) -> frozenset[str]:
    try:
        return frozenset({origin(url)})
    except (httpx.InvalidURL, ValueError):
        return frozenset()


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
