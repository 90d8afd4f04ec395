"""Reading files that come from an image source: data, never paths to follow.

Everything under a source (images, sidecars, the manifest) was written by someone else. So a file is
read only when it is a regular file inside the folder it is read for (a symlink is followed only when
its target is inside too, so ``cat.txt -> /proc/self/environ`` is refused), with a size bound checked
before and while reading; a fifo or device never blocks the read. JSON is parsed only after its nesting
depth is checked, so ``[[[[...`` is an error naming the file, not a ``RecursionError``.

:func:`read_source_file` reads the whole file once and says which version of it was read: the change
token in the listing's format (``etag:"..."|size:N`` on S3, ``mtime:...|size:N`` locally) and, on S3,
the object's ETag and VersionId from the same GET response.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.asyn

from ._fs import full_url, is_local, is_s3
from .errors import MediaError

#: Deepest JSON nesting accepted in a sidecar or a manifest (a manifest needs 4: {"images": [{...}]}).
JSON_MAX_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class UntrustedFileError(MediaError):
    """A file from the source that is not read: outside the root, not a regular file, too large, unparsable.

    ``path`` is the file as shown to users; the message never quotes the file's contents. ``code``:
    ``outside``, ``special`` (not a regular file), ``size``, ``changed``, ``unreadable`` or ``parse``."""

    def __init__(self, path: str, rule: str, fix: str, *, code: str = "unreadable") -> None:
        self.path, self.rule, self.fix, self.code = path, rule, fix, code
        super().__init__(f"{path}: {rule}; {fix}")


@dataclass(frozen=True)
class SourceBytes:
    """The whole content of one file, and which version of the file it is."""

    data: bytes = b""
    change_token: str = ""  # the listing's format, so it compares with ImageEntry.change_token
    etag: str | None = None  # S3: the ETag of the object that was read
    version_id: str | None = None  # S3 with versioning: the VersionId of the object that was read


def change_token_of(info: Mapping[str, Any]) -> str:
    """A token that changes when the object changes: its ETag (object stores), generation or checksum
    (GCS and others) or mtime (local), plus its size."""
    size = info.get("size")
    for key, label in (("ETag", "etag"), ("etag", "etag"), ("generation", "generation"), ("md5Hash", "md5")):
        value = info.get(key)
        if value not in (None, ""):
            return f"{label}:{value}|size:{size}"
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value in (None, ""):
            continue
        if isinstance(value, int | float):
            return f"mtime:{value:.6f}|size:{size}"
        if hasattr(value, "isoformat"):
            return f"mtime:{value.isoformat()}|size:{size}"
        return f"mtime:{value}|size:{size}"
    return f"size:{size}"


def shown_name(path: str) -> str:
    """``path`` fit for a message: a name that is not valid UTF-8 shows its bad bytes as ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def inside(root: str, path: str) -> bool:
    """Whether the real (symlink-resolved) ``path`` lies under the real ``root``."""
    return _under(os.path.realpath(root), os.path.realpath(path))


