"""Header-only image validation: the service's image rules checked before any credit is spent.

:func:`validate_image` reads a bounded prefix of the file through ranged reads (one ranged GET on S3
for almost every image), lets Pillow identify the format and size from it, then reads a few bytes at
the end of the file to catch a truncated upload. A 7000x7000 PNG on S3 costs about 64 KiB of
transfer, not its full size. WebP is the one exception to "with Pillow": Pillow's WebP plugin reads
the whole file to open it, so its RIFF header is parsed here (the same fields Pillow reads).

Rules (from the model's schema): under 16 MB, width and height under 8000 px, width/height strictly
between 0.5 and 2.0; plus what the service chokes on: a format other than PNG, JPEG or WebP, an empty,
corrupt or truncated file.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from typing import IO, cast

import fsspec
from PIL import Image, UnidentifiedImageError

from dagster_runway.schema import IMAGE_MAX_ASPECT, IMAGE_MAX_BYTES, IMAGE_MAX_SIDE, IMAGE_MIN_ASPECT

from ._fs import full_url, read_range
from .errors import ImageValidationError

#: First ranged read; enough for the header of nearly every PNG and JPEG.
HEADER_CHUNK = 64 * 1024
#: Hard cap on the header bytes read (a JPEG with megabytes of EXIF/XMP/ICC before its frame header).
HEADER_BUDGET = 4 * 1024 * 1024
#: Bytes read at the end of the file to check for the format's end marker.
TAIL_BYTES = 1024

ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
_FIX_FORMAT = "convert it to PNG or JPEG (the service accepts PNG, JPEG and WebP)"
_FIX_REEXPORT = "re-export or re-upload the image"


@dataclass(frozen=True)
class ImageInfo:
    """What the header said about a valid image, and how many bytes it took to find out."""

    path: str
    format: str
    width: int
    height: int
    size: int
    bytes_read: int

    @property
    def mime_type(self) -> str:
        return ACCEPTED_FORMATS.get(self.format, "application/octet-stream")

    @property
    def aspect(self) -> float:
        return self.width / self.height


class _HeaderBudgetExceeded(Exception):
    pass


class _RangeReader(io.RawIOBase):
    """A seekable, read-only view of a remote file that fetches aligned chunks on demand and counts
    every byte it fetches. Pillow reads only the header, so only the header is fetched."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, size: int, budget: int) -> None:
        super().__init__()
        self._fs, self._path, self._size, self._budget = fs, path, size, budget
        self._chunks: dict[int, bytes] = {}
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _chunk(self, index: int) -> bytes:
        chunk = self._chunks.get(index)
        if chunk is None:
            start = index * HEADER_CHUNK
            end = min(self._size, start + HEADER_CHUNK)
            if self.bytes_read + (end - start) > self._budget:
                raise _HeaderBudgetExceeded()
            chunk = read_range(self._fs, self._path, start, end)
            self.bytes_read += len(chunk)
            self._chunks[index] = chunk
        return chunk

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._pos
        end = min(self._size, self._pos + size)
        parts = []
        while self._pos < end:
            index, offset = divmod(self._pos, HEADER_CHUNK)
            chunk = self._chunk(index)
            piece = chunk[offset : offset + (end - self._pos)]
            if not piece:
                break
            parts.append(piece)
            self._pos += len(piece)
        return b"".join(parts)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _fail(path: str, rule: str, fix: str, code: str) -> ImageValidationError:
    return ImageValidationError(path, rule, fix, code=code)


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header (``VP8 ``, ``VP8L`` or ``VP8X`` first chunk), as Pillow reads it."""
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return struct.unpack("<H", head[26:28])[0] & 0x3FFF, struct.unpack("<H", head[28:30])[0] & 0x3FFF
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def sniff_mime(head: bytes) -> str | None:
    """The image media type from the first bytes of a file, or None if not PNG, JPEG or WebP."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _identify(reader: _RangeReader | io.BytesIO, shown: str) -> tuple[str, int, int]:
    head = reader.read(32)
    reader.seek(0)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        size = _webp_size(head)
        if size is None:
            raise _fail(
                shown, "WebP header is corrupt (no VP8/VP8L/VP8X frame header)", _FIX_REEXPORT, "corrupt"
            )
        return "WEBP", size[0], size[1]
    try:
        # No warnings.catch_warnings() here: it is not thread-safe, and a sensor may validate in threads.
        with Image.open(cast(IO[bytes], reader)) as image:  # a file-like over ranged reads
            return str(image.format), image.width, image.height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(
            shown,
            f"image is far larger than {IMAGE_MAX_SIDE - 1}x{IMAGE_MAX_SIDE - 1} pixels ({exc})",
            "resize it to under 8000 px a side",
            "dimensions",
        ) from None
    except UnidentifiedImageError:
        if sniff_mime(head) is not None:
            raise _fail(
                shown,
                "file has an image signature but its header is corrupt or truncated",
                _FIX_REEXPORT,
                "corrupt",
            ) from None
        kind = _describe(head)
        raise _fail(shown, f"not a recognised image format ({kind})", _FIX_FORMAT, "format") from None
    except (SyntaxError, OSError, ValueError, struct.error, EOFError) as exc:
        raise _fail(
            shown, f"image header is corrupt or truncated ({exc})", _FIX_REEXPORT, "corrupt"
        ) from None


