"""Header-only image validation: the service's image rules checked before any credit is spent.

:func:`validate_image` reads a bounded prefix of the file through ranged reads (one ranged GET on S3
for almost every image), lets Pillow identify the format and size from it, then reads a few bytes at
the end of the file to catch a truncated upload. A 7000x7000 PNG on S3 costs about 64 KiB of
transfer, not its full size. WebP is the one exception to "with Pillow": Pillow's WebP plugin reads
the whole file to open it, so its RIFF header is parsed here (the same fields Pillow reads).

A format the service refuses is named from its magic bytes before Pillow runs ("BMP is not
accepted"). Where an image ends is decided by walking its structure (:mod:`.formats`), not by looking
for a marker near the end: a file that ends exactly with its end marker is complete (known from the
tail); any other file is read whole and walked, so a complete image followed by other bytes (a motion
photo's MP4, zero padding, data after IEND) is accepted, and :attr:`ImageInfo.image_end` says where
the image stops, while a file that ends before its end marker is refused as truncated.

The EXIF Orientation a viewer applies (JPEG, and PNG's ``eXIf`` before its pixel data) is read from
the header too: :attr:`ImageInfo.displayed_size` is the size the picture is shown at.

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

from dagster_runway.models import DEFAULT_MODEL, ImageRules
from dagster_runway.schema import IMAGE_MAX_SIDE

from ._fs import full_url, read_range
from .errors import ImageValidationError
from .formats import ends_complete, image_end, png_bad_crc, refused_format

#: First ranged read; enough for the header of nearly every PNG and JPEG.
HEADER_CHUNK = 64 * 1024
#: Hard cap on the header bytes read (a JPEG with megabytes of EXIF/XMP/ICC before its frame header).
HEADER_BUDGET = 4 * 1024 * 1024
#: Bytes read at the end of the file to check for the format's end marker.
TAIL_BYTES = 1024

ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
_FIX_FORMAT = "convert it to PNG or JPEG (the service accepts PNG, JPEG and WebP)"
_FIX_REEXPORT = "re-export or re-upload the image"
#: EXIF Orientation values whose displayed picture is the stored one turned a quarter (width and
#: height swap): 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise.
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    """What the header said about a valid image, and how many bytes it took to find out."""

    path: str
    format: str
    width: int
    height: int
    size: int
    bytes_read: int
    #: Where the image ends (just past its end marker), when the file was walked: always by
    #: :func:`validate_bytes`; by :func:`validate_image` only when the file does not end with its marker.
    image_end: int | None = None
    orientation: int = 1  # EXIF Orientation, 1..8 (1: as stored)

    @property
    def mime_type(self) -> str:
        return ACCEPTED_FORMATS.get(self.format, "application/octet-stream")

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def trailing_bytes(self) -> int:
        """Bytes after the image's end marker (a motion photo's video, padding): 0 if none or not walked."""
        return 0 if self.image_end is None else self.size - self.image_end

    @property
    def displayed_size(self) -> tuple[int, int]:
        """``(width, height)`` as a viewer shows the picture: swapped for EXIF orientations 5 to 8."""
        if self.orientation in SWAPPING_ORIENTATIONS:
            return self.height, self.width
        return self.width, self.height

    @property
    def pixels_text(self) -> str:
        """For lineage: ``"480x360 JPEG"``, or ``"480x360 JPEG, displayed 360x480 (EXIF orientation 6)"``."""
        text = f"{self.width}x{self.height} {self.format}"
        if self.orientation != 1:
            shown_w, shown_h = self.displayed_size
            text += f", displayed {shown_w}x{shown_h} (EXIF orientation {self.orientation})"
        return text


class _HeaderBudgetExceeded(Exception):
    pass


class _ReadFailed(Exception):
    """A storage error while reading the header (so a decoder's error is never taken for one)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


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
            try:
                chunk = read_range(self._fs, self._path, start, end)
            except Exception as exc:  # noqa: BLE001 - any storage failure, reported as such
                raise _ReadFailed(exc) from exc
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


def _identify(reader: _RangeReader | io.BytesIO, shown: str) -> tuple[str, int, int, int]:
    """Format, width, height and EXIF orientation from the header. A format the service refuses is
    named from its magic bytes before Pillow runs."""
    head = reader.read(32)
    reader.seek(0)
    refused = refused_format(head)
    if refused is not None:
        raise _fail(shown, f"{refused} is not accepted", _FIX_FORMAT, "format")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        size = _webp_size(head)
        if size is None:
            raise _fail(
                shown, "WebP header is corrupt (no VP8/VP8L/VP8X frame header)", _FIX_REEXPORT, "corrupt"
            )
        return "WEBP", size[0], size[1], 1
    try:
        # No warnings.catch_warnings() here: it is not thread-safe, and a sensor may validate in threads.
        with Image.open(cast(IO[bytes], reader)) as image:  # a file-like over ranged reads
            return str(image.format), image.width, image.height, _orientation(image.info.get("exif"))
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
    except (_HeaderBudgetExceeded, _ReadFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on a header it cannot parse
        raise _fail(
            shown,
            f"image header is corrupt or truncated ({type(exc).__name__}: {exc})",
            _FIX_REEXPORT,
            "corrupt",
        ) from None


def _orientation(exif: object) -> int:
    """The EXIF Orientation (1..8) in an APP1/eXIf payload; 1 when absent or unreadable (as viewers do)."""
    if not isinstance(exif, bytes):
        return 1
    try:
        value = Image.Exif()
        value.load(exif)
        orientation = value.get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: viewers show the picture as stored
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _describe(head: bytes) -> str:
    if head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "looks like text"
    return f"starts with {head[:8].hex(' ')}"


def _check_tail(
    fs: fsspec.AbstractFileSystem, path: str, shown: str, fmt: str, size: int, head: bytes
) -> tuple[int, int | None]:
    """Check that the image is complete; return the bytes read and where the image ends (None when
    the file ends with its end marker, which a few tail bytes show). WebP's end is its RIFF size;
    a PNG or JPEG that does not end with its marker is read whole and walked to its end."""
    if fmt == "WEBP":
        riff = 8 + int.from_bytes(head[4:8], "little")
        if size < riff:
            raise _truncated(shown, fmt, head, size)
        return 0, riff
    count = min(size, TAIL_BYTES)
    try:
        tail = read_range(fs, path, size - count, size)
        if ends_complete(fmt, tail):
            return len(tail), None
        data = read_range(fs, path, 0, size)  # rare (a trailer, or a truncated file): at most 16 MB
    except Exception as exc:  # noqa: BLE001 - a storage error while reading the tail
        raise _unreadable(shown, exc) from None
    return len(tail) + len(data), _end_of(shown, fmt, data, size)


def _end_of(shown: str, fmt: str, data: bytes, size: int) -> int:
    """Where the image in ``data`` (a file of ``size`` bytes) ends; refused as truncated if it does not."""
    end = image_end(fmt, data)
    if end is None:
        raise _truncated(shown, fmt, data, size)
    chunk = png_bad_crc(data, end) if fmt == "PNG" else None
    if chunk is not None:
        raise _fail(
            shown, f"file is corrupt: the PNG's {chunk} chunk fails its CRC check", _FIX_REEXPORT, "corrupt"
        )
    return end


def _truncated(shown: str, fmt: str, head: bytes, size: int) -> ImageValidationError:
    if fmt == "WEBP":
        rule = f"file is truncated: {size} bytes but its RIFF header says {8 + int.from_bytes(head[4:8], 'little')}"
    elif fmt == "PNG":
        rule = "file is truncated: the PNG's chunks end before its IEND chunk"
    else:
        rule = "file is truncated: the JPEG's data ends before its end-of-image marker (FF D9)"
    return _fail(shown, rule, _FIX_REEXPORT, "truncated")


def validate_image(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    size: int | None = None,
    deep: bool = False,
    rules: ImageRules = DEFAULT_MODEL.image_rules,
) -> ImageInfo:
    """Check an image against the service's rules from its header alone; return what the header said.

    Reads at most :data:`HEADER_BUDGET` bytes from the start of the file (usually one 64 KiB ranged
    read) and :data:`TAIL_BYTES` from its end; a PNG or JPEG that does not end with its end marker
    (bytes after the image, or a truncated file) is read whole to find where the image ends.
    ``size`` (from a listing) saves a metadata request. ``deep=True`` also downloads and fully
    decodes the image to catch corrupt pixel data; it reads the whole file. ``rules`` are the model's
    (Runway Gen-4 Turbo's by default). Raises :class:`ImageValidationError` naming the file, the rule
    and the fix.
    """
    shown = full_url(fs, path)
    size = _checked_size(fs, path, shown, size, rules)
    reader = _RangeReader(fs, path, size, HEADER_BUDGET)
    try:
        head = reader.read(32)
        reader.seek(0)
        fmt, width, height, orientation = _identify(reader, shown)
    except _HeaderBudgetExceeded:
        raise _fail(
            shown,
            f"no image header in the first {HEADER_BUDGET // 2**20} MB (metadata too large or file corrupt)",
            "strip the metadata (EXIF/XMP/ICC) or re-export the image",
            "corrupt",
        ) from None
    except _ReadFailed as exc:
        raise _unreadable(shown, exc.error) from None

    _check_header(shown, fmt, width, height, rules)
    tail_read, end = _check_tail(fs, path, shown, fmt, size, head)
    bytes_read = reader.bytes_read + tail_read
    if deep:
        bytes_read += _deep_decode(fs, path, shown)
    return ImageInfo(
        path=path,
        format=fmt,
        width=width,
        height=height,
        size=size,
        bytes_read=bytes_read,
        image_end=end,
        orientation=orientation,
    )


def validate_bytes(data: bytes, shown: str, rules: ImageRules = DEFAULT_MODEL.image_rules) -> ImageInfo:
    """:func:`validate_image`'s rules (size, format, sides, aspect, a complete image) on bytes already
    read: the exact bytes that are hashed and sent, so what was checked is what is paid for. The
    image's structure is always walked, so ``image_end`` says where it ends (``trailing_bytes`` follow
    it). ``shown`` names the file in errors. The pixels are :func:`check_pixels`'s job."""
    size = len(data)
    _check_size(shown, size, rules)
    fmt, width, height, orientation = _identify(io.BytesIO(data), shown)
    _check_header(shown, fmt, width, height, rules)
    end = _end_of(shown, fmt, data, size)
    return ImageInfo(
        path=shown,
        format=fmt,
        width=width,
        height=height,
        size=size,
        bytes_read=size,
        image_end=end,
        orientation=orientation,
    )


def _unreadable(shown: str, exc: Exception) -> ImageValidationError:
    if isinstance(exc, FileNotFoundError):
        return _fail(shown, "file does not exist", "check the path, or re-list the source", "unreadable")
    return _fail(
        shown,
        f"cannot read the file ({type(exc).__name__}: {exc})",
        "check access to the storage",
        "unreadable",
    )


def _checked_size(
    fs: fsspec.AbstractFileSystem, path: str, shown: str, size: int | None, rules: ImageRules
) -> int:
    """The file's size (asked of the storage when not listed), within the service's limit."""
    if size is None:
        try:
            size = int(fs.size(path))
        except Exception as exc:  # noqa: BLE001 - report any storage failure with the file named
            raise _unreadable(shown, exc) from None
    _check_size(shown, size, rules)
    return size


def _check_size(shown: str, size: int, rules: ImageRules) -> None:
    if size == 0:
        raise _fail(shown, "file is empty (0 bytes)", _FIX_REEXPORT, "empty")
    if size >= rules.max_bytes:
        raise _fail(
            shown,
            f"file size {size / 2**20:.1f} MB is not under the limit of {rules.max_bytes / 2**20:g} MB",
            "compress it (JPEG quality ~90) or scale it down",
            "size",
        )


def _check_header(shown: str, fmt: str, width: int, height: int, rules: ImageRules) -> None:
    """The model's rules on what the header says: format, sides, aspect."""
    if fmt not in ACCEPTED_FORMATS:
        raise _fail(shown, f"{fmt} is not accepted", _FIX_FORMAT, "format")
    if width <= 0 or height <= 0:
        raise _fail(shown, f"image header gives an empty size {width}x{height}", _FIX_REEXPORT, "corrupt")
    if width >= rules.max_side or height >= rules.max_side:
        raise _fail(
            shown,
            f"{width}x{height} pixels: each side must be under {rules.max_side} px",
            f"scale it down so that both sides are under {rules.max_side} px",
            "dimensions",
        )
    aspect = width / height
    if not rules.min_aspect < aspect < rules.max_aspect:
        raise _fail(
            shown,
            f"aspect ratio {aspect:.2f} ({width}x{height}) is outside {rules.min_aspect}..{rules.max_aspect} "
            f"(strictly between {_as_ratio(rules.min_aspect)} and {_as_ratio(rules.max_aspect)})",
            "crop it or pick another image",
            "aspect",
        )


def _as_ratio(aspect: float) -> str:
    """``0.5`` -> ``"1:2"``, ``2.0`` -> ``"2:1"``, ``1.78`` -> ``"1.78:1"``."""
    if aspect < 1 and (1 / aspect).is_integer():
        return f"1:{int(1 / aspect)}"
    return f"{aspect:g}:1"


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