def _under(real_root: str, real: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def read_source_file(
    fs: fsspec.AbstractFileSystem, path: str, *, root: str | None, max_bytes: int, what: str, fix_size: str
) -> SourceBytes:
    """Read all of ``path`` (at most ``max_bytes``) as a ``what`` ("sidecar", "image", "manifest").

    Locally the file must be a regular file whose real path is inside the real ``root`` (default: the
    file's own folder; a symlink to a file inside is read, to anything outside refused). Raises :class:`UntrustedFileError` naming the
    file, the rule and the fix (``fix_size`` for a file over the bound), or ``FileNotFoundError``."""
    shown = shown_name(full_url(fs, path))
    if is_local(fs):
        return _read_local(path, shown, root, max_bytes, what, fix_size)
    if is_s3(fs):
        return _read_s3(fs, path, shown, max_bytes, what, fix_size)
    with fs.open(path, "rb") as handle:
        data = bytes(handle.read(max_bytes + 1))
    if len(data) > max_bytes:
        raise _too_large(shown, what, None, max_bytes, fix_size)
    return SourceBytes(data=data, change_token=change_token_of(fs.info(path)))


def _too_large(shown: str, what: str, size: int | None, max_bytes: int, fix: str) -> UntrustedFileError:
    """``size`` None: only known to be over ``max_bytes`` (a stream read up to the bound)."""
    over = f"over {max_bytes} bytes" if size is None else f"{size} bytes"
    return UntrustedFileError(
        shown,
        f"the {what} is {over}, more than the limit of {max_bytes} bytes for one {what}",
        fix,
        code="size",
    )


def _read_local(
    path: str, shown: str, root: str | None, max_bytes: int, what: str, fix_size: str
) -> SourceBytes:
    real = os.path.realpath(path)
    real_root = os.path.realpath(root if root is not None else os.path.dirname(path))
    if not _under(real_root, real):
        how = (
            f"a symbolic link to {shown_name(real)}"
            if os.path.islink(path)
            else "reached through a linked folder"
        )
        raise UntrustedFileError(
            shown,
            f"the {what} is {how}, outside the source root {shown_name(real_root)}; files of a source "
            "are read only inside its root",
            "copy the file into the source instead of linking to it",
            code="outside",
        )
    # O_NOFOLLOW: the checked real path is what is opened; O_NONBLOCK: a fifo cannot hold the read.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UntrustedFileError(
            shown, f"cannot open the {what} ({exc.strerror})", "check the file and its permissions"
        ) from None
    try:
        opened = f"/proc/self/fd/{fd}"
        if os.path.islink(opened) and not _under(
            real_root, os.readlink(opened)
        ):  # a folder swapped meanwhile
            raise UntrustedFileError(
                shown,
                f"the {what} moved outside the source root while it was opened",
                "run the partition again",
                code="outside",
            )
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise UntrustedFileError(
                shown,
                f"the {what} is not a regular file (a device, fifo or socket)",
                "replace it with a regular file, or remove it",
                code="special",
            )
        if before.st_size > max_bytes:
            raise _too_large(shown, what, before.st_size, max_bytes, fix_size)
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # it grew while being read
            raise _too_large(shown, what, None, max_bytes, fix_size)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size):
        raise UntrustedFileError(
            shown, f"the {what} changed while it was being read", "run the partition again", code="changed"
        )
    return SourceBytes(
        data=b"".join(chunks), change_token=change_token_of({"size": after.st_size, "mtime": after.st_mtime})
    )


def _read_s3(fs: Any, path: str, shown: str, max_bytes: int, what: str, fix_size: str) -> SourceBytes:
    """One GET: the bytes, the ETag and the VersionId all come from the same response."""
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[dict[str, Any], bytes]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            if int(response.get("ContentLength") or 0) > max_bytes:
                return response, b""
            return response, bytes(await body.read(max_bytes + 1))
        finally:
            body.close()

    response, data = fsspec.asyn.sync(fs.loop, get)
    size = int(response.get("ContentLength") or 0)
    if size > max_bytes or len(data) > max_bytes:
        raise _too_large(shown, what, size if size > max_bytes else None, max_bytes, fix_size)
    etag = response.get("ETag")
    version = response.get("VersionId")
    return SourceBytes(
        data=data,
        change_token=change_token_of({"ETag": etag, "size": len(data)}),
        etag=etag,
        version_id=version if version not in (None, "", "null") else None,
    )


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json(text: str, shown: str, what: str, example: str, *, lists: bool = False) -> Any:
    """Parse untrusted JSON whose top level must be an object (or a list, with ``lists``). Raises
    :class:`UntrustedFileError` naming the file, never quoting it."""
    depth = json_depth(text)
    if depth > JSON_MAX_DEPTH:
        raise UntrustedFileError(
            shown,
            f"{what} JSON nests {depth} levels deep, more than the limit of {JSON_MAX_DEPTH}",
            f"write it as {example}",
            code="parse",
        )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise UntrustedFileError(
            shown,
            f"{what} is not valid JSON{where}",
            f"fix the syntax; it should look like {example}",
            code="parse",
        ) from None
    if not isinstance(data, dict) and not (lists and isinstance(data, list)):
        kind = "an object or a list" if lists else "an object"
        raise UntrustedFileError(
            shown, f"{what} JSON must be {kind}, not a {type(data).__name__}", f"write it as {example}"
        )
    return data