def _describe(head: bytes) -> str:
    known = {
        b"GIF8": "GIF",
        b"BM": "BMP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"%PDF": "PDF",
        b"PK\x03\x04": "a ZIP archive",
        b"\x00\x00\x00\x0cjP": "JPEG 2000",
    }
    for magic, name in known.items():
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        return f"an ISO media file, brand {brand!r} (HEIC/AVIF/MP4)"
    if head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "looks like text"
    return f"starts with {head[:8].hex(' ')}"


def _check_tail(
    fs: fsspec.AbstractFileSystem, path: str, shown: str, fmt: str, size: int, head: bytes
) -> int:
    """Check the format's end marker; return the bytes read."""
    if fmt == "WEBP":
        riff = int.from_bytes(head[4:8], "little") + 8
        if size < riff:
            raise _fail(
                shown,
                f"file is truncated: {size} bytes but its RIFF header says {riff}",
                _FIX_REEXPORT,
                "truncated",
            )
        return 0
    count = min(size, TAIL_BYTES)
    tail = read_range(fs, path, size - count, size)
    _judge_tail(shown, fmt, tail, count)
    return len(tail)


def _judge_tail(shown: str, fmt: str, tail: bytes, count: int) -> None:
    if fmt == "PNG" and b"IEND\xaeB`\x82" not in tail:
        raise _fail(
            shown, "file is truncated: the PNG has no IEND chunk at its end", _FIX_REEXPORT, "truncated"
        )
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail:
        raise _fail(
            shown,
            "file is truncated: the JPEG has no end-of-image marker in its last "
            f"{count} bytes (data appended after the image is not supported)",
            _FIX_REEXPORT,
            "truncated",
        )


def validate_image(
    fs: fsspec.AbstractFileSystem, path: str, *, size: int | None = None, deep: bool = False
) -> ImageInfo:
    """Check an image against the service's rules from its header alone; return what the header said.

    Reads at most :data:`HEADER_BUDGET` bytes from the start of the file (usually one 64 KiB ranged
    read) and :data:`TAIL_BYTES` from its end. ``size`` (from a listing) saves a metadata request.
    ``deep=True`` also downloads and fully decodes the image to catch corrupt pixel data; it reads
    the whole file. Raises :class:`ImageValidationError` naming the file, the rule and the fix.
    """
    shown = full_url(fs, path)
    size = _checked_size(fs, path, shown, size)
    reader = _RangeReader(fs, path, size, HEADER_BUDGET)
    try:
        head = reader.read(32)
        reader.seek(0)
        fmt, width, height = _identify(reader, shown)
    except _HeaderBudgetExceeded:
        raise _fail(
            shown,
            f"no image header in the first {HEADER_BUDGET // 2**20} MB (metadata too large or file corrupt)",
            "strip the metadata (EXIF/XMP/ICC) or re-export the image",
            "corrupt",
        ) from None
    except ImageValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - a storage error while reading the header
        raise _unreadable(shown, exc) from None

    _check_header(shown, fmt, width, height)
    bytes_read = reader.bytes_read + _check_tail(fs, path, shown, fmt, size, head)
    if deep:
        bytes_read += _deep_decode(fs, path, shown)
    return ImageInfo(path=path, format=fmt, width=width, height=height, size=size, bytes_read=bytes_read)


