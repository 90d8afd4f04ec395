"""Whether one storage location lies inside another, on any filesystem, without listing either.

An output, a journal or a review page inside the source it reads would be listed as input and paid
for again on every discovery cycle, so the pipeline refuses such a layout when it is defined. Local
paths are compared after resolving symlinks; other URLs by protocol, endpoint and path segments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


def _store_and_segments(
    url: str, options: Mapping[str, Any] | None
) -> tuple[tuple[str, str], tuple[str, ...]]:
    parts = urlsplit(url)
    if len(parts.scheme) <= 1 or parts.scheme in (
        "file",
        "local",
    ):  # a plain path (or a Windows drive letter)
        path = parts.path if parts.scheme in ("file", "local") else url
        resolved = os.path.realpath(os.path.expanduser(path))
        return ("file", ""), tuple(s for s in resolved.split(os.sep) if s)
    scheme = "s3" if parts.scheme == "s3a" else parts.scheme
    opts = dict(options or {})
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url") or ""
    segments = (parts.netloc, *(s for s in parts.path.split("/") if s and s != "."))
    return (scheme, str(endpoint).rstrip("/")), segments


def inside(
    inner: str,
    outer: str,
    *,
    inner_options: Mapping[str, Any] | None = None,
    outer_options: Mapping[str, Any] | None = None,
) -> bool:
    """True when ``inner`` is ``outer`` or lies under it (same store, same or longer path)."""
    inner_store, inner_segments = _store_and_segments(inner, inner_options)
    outer_store, outer_segments = _store_and_segments(outer, outer_options)
    if inner_store != outer_store:
        return False
    return inner_segments[: len(outer_segments)] == outer_segments


__all__ = ["inside"]
