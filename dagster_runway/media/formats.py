"""What an image file is, from its bytes: refused formats by their magic, and where an image ends.

:func:`refused_format` names a format the service does not take (BMP, TIFF, GIF, HEIC, ...) from the
first bytes alone, before any decoder runs, so the user is told "BMP is not accepted" rather than
whatever a decoder says about a file it half understands.

:func:`image_end` finds where a PNG, JPEG or WebP ends by walking its structure: PNG chunks up to
IEND, JPEG segments (and the entropy-coded data after each SOS) up to EOI, WebP's RIFF size. Bytes
after that end are a trailer (a phone's motion photo appends an MP4; some tools pad with zeros); no
end at all means the file is truncated.
"""

from __future__ import annotations

import zlib

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (magic, name), checked in order; the first match names the file. Formats Pillow names well
# by itself (ICO, TGA, PCX, ...) are left to it: it says "TGA" and the file is refused by that name.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"8BPS", "PSD (Photoshop)"),
    (b"II*\x00", "TIFF (or a camera raw file built on TIFF: DNG, NEF, CR2, ARW)"),
    (b"MM\x00*", "TIFF (or a camera raw file built on TIFF: DNG, NEF, CR2, ARW)"),
    (b"II+\x00", "BigTIFF"),
    (b"IIRO", "ORF (Olympus raw)"),
    (b"IIU\x00", "RW2 (Panasonic raw)"),
    (b"FUJIFILMCCD-RAW", "RAF (Fujifilm raw)"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 (codestream)"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"DDS ", "DDS"),
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"qoif", "QOI"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"gimp xcf", "XCF (GIMP)"),
    (b"PK\x03\x04", "a ZIP archive"),
)
# Brands of ISO base media files (an ``ftyp`` box) that hold still images; any other brand is a video.
_HEIF_BRANDS = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"hevc": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
    b"crx ": "CR3 (Canon raw)",
}


def refused_format(head: bytes) -> str | None:
    """The name of a format the service does not accept, from the file's first 32 bytes, or None
    when the bytes do not say (a PNG, JPEG or WebP, or something unknown)."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head.startswith(b"BM") and head[6:10] == b"\0\0\0\0":  # BITMAPFILEHEADER: reserved fields are zero
        return "BMP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return _HEIF_BRANDS.get(
            brand, f"an ISO media file (brand {brand.decode('ascii', 'replace')!r}: MP4/MOV/3GP)"
        )
    if head[:4] == b"RIFF" and head[8:12] != b"WEBP":
        return f"a RIFF {head[8:12].decode('ascii', 'replace')!r} file (AVI/WAV), not WebP"
    stripped = head.lstrip()
    if stripped.startswith((b"<svg", b"<?xml")):
        return "SVG/XML (a vector or text file)"
    return None


def png_end(data: bytes) -> int | None:
    """The offset just past a PNG's IEND chunk, walking chunk by chunk; None if the data ends first."""
    pos, size = len(_PNG_SIGNATURE), len(data)
    while pos + 8 <= size:
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
        if end > size:
            return None
        if data[pos + 4 : pos + 8] == b"IEND":
            return end
        pos = end
    return None


def png_bad_crc(data: bytes, end: int) -> str | None:
    """The type of the first chunk before ``end`` whose CRC is wrong (a damaged file), or None."""
    pos = len(_PNG_SIGNATURE)
    while pos < end:
        length = int.from_bytes(data[pos : pos + 4], "big")
        body = data[pos + 4 : pos + 8 + length]
        if zlib.crc32(body) != int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big"):
            return body[:4].decode("latin-1")
        pos += 12 + length
    return None


def jpeg_end(data: bytes) -> int | None:
    """The offset just past a JPEG's EOI marker; None if the data ends first.

    Marker segments are skipped by their length (so an EXIF thumbnail's own EOI is never taken for
    the image's); after each SOS the entropy-coded data runs to the next marker that is not a stuffed
    ``FF 00`` or a restart marker. Stray bytes between segments are skipped, as libjpeg does.
    """
    size = len(data)
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= size:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # stuffed byte, TEM, RSTn: no length
            continue
        if pos + 2 > size:
            return None
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if pos > size:
            return None


def webp_end(data: bytes) -> int | None:
    """The offset just past a WebP's RIFF container (8 + its RIFF size); None if the data ends first."""
    end = 8 + int.from_bytes(data[4:8], "little")
    return end if len(data) >= end else None


def image_end(fmt: str, data: bytes) -> int | None:
    """Where the image of format ``fmt`` (Pillow's name) in ``data`` ends; None if it is truncated."""
    if fmt == "PNG":
        return png_end(data)
    if fmt in ("JPEG", "MPO"):
        return jpeg_end(data)
    if fmt == "WEBP":
        return webp_end(data)
    raise ValueError(f"no end marker known for {fmt}")


def ends_complete(fmt: str, tail: bytes) -> bool:
    """Whether a file ending in ``tail`` ends exactly with its format's end marker: the usual case,
    known from a few bytes; anything else needs :func:`image_end` on the whole file."""
    if fmt == "PNG":
        return tail.endswith(b"\x00\x00\x00\x00IEND\xaeB`\x82")
    return tail.endswith(b"\xff\xd9")
