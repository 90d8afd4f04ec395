"""The URL the service fetches an image from.

* Object stores (S3 and other fsspec filesystems that can sign): a presigned HTTPS GET URL that
  expires after ``presign_expires_s``. On S3 the URL also carries ``response-content-type``, because
  the service rejects ``application/octet-stream``, the type many upload tools leave behind.
* An ``http(s)://`` file is passed through as it is.
* Local files: ``public_base_url`` + the relative path, when the folder is already served over
  HTTPS; otherwise a ``data:`` URI when it is at most ``data_uri_max_bytes`` long (the service
  accepts data URIs of up to 5 MB); otherwise :class:`ServiceUrlError`, which says how to fix it.

Pay for the bytes that were hashed: :func:`pin_image` records what :mod:`.untrusted` read (the bytes'
sha256, and on S3 the object's ETag and VersionId from the same GET), and :func:`service_image_url`
given that pin sends exactly those bytes: a data URI is built from them (never from a second read), and a
presigned S3 URL names the VersionId where the bucket keeps versions. Where nothing can pin the bytes (an
unversioned bucket, a ``public_base_url``), :func:`source_matches` tells at collect whether the object
is still the one hashed, and why not.

The query string of a presigned URL is a credential: this module never puts one in an exception
or a log line (only :func:`dagster_runway._redact.redact_url` forms).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import fsspec

from dagster_runway._redact import redact_url

from ._fs import full_url, is_local, is_loopback_host, is_object_store, is_s3, protocols
from .errors import ServiceUrlError
from .untrusted import SourceBytes, change_token_of, shown_name
from .validation import ACCEPTED_FORMATS, sniff_mime

logger = logging.getLogger(__name__)

DATA_URI_MAX_BYTES = 5 * 1024 * 1024
#: Runway refuses image URLs longer than this.
URL_MAX_CHARS = 2048
#: SigV4 presigned URLs are valid for at most 7 days.
PRESIGN_MAX_S = 7 * 24 * 3600

_MIME_BY_EXT = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


def data_uri_length(size: int, mime: str = "image/jpeg") -> int:
    """The length of the base64 data URI of a ``size``-byte file."""
    return len(f"data:{mime};base64,") + 4 * ((size + 2) // 3)


def _check_fetchable(url: str, shown: str, how: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname)):
        if len(url) > URL_MAX_CHARS:
            raise ServiceUrlError(
                f"{shown}: the {how} is {len(url)} characters, over the service's limit of {URL_MAX_CHARS}; "
                "use long-term credentials (no session token) or a public_base_url"
            )
        return
    raise ServiceUrlError(
        f"{shown}: the {how} {redact_url(url)} is not HTTPS, and the service fetches images only over HTTPS "
        "(plain http is accepted for loopback test servers only); use an https endpoint_url or public_base_url"
    )


@dataclass(frozen=True)
class SourcePin:
    """Which bytes of an image were hashed and validated, so the service gets exactly those.

    ``data_uri`` is the data URI of those very bytes when the image is sent inline (local files);
    ``version_id`` the S3 VersionId a presigned URL is pinned to; otherwise ``change_token``/``etag``
    are what :func:`source_matches` compares at collect."""

    sha256: str
    size: int
    change_token: str
    mime_type: str
    etag: str | None = None
    version_id: str | None = None
    data_uri: str | None = field(default=None, repr=False)


def sends_inline(fs: fsspec.AbstractFileSystem, public_base_url: str | None) -> bool:
    """Whether :func:`service_image_url` sends ``fs``'s images as data URIs (no URL to fetch them from)."""
    return not public_base_url and not set(protocols(fs)) & {"http", "https"} and not is_object_store(fs)


def pin_image(
    fs: fsspec.AbstractFileSystem,
    read: SourceBytes,
    sha256: str,
    mime_type: str,
    *,
    public_base_url: str | None = None,
    data_uri_max_bytes: int = DATA_URI_MAX_BYTES,
) -> SourcePin:
    """The pin of bytes just read, hashed (``sha256``) and validated: with their data URI when they are
    sent inline and fit the limit (memory stays bounded by it), else with the ETag/VersionId read."""
    size = len(read.data)
    data_uri = None
    if sends_inline(fs, public_base_url) and data_uri_length(size, mime_type) <= data_uri_max_bytes:
        data_uri = f"data:{mime_type};base64,{base64.b64encode(read.data).decode('ascii')}"
    return SourcePin(sha256, size, read.change_token, mime_type, read.etag, read.version_id, data_uri)


def source_matches(
    fs: fsspec.AbstractFileSystem,
    path: str,
    sent: SourcePin | str,
    *,
    version_id: str | None = None,
    sha256: str | None = None,
) -> str | None:
    """None when the service fetched exactly the bytes that were hashed, else why it may not have.

    ``sent`` is the :class:`SourcePin` of the submit, or, at collect, what its lineage recorded: the
    ``source_change_token`` (with the ``version_id`` the URL was pinned to, and the ``source_sha256``
    for the message). Inline bytes (a data URI) and a VersionId-pinned URL always match. Otherwise the
    object is compared with the change token that was hashed (one metadata request): call it when
    collecting a video, and mark the video stale with this reason when it is not None."""
    if isinstance(sent, SourcePin):
        if sent.data_uri is not None:
            return None
        token, version_id, sha256 = sent.change_token, sent.version_id, sent.sha256
    else:
        token = sent
    if version_id is not None:
        return None
    shown = shown_name(full_url(fs, path))
    try:
        fs.invalidate_cache(path)
        now = change_token_of(fs.info(path))
    except FileNotFoundError:
        now = "deleted"
    if now == token:
        return None
    return (
        f"{shown} changed after it was hashed, before the service fetched it or while it rendered "
        f"({token} when hashed, {now} now), and its store keeps no versions to pin the URL to; the video may "
        f"show the new content while its lineage names sha256 {sha256 or 'as recorded'}; regenerate the "
        "partition (or turn on bucket versioning, so URLs name the exact version)"
    )


