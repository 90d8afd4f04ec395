"""Header-only validation: every rule, with the bytes read bounded, locally and on moto's S3."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import fsspec
import pytest
from PIL import Image

from dagster_runway.media import ImageValidationError, content_sha256, validate_image
from dagster_runway.media.validation import HEADER_CHUNK, TAIL_BYTES
from dagster_runway.schema import IMAGE_MAX_BYTES
from tests.fixtures.s3 import S3Bucket
from tests.test_media_support import big_png_bytes, jpeg_bytes, png_bytes, sha256, webp_bytes

LOCAL = fsspec.filesystem("file")
HEADER_BOUND = HEADER_CHUNK + TAIL_BYTES


class ReadSpy:
    """Counts the bytes an fs hands out, and fails on any unbounded read."""

    def __init__(self, fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        self.calls: list[tuple[int | None, int | None]] = []
        self.inside = False
        original_cat, original_open = fs.cat_file, fs.open

        def cat_file(path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
            assert start is not None and end is not None, "validation must only make ranged reads"
            self.inside = True
            try:
                data = original_cat(path, start=start, end=end, **kw)
            finally:
                self.inside = False
            self.calls.append((start, end))
            self.bytes += len(data)
            return data

        def no_open(*args: Any, **kwargs: Any) -> Any:
            if not self.inside:  # the local fs implements a ranged cat_file with open + seek
                raise AssertionError("validation must not open (and stream) the whole file")
            return original_open(*args, **kwargs)

        monkeypatch.setattr(fs, "cat_file", cat_file)
        monkeypatch.setattr(fs, "open", no_open)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _save(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("name", "data", "fmt", "size"),
    [
        ("a.png", png_bytes(640, 480), "PNG", (640, 480)),
        ("a.jpg", jpeg_bytes(480, 640), "JPEG", (480, 640)),
        ("lossy.webp", webp_bytes(300, 200), "WEBP", (300, 200)),
        ("lossless.webp", webp_bytes(301, 201, lossless=True), "WEBP", (301, 201)),
        ("edge.png", png_bytes(1999, 1000), "PNG", (1999, 1000)),
        ("tall.png", png_bytes(501, 1000), "PNG", (501, 1000)),
    ],
)
def test_valid_images(tmp_path: Path, name: str, data: bytes, fmt: str, size: tuple[int, int]) -> None:
    info = validate_image(LOCAL, _save(tmp_path, name, data))
    assert (info.format, info.width, info.height, info.size) == (fmt, *size, len(data))
    assert 0 < info.bytes_read <= min(len(data), HEADER_BOUND) + TAIL_BYTES
    assert info.mime_type == {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]


def test_webp_with_alpha_uses_the_extended_header(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (123, 77), (1, 2, 3, 128)).save(buffer, "WEBP")
    info = validate_image(LOCAL, _save(tmp_path, "alpha.webp", buffer.getvalue()))
    assert (info.format, info.width, info.height) == ("WEBP", 123, 77)


def _rule(tmp_path: Path, name: str, data: bytes, **kwargs: Any) -> ImageValidationError:
    path = _save(tmp_path, name, data)
    with pytest.raises(ImageValidationError) as info:
        validate_image(LOCAL, path, **kwargs)
    error = info.value
    assert error.path == path
    assert str(error) == f"{path}: {error.rule}; {error.fix}"
    assert error.fix
    return error


def test_too_large_file_fails_before_any_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = png_bytes(100, 100)
    # A valid PNG padded with a private ancillary chunk to just over the limit.
    data = head[:-12] + _png_chunk(b"prVt", b"\0" * (IMAGE_MAX_BYTES - len(head))) + head[-12:]
    fs = fsspec.filesystem("file", skip_instance_cache=True)
    spy = ReadSpy(fs, monkeypatch)
    path = _save(tmp_path, "huge.png", data)
    with pytest.raises(ImageValidationError) as info:
        validate_image(fs, path)
    assert info.value.code == "size"
    assert "16.0 MB is not under the limit of 16 MB" in str(info.value)
    assert "compress" in info.value.fix
    assert spy.bytes == 0


def test_dimension_rule(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, "PNG")
    error = _rule(tmp_path, "wide.png", buffer.getvalue())
    assert error.code == "dimensions"
    assert "8000x6000 pixels: each side must be under 8000 px" in error.rule
    error = _rule(tmp_path, "bomb.png", _png_header_only(20000, 20000))
    assert error.code == "dimensions"


@pytest.mark.parametrize(
    ("size", "shown"),
    [((2000, 1000), "2.00"), ((2500, 1000), "2.50"), ((500, 1000), "0.50"), ((100, 300), "0.33")],
)
def test_aspect_rule(tmp_path: Path, size: tuple[int, int], shown: str) -> None:
    error = _rule(tmp_path, "pano.png", png_bytes(*size))
    assert error.code == "aspect"
    assert error.rule.startswith(f"aspect ratio {shown} ({size[0]}x{size[1]}) is outside 0.5..2.0")
    assert error.fix == "crop it or pick another image"


@pytest.mark.parametrize(
    ("name", "fmt", "expected"),
    [("a.gif", "GIF", "GIF"), ("a.bmp", "BMP", "BMP"), ("a.tiff", "TIFF", "TIFF")],
)
def test_other_image_formats_are_refused(tmp_path: Path, name: str, fmt: str, expected: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, fmt)
    error = _rule(tmp_path, name, buffer.getvalue())
    assert error.code == "format" and expected in error.rule
    assert "convert it to PNG or JPEG" in error.fix


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello, I am a text file pretending to be an image\n" * 3, "looks like text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"\0" * 100, "PDF"),
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 100, "HEIC"),
        (bytes(range(256)), "starts with 00 01 02"),
    ],
)
def test_non_images_are_refused(tmp_path: Path, data: bytes, expected: str) -> None:
    error = _rule(tmp_path, "fake.png", data)
    assert error.code == "format"
    assert expected in error.rule


def test_corrupt_headers(tmp_path: Path) -> None:
    png = png_bytes(64, 64)
    broken_ihdr = png[:16] + b"\xff" * 13 + png[29:]  # IHDR data and CRC no longer match
    assert _rule(tmp_path, "a.png", broken_ihdr).code == "corrupt"
    assert _rule(tmp_path, "b.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64).code == "corrupt"
    assert _rule(tmp_path, "c.webp", b"RIFF\x20\0\0\0WEBPVP8 " + b"\0" * 20).code == "corrupt"
    assert _rule(tmp_path, "empty.png", b"").code == "empty"


@pytest.mark.parametrize(
    ("name", "data"),
    [("cut.png", png_bytes(300, 300)), ("cut.jpg", jpeg_bytes(300, 300)), ("cut.webp", webp_bytes(300, 300))],
)
def test_truncated_files(tmp_path: Path, name: str, data: bytes) -> None:
    error = _rule(tmp_path, name, data[: len(data) * 2 // 3])
    assert error.code == "truncated"
    assert error.rule.startswith("file is truncated")
    assert "re-export or re-upload" in error.fix


@pytest.mark.parametrize("trailer", [b"", b"\x00" * 64], ids=["iend-damaged", "damaged-with-trailer"])
def test_a_png_chunk_with_a_wrong_crc_is_corrupt(tmp_path: Path, trailer: bytes) -> None:
    data = png_bytes(300, 300)
    error = _rule(tmp_path, "damaged.png", data[:-1] + bytes([data[-1] ^ 0xFF]) + trailer)
    assert error.code == "corrupt"
    assert error.rule == "file is corrupt: the PNG's IEND chunk fails its CRC check"
    assert "re-export or re-upload" in error.fix


def test_deep_decode_finds_corrupt_pixel_data(tmp_path: Path) -> None:
    noisy = Image.effect_noise((256, 256), 60).convert("RGB")
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\x13" * 64  # garbage inside IDAT; header and IEND intact
    path = _save(tmp_path, "bad-pixels.png", bytes(data))
    assert validate_image(LOCAL, path).format == "PNG", "the header alone cannot see it"
    with pytest.raises(ImageValidationError) as info:
        validate_image(LOCAL, path, deep=True)
    assert info.value.code == "corrupt"


def test_jpeg_with_large_metadata_reads_only_its_header(tmp_path: Path) -> None:
    data = jpeg_bytes(800, 600)
    app = b"\xff\xe9" + struct.pack(">H", 60002) + b"M" * 60000  # three 60 KB private APP segments
    data = data[:2] + app * 3 + data[2:]
    info = validate_image(LOCAL, _save(tmp_path, "meta.jpg", data))
    assert (info.width, info.height) == (800, 600)
    assert info.bytes_read <= 4 * HEADER_CHUNK + TAIL_BYTES


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return big_png_bytes(7000, 7000)


def test_big_png_local_reads_a_bounded_prefix(
    tmp_path: Path, big_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fsspec.filesystem("file", skip_instance_cache=True)
    spy = ReadSpy(fs, monkeypatch)
    path = _save(tmp_path, "big.png", big_png)
    info = validate_image(fs, path)
    assert (info.width, info.height, info.size) == (7000, 7000, len(big_png))
    assert len(big_png) > 2_000_000
    assert info.bytes_read == spy.bytes <= HEADER_BOUND
    print(f"7000x7000 PNG of {len(big_png)} bytes validated from {spy.bytes} bytes ({len(spy.calls)} reads)")


def test_big_png_on_s3_is_not_downloaded(
    s3: S3Bucket, big_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("big/seven-k.png", big_png, content_type="image/png")
    spy = ReadSpy(s3.fs, monkeypatch)
    info = validate_image(s3.fs, s3.path("big/seven-k.png"), size=len(big_png))
    assert (info.format, info.width, info.height) == ("PNG", 7000, 7000)
    assert info.bytes_read == spy.bytes <= HEADER_BOUND
    assert len(spy.calls) == 2, "one ranged GET for the header, one for the tail"
    assert spy.bytes * 30 < len(big_png)


def test_s3_errors_name_the_s3_url(s3: S3Bucket) -> None:
    s3.put("bad/pano.png", png_bytes(900, 300))
    with pytest.raises(ImageValidationError) as info:
        validate_image(s3.fs, s3.path("bad/pano.png"))
    assert str(info.value).startswith(f"s3://{s3.bucket}/bad/pano.png: aspect ratio 3.00")
    with pytest.raises(ImageValidationError, match="does not exist"):
        validate_image(s3.fs, s3.path("bad/missing.png"))


def test_content_sha256_streams_locally_and_on_s3(tmp_path: Path, s3: S3Bucket) -> None:
    data = png_bytes(300, 200) * 50
    assert content_sha256(LOCAL, _save(tmp_path, "x.png", data)) == sha256(data)
    s3.put("h/x.png", data)
    assert content_sha256(s3.fs, s3.path("h/x.png"), chunk_size=4096) == sha256(data)


def test_local_names_with_url_characters_are_shown_verbatim(tmp_path: Path) -> None:
    path = _save(tmp_path, "what?#1.png", png_bytes(900, 300))
    with pytest.raises(ImageValidationError) as info:
        validate_image(LOCAL, path)
    assert info.value.path == path and str(info.value).startswith(f"{path}: aspect ratio 3.00")
