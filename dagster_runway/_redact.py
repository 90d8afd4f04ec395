"""Redaction of credentials: the API token and the query string of presigned URLs.

Every layer that may show a URL or a header (logs, metadata, exception text, reprs) passes it
through here first. This module imports nothing else from the package.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

REDACTED = "<redacted>"

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?P<params>(;[^,;]*)*),", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return ``url`` with every query value and any userinfo replaced by ``<redacted>``.

    The query string of a presigned URL is a credential (its signature, key id and session token),
    so no value of it is shown. Data URIs are shortened to their media type and size.
    """
    if not url:
        return url
    match = _DATA_URI.match(url)
    if match:
        return f"data:{match.group('mime')}{match.group('params')},<{len(url) - match.end()} chars>"
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        keys = [key for key, _ in parse_qsl(query, keep_blank_values=True)] or ["query"]
        query = "&".join(f"{key}={REDACTED}" for key in keys)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Replace each secret, and the query string of each URL, found in free text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


_URL_IN_TEXT = re.compile(
    r"(?:https?|s3|gs)://[^\s'\"<>]+\?[^\s'\"<>]+|data:[\w.+/-]*;base64,[A-Za-z0-9+/=]+"
)