def validate_bytes(data: bytes, shown: str) -> ImageInfo:
    """:func:`validate_image`'s rules (size, format, sides, aspect, end marker) on bytes already read:
    the exact bytes that are hashed and sent, so what was checked is what is paid for. ``shown`` names
    the file in errors. The pixels are :func:`check_pixels`'s job."""
    size = len(data)
    _check_size(shown, size)
    reader = io.BytesIO(data)
    fmt, width, height = _identify(reader, shown)
    _check_header(shown, fmt, width, height)
    head = data[:32]
    if fmt == "WEBP":
        riff = int.from_bytes(head[4:8], "little") + 8
        if size < riff:
            raise _fail(
                shown, f"file is truncated: {size} bytes but its RIFF header says {riff}", _FIX_REEXPORT, "truncated"
            )
    else:
        count = min(size, TAIL_BYTES)
        _judge_tail(shown, fmt, data[size - count :], count)
    return ImageInfo(path=shown, format=fmt, width=width, height=height, size=size, bytes_read=size)


def _unreadable(shown: str, exc: Exception) -> ImageValidationError:
    if isinstance(exc, FileNotFoundError):
        return _fail(shown, "file does not exist", "check the path, or re-list the source", "unreadable")
    return _fail(
        shown,
        f"cannot read the file ({type(exc).__name__}: {exc})",
        "check access to the storage",
        "unreadable",
    )


def _checked_size(fs: fsspec.AbstractFileSystem, path: str, shown: str, size: int | None) -> int:
    """The file's size (asked of the storage when not listed), within the service's limit."""
    if size is None:
        try:
            size = int(fs.size(path))
        except Exception as exc:  # noqa: BLE001 - report any storage failure with the file named
            raise _unreadable(shown, exc) from None
    _check_size(shown, size)
    return size


def _check_size(shown: str, size: int) -> None:
    if size == 0:
        raise _fail(shown, "file is empty (0 bytes)", _FIX_REEXPORT, "empty")
    if size >= IMAGE_MAX_BYTES:
        raise _fail(
            shown,
            f"file size {size / 2**20:.1f} MB is not under the limit of 16 MB",
            "compress it (JPEG quality ~90) or scale it down",
            "size",
        )


def _check_header(shown: str, fmt: str, width: int, height: int) -> None:
    """The service's rules on what the header says: format, sides, aspect."""
    if fmt not in ACCEPTED_FORMATS:
        raise _fail(shown, f"format {fmt} is not accepted", _FIX_FORMAT, "format")
    if width <= 0 or height <= 0:
        raise _fail(shown, f"image header gives an empty size {width}x{height}", _FIX_REEXPORT, "corrupt")
    if width >= IMAGE_MAX_SIDE or height >= IMAGE_MAX_SIDE:
        raise _fail(
            shown,
            f"{width}x{height} pixels: each side must be under {IMAGE_MAX_SIDE} px",
            f"scale it down so that both sides are under {IMAGE_MAX_SIDE} px",
            "dimensions",
        )
    aspect = width / height
    if not IMAGE_MIN_ASPECT < aspect < IMAGE_MAX_ASPECT:
        raise _fail(
            shown,
            f"aspect ratio {aspect:.2f} ({width}x{height}) is outside {IMAGE_MIN_ASPECT}..{IMAGE_MAX_ASPECT} "
            "(strictly between 1:2 and 2:1)",
            "crop it or pick another image",
            "aspect",
        )


def _deep_decode(fs: fsspec.AbstractFileSystem, path: str, shown: str) -> int:
    data = fs.cat_file(path)
    check_pixels(data, shown)
    return len(data)


def check_pixels(data: bytes, shown: str) -> None:
    """Decode every pixel of an image already read (at most 16 MB, checked from its header first), as
    the service would, and raise ``ImageValidationError`` if its data is corrupt.

    Memory stays bounded: a JPEG decodes at 1/8 scale (its entropy-coded data is read in full either
    way), and other formats at most at the size limit (under 8000 px a side).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder error means the service would choke too
        raise _fail(
            shown, f"image data is corrupt ({type(exc).__name__}: {exc})", _FIX_REEXPORT, "corrupt"
        ) from None


def content_sha256(fs: fsspec.AbstractFileSystem, path: str, *, chunk_size: int = 4 * 2**20) -> str:
    """The sha256 (hex) of a file's bytes, streamed (fetched ``chunk_size`` at a time)."""
    with fs.open(path, "rb", block_size=chunk_size) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
