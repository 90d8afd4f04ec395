"""Small fsspec helpers shared by the media modules."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with the storage options passed straight through."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """S3 or an S3-compatible store (s3fs): multipart uploads, ``ContentType`` on writes."""
    return bool({"s3", "s3a"} & set(protocols(fs)))


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"} & set(protocols(fs)))


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``s3://bucket/key`` for object stores; the plain absolute path for local files."""
    if is_local(fs):
        return path
    return str(fs.unstrip_protocol(path))


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``path``: one ranged GET on object stores, a seek and read locally."""
    if end <= start:
        return b""
    data = fs.cat_file(path, start=start, end=end)
    return bytes(data)