def _too_large_for_data_uri(
    fs: fsspec.AbstractFileSystem, shown: str, size: int, mime: str, limit: int
) -> ServiceUrlError:
    needed = data_uri_length(size, mime)
    where = "local file" if is_local(fs) else f"{type(fs).__name__} file"
    return ServiceUrlError(
        f"{shown}: this {where} needs a {needed / 2**20:.1f} MB data URI, over the service's "
        f"{limit / 2**20:.1f} MB limit for data URIs; put the images in an object store "
        "(s3://...), serve the folder over HTTPS and set public_base_url, or compress the image to under "
        f"{(limit * 3 // 4) / 2**20:.1f} MB"
    )


def _mime_from_name(path: str) -> str | None:
    return _MIME_BY_EXT.get(path.rsplit(".", 1)[-1].lower()) if "." in path else None


def service_image_url(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    presign_expires_s: int = 3600,
    public_base_url: str | None = None,
    relpath: str | None = None,
    data_uri_max_bytes: int = DATA_URI_MAX_BYTES,
    mime_type: str | None = None,
    pin: SourcePin | None = None,
) -> str:
    """A URL or data URI the service can fetch ``path`` from (see the module docstring).

    With ``pin`` (from :func:`pin_image`), what is sent is what was hashed: its data URI, or a presigned
    URL with its VersionId; the file is not read again.

    ``mime_type`` (e.g. ``ImageInfo.mime_type``) is the type to announce; it is sniffed from the
    file's first bytes for data URIs and guessed from the extension for presigned URLs otherwise.
    The returned value is a credential when presigned: log only ``redact_url(value)``.
    """
    shown = full_url(fs, path)
    if pin is not None and mime_type is None:
        mime_type = pin.mime_type  # sniffed from the bytes that were hashed
    if public_base_url:
        if relpath is None:
            raise ServiceUrlError(f"{shown}: public_base_url needs the image's relative path (pass relpath=)")
        base = public_base_url.rstrip("/") + "/"
        url = base + "/".join(quote(segment, safe="") for segment in relpath.split("/"))
        _check_fetchable(url, shown, "public URL")
        return url

    protos = set(protocols(fs))
    if protos & {"http", "https"}:
        url = path if "://" in path else fs.unstrip_protocol(path)
        _check_fetchable(url, shown, "image URL")
        return url

    if is_object_store(fs):
        if not 1 <= presign_expires_s <= PRESIGN_MAX_S:
            raise ServiceUrlError(
                f"{shown}: presign_expires_s={presign_expires_s} is outside 1..{PRESIGN_MAX_S} (7 days); "
                "pick an expiry that covers the queue wait, e.g. 3600"
            )
        mime = mime_type or _mime_from_name(path)
        extra = {"ResponseContentType": mime} if mime and is_s3(fs) else {}
        if pin is not None and pin.version_id is not None and is_s3(fs):
            extra["VersionId"] = pin.version_id  # the exact object that was hashed, whatever is written later
        try:
            url = fs.sign(path, expiration=presign_expires_s, **extra)
        except NotImplementedError:
            raise ServiceUrlError(
                f"{shown}: this filesystem ({type(fs).__name__}) cannot make presigned URLs; serve the files over "
                "HTTPS and set public_base_url"
            ) from None
        except Exception as exc:
            raise ServiceUrlError(
                f"{shown}: cannot presign a URL ({type(exc).__name__}: {exc}); check the credentials in "
                "storage_options"
            ) from None
        _check_fetchable(url, shown, "presigned URL")
        logger.debug("presigned %s for %ss: %s", shown, presign_expires_s, redact_url(url))
        return str(url)

    # Local files and other filesystems without a public URL: inline the bytes.
    mime = mime_type or _mime_from_name(path) or "image/png"
    if pin is not None:
        if pin.data_uri is not None and len(pin.data_uri) <= data_uri_max_bytes:
            return pin.data_uri
        raise _too_large_for_data_uri(fs, shown, pin.size, mime, data_uri_max_bytes)
    try:
        size = int(fs.size(path))
    except FileNotFoundError:
        raise ServiceUrlError(f"{shown}: file does not exist; check the path") from None
    if data_uri_length(size, mime) > data_uri_max_bytes:
        raise _too_large_for_data_uri(fs, shown, size, mime, data_uri_max_bytes)
    data = bytes(fs.cat_file(path))
    sniffed = sniff_mime(data[:32])
    if sniffed is None:
        raise ServiceUrlError(
            f"{shown}: not a PNG, JPEG or WebP file, so it cannot be sent as an image; validate it first"
        )
    if sniffed not in ACCEPTED_FORMATS.values():  # pragma: no cover - sniff_mime only returns accepted types
        raise ServiceUrlError(f"{shown}: unsupported image type {sniffed}")
    return f"data:{sniffed};base64,{base64.b64encode(data).decode('ascii')}"
