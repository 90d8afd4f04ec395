"""Errors of the media layer.

Every message names the file, the rule that was broken and the fix, and is redacted: the query
string of a presigned URL (a credential) never reaches the text of an exception.
"""

from __future__ import annotations

from dagster_runway._redact import REDACTED, redact_text, redact_url


def redact_message(text: str) -> str:
    """``redact_text``, made idempotent: text that already holds a redacted URL stays as it is."""
    return redact_text(text).replace(REDACTED + REDACTED, REDACTED)


def shown_path(path: str) -> str:
    """A path or URL fit for a message: URLs lose their query values, plain paths stay as they are."""
    return redact_url(path) if "://" in path or path.startswith("data:") else path


class MediaError(Exception):
    """Base of every media-layer error. ``str()`` is safe to log: presigned query strings are redacted."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_message(message))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class SourceError(MediaError):
    """The image source itself cannot be listed: missing folder, unknown bucket, bad credentials."""


class ImageValidationError(MediaError):
    """An image that the service would reject, found before any credit is spent.

    ``str()`` is ``"<path>: <rule broken, with the measured value>; <fix>"``. ``code`` is a short
    machine-readable name of the rule (``size``, ``dimensions``, ``aspect``, ``format``, ``corrupt``,
    ``truncated``, ``empty``, ``unreadable``).
    """

    def __init__(self, path: str, rule: str, fix: str, *, code: str = "invalid") -> None:
        self.path = shown_path(path)
        self.rule = redact_message(rule)
        self.fix = redact_message(fix)
        self.code = code
        super().__init__(f"{self.path}: {self.rule}; {self.fix}")


class SettingsError(MediaError):
    """A bad sidecar or manifest entry. Names the file, the entry and the field."""

    def __init__(self, source: str, message: str, *, field: str | None = None) -> None:
        self.source = shown_path(source)
        self.field = field
        super().__init__(f"{self.source}: {message}")


class ServiceUrlError(MediaError):
    """No URL the service can fetch can be made for an image; the message says how to fix it."""


class DownloadError(MediaError):
    """A video could not be downloaded and stored; nothing was published at the destination."""


class NotAVideoError(DownloadError):
    """What the video URL served is not a playable video (an error page, a truncated or corrupt file)."""


class VideoProbeError(MediaError):
    """A stored file is not a readable video."""
