"""Images as phones and editors make them: trailing data, refused formats, EXIF orientation, detailed posters.

A small corpus generated with Pillow and PyAV (nothing binary is committed): a motion photo (a JPEG
followed by an MP4), a JPEG padded with zeros, a PNG with data after IEND, a WebP with a trailer, an
EXIF-rotated portrait, the magic bytes of formats the service refuses, truly truncated files, and a
noisy 4000x3000 photo. Each goes through validation (local and moto's S3) and through the pipeline
against the emulator, whose ledger shows that refused files bill nothing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
from dagster import AssetRecordsFilter, DagsterInstance, instance_for_test, materialize
from PIL import Image

from dagster_runway.media import ImageValidationError, validate_bytes, validate_image
from dagster_runway.media.formats import jpeg_end, refused_format
from dagster_runway.media.probe import POSTER_MARKDOWN_MAX_CHARS, poster_markdown, probe_video
from dagster_runway.pipeline import metadata as md
from tests.fixtures.s3 import S3Bucket
from tests.pipeline_helpers import PARTITIONS, VIDEOS, latest_failure, make_defs, video_metadata
from tests.test_media_support import mp4_bytes

LOCAL = fsspec.filesystem("file")

# -- the corpus ------------------------------------------------------------------------------------


def _detailed(width: int, height: int, detail: tuple[int, int] = (400, 300)) -> Image.Image:
    """A photo with detail at every scale down to a poster's: colour noise, smoothly enlarged."""
    noise = Image.merge("RGB", [Image.effect_noise(detail, 100 + 10 * band) for band in range(3)])
    return noise.resize((width, height), Image.Resampling.BICUBIC)


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def jpeg(width: int = 480, height: int = 360, **options: Any) -> bytes:
    return _encode(_detailed(width, height, (width // 8, height // 8)), "JPEG", quality=85, **options)


def png(width: int = 480, height: int = 360) -> bytes:
    return _encode(_detailed(width, height, (width // 8, height // 8)), "PNG")


def webp(width: int = 480, height: int = 360) -> bytes:
    return _encode(_detailed(width, height, (width // 8, height // 8)), "WEBP", quality=80)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """Stored 480x360 (as a phone's sensor reads it), shown 360x480 by any viewer (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(480, 360, exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# name -> (the image's own bytes, what follows them)
TRAILERS: dict[str, Callable[[], tuple[bytes, bytes]]] = {
    "motion.jpg": lambda: (jpeg(), mp4_bytes(160, 96, seconds=1.0)),  # a phone's motion photo
    "padded.jpg": lambda: (jpeg(), b"\0" * 70_000),
    "after-iend.png": lambda: (
        png(),
        b"tEXt from a tool that appends after IEND" + _png_chunk(b"tEXt", b"x"),
    ),
    "trailer.webp": lambda: (webp(), b"\0" * 4096),
    # The trailer holds an EOI marker and an IEND; only the walk says where the image ends.
    "tricky.jpg": lambda: (jpeg(), b"\xff\xd9" + b"\0" * 2000 + b"IEND\xaeB`\x82\xff\xd9"),
}

# name -> (header bytes, the name the message must give)
REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "photo.bmp": (lambda: _encode(Image.new("RGB", (64, 48)), "BMP"), "BMP is not accepted"),
    "scan.tiff": (lambda: _encode(Image.new("RGB", (64, 48)), "TIFF"), "TIFF"),
    "anim.gif": (lambda: _encode(Image.new("RGB", (64, 48)), "GIF"), "GIF is not accepted"),
    "art.jp2": (lambda: _encode(Image.new("RGB", (64, 48)), "JPEG2000"), "JPEG 2000 is not accepted"),
    "layers.psd": (
        lambda: b"8BPS\x00\x01" + b"\0" * 6 + struct.pack(">HIIHH", 3, 48, 64, 8, 3) + b"\0" * 64,
        "PSD (Photoshop) is not accepted",
    ),
    "phone.heic": (lambda: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "HEIC is not accepted"),
    "phone.avif": (lambda: b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + b"\0" * 64, "AVIF is not accepted"),
    "texture.dds": (lambda: b"DDS |\0\0\0" + b"\0" * 120, "DDS is not accepted"),
    "logo.eps": (
        lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n",
        "EPS/PostScript is not accepted",
    ),
    "camera.dng": (lambda: b"II*\x00\x08\x00\x00\x00" + b"\0" * 64, "TIFF (or a camera raw file"),
}


def _save(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAILERS))
def test_a_complete_image_with_trailing_data_is_accepted_and_its_end_found(tmp_path: Path, name: str) -> None:
    image, trailer = TRAILERS[name]()
    data = image + trailer
    info = validate_bytes(data, name)
    assert (info.image_end, info.trailing_bytes, info.size) == (len(image), len(trailer), len(data))
    on_disk = validate_image(LOCAL, str(_save(tmp_path, name, data)))
    assert on_disk.format == info.format and on_disk.trailing_bytes in (0, len(trailer))
    if on_disk.image_end is not None:  # the file did not end with its marker: it was walked
        assert on_disk.image_end == len(image)
    # Cut inside the image, the same file is truncated, whatever follows.
    for cut in (image[: len(image) * 2 // 3], image[: len(image) * 2 // 3] + b"\0" * 5000):
        with pytest.raises(ImageValidationError) as error:
            validate_bytes(cut, name)
        assert error.value.code == "truncated" and "re-export or re-upload" in error.value.fix


def test_the_jpeg_walk_skips_segments_so_an_exif_thumbnail_is_not_the_end() -> None:
    image = jpeg()
    thumbnail = jpeg(32, 24)  # a whole JPEG, EOI included, inside an APP1 segment
    segment = b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 8) + b"Exif\0\0" + thumbnail
    data = image[:2] + segment + image[2:] + b"\0" * 100
    assert jpeg_end(data) == len(data) - 100
    assert validate_bytes(data, "thumb.jpg").trailing_bytes == 100


def test_a_motion_photo_on_s3_is_walked_through_ranged_reads(s3: S3Bucket) -> None:
    image, trailer = TRAILERS["motion.jpg"]()
    s3.put("phone/motion.jpg", image + trailer, content_type="image/jpeg")
    info = validate_image(s3.fs, s3.path("phone/motion.jpg"))
    assert (info.format, info.image_end, info.trailing_bytes) == ("JPEG", len(image), len(trailer))
    s3.put("phone/cut.jpg", image[: len(image) // 2], content_type="image/jpeg")
    with pytest.raises(ImageValidationError, match="truncated"):
        validate_image(s3.fs, s3.path("phone/cut.jpg"))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_format_is_told_by_name(tmp_path: Path, name: str) -> None:
    make, expected = REFUSED[name]
    data = make()
    for validate in (
        lambda: validate_bytes(data, name),
        lambda: validate_image(LOCAL, str(_save(tmp_path, name, data))),
    ):
        with pytest.raises(ImageValidationError) as error:
            validate()
        assert error.value.code == "format", str(error.value)
        assert expected in error.value.rule and "is not accepted" in error.value.rule
        assert error.value.fix.startswith("convert it to PNG or JPEG") and "WebP" in error.value.fix
        assert "corrupt" not in str(error.value) and "access" not in str(error.value)


def test_sniffing_leaves_accepted_and_unknown_files_alone() -> None:
    for data in (jpeg(64, 48), png(64, 48), webp(64, 48), b"BMW is a car, not a bitmap header\n"):
        assert refused_format(data[:32]) is None


def test_exif_orientation_gives_the_displayed_size() -> None:
    info = validate_bytes(exif_rotated_jpeg(6), "portrait.jpg")
    assert (info.width, info.height, info.orientation) == (480, 360, 6)
    assert info.displayed_size == (360, 480)
    assert info.pixels_text == "480x360 JPEG, displayed 360x480 (EXIF orientation 6)"
    mirrored = validate_bytes(exif_rotated_jpeg(2), "mirrored.jpg")  # a mirror does not swap the sides
    assert mirrored.displayed_size == (480, 360)
    plain = validate_bytes(jpeg(), "plain.jpg")
    assert (plain.orientation, plain.pixels_text) == (1, "480x360 JPEG")


# -- the poster's inline thumbnail ---------------------------------------------------------------


def _noisy_poster() -> bytes:
    """The poster a noisy 4000x3000 photo gets: 320 px wide, as extract_poster writes it."""
    return _encode(_detailed(4000, 3000).resize((320, 240), Image.Resampling.LANCZOS), "JPEG", quality=85)


def test_a_detailed_photos_thumbnail_fits_inline() -> None:
    markdown = poster_markdown(_noisy_poster())
    assert len(markdown) <= POSTER_MARKDOWN_MAX_CHARS
    assert markdown.startswith("![poster](data:image/webp;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(markdown.split(",", 1)[1][:-1])))
    assert max(shown.size) == 160, "coarser, not smaller: the UI shows it at its size"


@pytest.mark.parametrize("size", [(320, 320), (320, 240), (180, 320), (320, 160)])
def test_the_bound_holds_even_when_no_webp_fits(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    import dagster_runway.media.probe as probe

    monkeypatch.setattr(probe, "_THUMB_COARSENESS", ())  # straight to the last resort
    worst = Image.merge("RGB", [Image.effect_noise(size, 255) for _ in range(3)])  # no two pixels alike
    markdown = poster_markdown(_encode(worst, "PNG"))
    assert markdown.startswith("![poster](data:image/png;base64,")
    assert len(markdown) <= POSTER_MARKDOWN_MAX_CHARS


# -- through the pipeline, against the emulator --------------------------------------------------


@pytest.fixture
def instance() -> Any:
    with instance_for_test() as instance:
        yield instance


def _input_lineage(instance: DagsterInstance, key: str) -> dict[str, Any]:
    """The lineage of what was sent for ``key``, keyed by RunwayMetadata field: in blocking mode, the
    videos' observation recorded at submit."""
    records = instance.fetch_observations(
        AssetRecordsFilter(asset_key=VIDEOS, asset_partitions=[key]), limit=20
    ).records
    submitted = [md.read_metadata(r.asset_observation.metadata) for r in records if r.asset_observation]
    return next(meta for meta in submitted if meta.get("request_id"))


def _materialize(emulator: Any, instance: DagsterInstance, folder: Path, key: str, **options: Any) -> Any:
    defs = make_defs(emulator, str(folder), str(folder.parent / "videos"), mode="blocking", **options)
    instance.add_dynamic_partitions(PARTITIONS, [key])
    return materialize(
        [a for a in defs.assets if hasattr(a, "keys")],
        partition_key=key,
        instance=instance,
        resources=defs.resources,
        selection=[VIDEOS],
        raise_on_error=False,
    )


@pytest.mark.parametrize("name", ["motion.jpg", "padded.jpg", "after-iend.png", "trailer.webp"])
def test_an_image_with_trailing_data_makes_a_video(
    tmp_path: Path, emulator: Any, instance: DagsterInstance, name: str
) -> None:
    image, trailer = TRAILERS[name]()
    _save(tmp_path / "images", name, image + trailer)
    assert _materialize(emulator, instance, tmp_path / "images", name).success
    assert emulator.ledger().billed_submissions == 1
    meta = video_metadata(instance, name)
    assert meta is not None and Path(meta["runway/video_uri"]).exists()


def test_only_the_image_is_sent_and_hashed_and_the_lineage_says_so(
    tmp_path: Path, emulator: Any, instance: DagsterInstance
) -> None:
    image, trailer = TRAILERS["motion.jpg"]()
    _save(tmp_path / "images", "motion.jpg", image + trailer)
    assert _materialize(emulator, instance, tmp_path / "images", "motion.jpg").success
    sent = _input_lineage(instance, "motion.jpg")
    assert sent["source_sha256"] == hashlib.sha256(image).hexdigest()
    assert sent["source_size_bytes"] == len(image)
    assert (
        f"{len(trailer)} bytes after its end marker dropped (not sent, not hashed)" in sent["source_pixels"]
    )
    video = video_metadata(instance, "motion.jpg")
    assert video is not None and video["runway/source_sha256"] == sent["source_sha256"]


@pytest.mark.parametrize("name", ["photo.bmp", "art.jp2", "phone.heic", "layers.psd"])
def test_a_refused_format_bills_nothing_and_says_which_format(
    tmp_path: Path, emulator: Any, instance: DagsterInstance, name: str
) -> None:
    make, expected = REFUSED[name]
    _save(tmp_path / "images", name, make())
    listed = (f"**/*{Path(name).suffix}",)  # a source that lists these files, as a user's patterns may
    assert not _materialize(emulator, instance, tmp_path / "images", name, patterns=listed).success
    assert emulator.ledger().submissions == 0
    failure = latest_failure(instance, name)
    assert failure is not None and failure.failure_class == "invalid_input"
    assert expected in failure.reason and "convert it to PNG or JPEG" in failure.reason


def test_a_truncated_motion_photo_bills_nothing(
    tmp_path: Path, emulator: Any, instance: DagsterInstance
) -> None:
    image, trailer = TRAILERS["motion.jpg"]()
    _save(tmp_path / "images", "cut.jpg", image[: len(image) // 2] + trailer)
    assert not _materialize(emulator, instance, tmp_path / "images", "cut.jpg").success
    assert emulator.ledger().submissions == 0
    failure = latest_failure(instance, "cut.jpg")
    assert failure is not None and "truncated" in failure.reason


def test_ratio_auto_follows_exif_orientation_to_a_portrait_video(
    tmp_path: Path, emulator: Any, instance: DagsterInstance
) -> None:
    _save(tmp_path / "images", "portrait.jpg", exif_rotated_jpeg(6))
    assert _materialize(
        emulator, instance, tmp_path / "images", "portrait.jpg"
    ).success  # ratio "auto" by default
    meta = video_metadata(instance, "portrait.jpg")
    assert meta is not None
    width, height = (int(side) for side in meta["runway/ratio"].split(":"))
    assert height > width, meta["runway/ratio"]
    video = probe_video(meta["runway/video_uri"])
    assert video.height > video.width
    assert (
        _input_lineage(instance, "portrait.jpg")["source_pixels"]
        == "480x360 JPEG, displayed 360x480 (EXIF orientation 6)"
    )


def test_a_noisy_4000x3000_photo_gets_an_inline_poster(
    tmp_path: Path, emulator: Any, instance: DagsterInstance
) -> None:
    _save(tmp_path / "images", "detailed.jpg", _encode(_detailed(4000, 3000), "JPEG", quality=60))
    assert _materialize(emulator, instance, tmp_path / "images", "detailed.jpg").success
    meta = video_metadata(instance, "detailed.jpg")
    assert meta is not None
    preview = meta["runway/poster_preview"]
    assert re.fullmatch(r"!\[poster\]\(data:image/(webp|png);base64,[A-Za-z0-9+/=]+\)", preview)
    assert len(preview) <= POSTER_MARKDOWN_MAX_CHARS
    shown = Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1][:-1])))
    assert max(shown.size) == 160, "coarser, not smaller: the UI shows it at its size"
