"""The URL the service fetches an image from.

* Object stores (S3 and other fsspec filesystems that can sign): a presigned HTTPS GET URL that
  expires after ``presign_expires_s``. On S3 the URL also carries ``response-content-type``, because
  the service rejects ``application/octet-stream``, the type many upload tools leave behind.
* An ``http(s)://`` file is passed through as it is.
* Local files: ``public_base_url`` + the relative path, when the folder is already served over
  HTTPS; otherwise a ``data:`` URI when it is at most ``data_uri_max_bytes`` long (the service
  accepts data URIs of up to 5 MB); otherwise :class:`ServiceUrlError`, which says how to fix it.

The query string of a presigned URL is a credential: this module never puts one in an exception
or a log line (only :func:`dagster_runway._redact.redact_url` forms).
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import quote, urlsplit

import fsspec

from dagster_runway._redact import redact_url

from ._fs import full_url, is_local, is_loopback_host, is_object_store, is_s3, protocols
from .errors import ServiceUrlError
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
) -> str:
    """A URL or data URI the service can fetch ``path`` from (see the module docstring).

    ``mime_type`` (e.g. ``ImageInfo.mime_type``) is the type to announce; it is sniffed from the
    file's first bytes for data URIs and guessed from the extension for presigned URLs otherwise.
    The returned value is a credential when presigned: log only ``redact_url(value)``.
    """
    shown = full_url(fs, path)
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
        return url

    # Local files and other filesystems without a public URL: inline the bytes.
    try:
        size = int(fs.size(path))
    except FileNotFoundError:
        raise ServiceUrlError(f"{shown}: file does not exist; check the path") from None
    mime = mime_type or _mime_from_name(path) or "image/png"
    needed = data_uri_length(size, mime)
    if needed > data_uri_max_bytes:
        where = "local file" if is_local(fs) else f"{type(fs).__name__} file"
        raise ServiceUrlError(
            f"{shown}: this {where} needs a {needed / 2**20:.1f} MB data URI, over the service's "
            f"{data_uri_max_bytes / 2**20:.1f} MB limit for data URIs; put the images in an object store "
            "(s3://...), serve the folder over HTTPS and set public_base_url, or compress the image to under "
            f"{(data_uri_max_bytes * 3 // 4) / 2**20:.1f} MB"
        )
    data = bytes(fs.cat_file(path))
    sniffed = sniff_mime(data[:32])
    if sniffed is None:
        raise ServiceUrlError(
            f"{shown}: not a PNG, JPEG or WebP file, so it cannot be sent as an image; validate it first"
        )
    if sniffed not in ACCEPTED_FORMATS.values():  # pragma: no cover - sniff_mime only returns accepted types
        raise ServiceUrlError(f"{shown}: unsupported image type {sniffed}")
    return f"data:{sniffed};base64,{base64.b64encode(data).decode('ascii')}"
