"""Probing stored videos with PyAV, and poster frames.

:func:`probe_video` opens a video on any fsspec filesystem (local files are opened by FFmpeg directly;
remote ones through a read-ahead fsspec file, so only what the demuxer asks for is fetched), reads
its container and stream headers, and decodes the frames (all by default) to tell whether the video
plays. A file that is not a video raises :class:`VideoProbeError`; a video whose frames fail to
decode returns ``decodable=False`` with the reason in ``decode_error``.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import av.error
from PIL import Image

from ._fs import full_url, is_local, url_to_fs
from .errors import VideoProbeError
from .publish import write_bytes_atomic

READ_BLOCK = 4 * 1024 * 1024

#: The Dagster UI shows a markdown value inline only under about 1,000 characters; a longer one hides
#: behind "Show Markdown". :func:`poster_markdown` always stays within this.
POSTER_MARKDOWN_MAX_CHARS = 1000
#: The thumbnail's longest side in the UI, and how much coarser it may get (downscaled by each factor,
#: then scaled back up) before its WebP fits.
_THUMB_SIDE = 160
_THUMB_COARSENESS = (1, 2, 4, 8, 16)
_THUMB_QUALITIES = (60, 40, 20)
#: The last resort: at most 32 px a side, 16 colours, 4 bits a pixel, as PNG. Its size is bounded
#: whatever the picture: 32 rows x 17 bytes of pixel data (+11 for zlib stored blocks), a 48-byte
#: palette and 69 bytes of PNG framing make at most 672 bytes, 896 in base64, 929 characters of markdown.
_FLOOR_SIDE = 32


@dataclass(frozen=True)
class VideoProbe:
    """What a stored video is, and whether its frames decode."""

    container: str  # "mp4", "mov", "webm", "matroska", ...
    codec: str  # "h264", "hevc", "vp9", "av1", ...
    width: int
    height: int
    fps: float
    duration_s: float
    frames: int  # decoded frames when every frame was decoded, else the container's count
    decodable: bool
    pix_fmt: str | None = None
    bit_rate: int | None = None
    size: int | None = None
    declared_frames: int | None = None  # the count the container header gives, if any
    decode_error: str | None = None

    @property
    def ratio(self) -> str:
        """``"1280:720"``, to compare with the requested ratio."""
        return f"{self.width}:{self.height}"


@contextlib.contextmanager
def _open_container(
    uri: str, storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[Any, str, int | None]]:
    fs, path = url_to_fs(uri, storage_options)
    shown = full_url(fs, path)
    try:
        size: int | None = int(fs.size(path))
    except FileNotFoundError:
        raise VideoProbeError(
            f"{shown}: file does not exist; check the path or store the video again"
        ) from None
    except Exception:  # noqa: BLE001 - the size is informative only
        size = None
    if size == 0:
        raise VideoProbeError(f"{shown}: file is empty (0 bytes), not a video; download it again")
    handle: Any = None
    try:
        if is_local(fs):
            container = av.open(path, "r")
        else:
            handle = fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")
            container = av.open(handle, "r")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        if handle is not None:
            handle.close()
        raise VideoProbeError(
            f"{shown}: not a readable video ({type(exc).__name__}: {exc}); the file is corrupt, truncated or not a "
            "video: download it again"
        ) from None
    try:
        yield container, shown, size
    finally:
        container.close()
        if handle is not None:
            handle.close()


def _check_is_video(container: Any, shown: str) -> None:
    names = str(container.format.name).split(",")
    if not container.streams.video:
        raise VideoProbeError(
            f"{shown}: the file has no video stream (audio or data only); download it again"
        )
    if any(name.endswith("_pipe") or name == "image2" for name in names):
        codec = container.streams.video[0].codec_context.name
        raise VideoProbeError(
            f"{shown}: the file is a still image ({codec}), not a video; download the video again"
        )


def _container_name(container: Any) -> str:
    names = str(container.format.name).split(",")
    if "mp4" in names or "mov" in names:
        brand = str(container.metadata.get("major_brand", "")).strip().lower()
        return "mov" if brand.startswith("qt") else "mp4"
    if "webm" in names and "matroska" in names:
        return "webm" if str(container.metadata.get("DOCTYPE", "webm")).lower() == "webm" else "matroska"
    return names[0]


def probe_video(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    max_decode_frames: int | None = None,
) -> VideoProbe:
    """Container, codec, size, frame rate, duration and frame count of a stored video, and whether its
    frames decode (all of them, or the first ``max_decode_frames``).

    Raises :class:`VideoProbeError` when the file is missing, is not a video, or has no video stream.
    """
    with _open_container(uri, storage_options) as (container, shown, size):
        _check_is_video(container, shown)
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        time_base = stream.time_base or Fraction(1, 1)
        duration_s = 0.0
        if stream.duration:
            duration_s = float(stream.duration * time_base)
        elif container.duration:
            duration_s = container.duration / av.time_base
        declared = int(stream.frames) if stream.frames else None

        decoded, failures, first_failure = 0, 0, ""
        first_pts: int | None = None
        last_pts: int | None = None
        complete = True
        try:
            for packet in container.demux(stream):
                try:
                    frames_out = packet.decode()
                except (av.error.FFmpegError, ValueError) as exc:
                    failures += 1  # keep going: the count of frames that do decode is the useful figure
                    first_failure = first_failure or f"{type(exc).__name__}: {exc}"
                    continue
                for frame in frames_out:
                    decoded += 1
                    if frame.pts is not None:
                        first_pts = frame.pts if first_pts is None else first_pts
                        last_pts = frame.pts
                if max_decode_frames is not None and decoded >= max_decode_frames:
                    complete = False
                    break
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            failures += 1
            first_failure = first_failure or f"demuxing stopped: {type(exc).__name__}: {exc}"
        problems = []
        if failures:
            problems.append(f"{failures} packet(s) failed to decode (first: {first_failure})")
        if decoded == 0:
            problems.append("no frame could be decoded")
        elif complete and declared and decoded < declared:
            problems.append(f"decoded only {decoded} of the {declared} frames the container declares")
        error = "; ".join(problems) or None
        if not duration_s and first_pts is not None and last_pts is not None and fps:
            duration_s = float((last_pts - first_pts) * time_base) + 1 / fps
        frames = decoded if complete and error is None else (declared or decoded)
        return VideoProbe(
            container=_container_name(container),
            codec=str(ctx.name),
            width=int(ctx.width or stream.width or 0),
            height=int(ctx.height or stream.height or 0),
            fps=round(fps, 3),
            duration_s=round(duration_s, 3),
            frames=frames,
            decodable=error is None,
            pix_fmt=str(ctx.pix_fmt) if ctx.pix_fmt else None,
            bit_rate=int(container.bit_rate) if container.bit_rate else None,
            size=size,
            declared_frames=declared,
            decode_error=error,
        )


def poster_uri_for(video_uri: str) -> str:
    """Where the poster of ``video_uri`` goes by default: ``a/b.mp4`` -> ``a/b.poster.jpg``."""
    head, dot, ext = video_uri.rpartition(".")
    base = head if dot and "/" not in ext else video_uri
    return f"{base}.poster.jpg"


def extract_poster(
    video_uri: str,
    poster_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    max_width: int = 320,
    *,
    at_s: float | None = None,
    quality: int = 85,
) -> str:
    """Write a JPEG poster frame of the video to ``poster_uri`` (atomically) and return its URI.

    The frame is the one at ``at_s`` seconds, by default a tenth of the way in (at most 1 s), which
    avoids a black first frame after a fade-in; it is scaled down to ``max_width`` pixels wide.
    """
    with _open_container(video_uri, storage_options) as (container, shown, _size):
        _check_is_video(container, shown)
        stream = container.streams.video[0]
        if at_s is None:
            duration = (
                float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
            )
            at_s = min(1.0, duration / 10) if duration else 0.0
        image: Image.Image | None = None
        try:
            for frame in container.decode(stream):
                image = frame.to_image()
                if frame.time is None or frame.time >= at_s:
                    break
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            if image is None:
                raise VideoProbeError(
                    f"{shown}: no frame decodes ({type(exc).__name__}: {exc}); the video is corrupt: download it again"
                ) from None
        if image is None:
            raise VideoProbeError(f"{shown}: the video has no frames; download it again")
    if image.width > max_width:
        image = image.resize(
            (max_width, max(1, round(image.height * max_width / image.width))), Image.Resampling.LANCZOS
        )
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality, optimize=True)
    return write_bytes_atomic(
        poster_uri, buffer.getvalue(), storage_options=storage_options, content_type="image/jpeg"
    )


def _markdown(data: bytes, mime: str) -> str:
    return f"![poster](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"


def poster_markdown(poster: bytes) -> str:
    """An inline thumbnail of a poster image for the Dagster UI, as markdown with a data URI, always
    within :data:`POSTER_MARKDOWN_MAX_CHARS` characters however detailed the picture.

    The first WebP that fits, from sharpest to coarsest: 160 px, then less detail (downscaled and
    scaled back up) and lower quality; if none does, a 32 px 16-colour PNG, whose size is bounded
    (see :data:`_FLOOR_SIDE`)."""
    with Image.open(io.BytesIO(poster)) as opened:
        image = opened.convert("RGB")
    image.thumbnail((_THUMB_SIDE, _THUMB_SIDE), Image.Resampling.LANCZOS)
    for coarseness in _THUMB_COARSENESS:
        coarse = image
        if coarseness > 1:
            small = (max(1, image.width // coarseness), max(1, image.height // coarseness))
            coarse = image.resize(small, Image.Resampling.BOX).resize(image.size, Image.Resampling.BICUBIC)
        for quality in _THUMB_QUALITIES:
            out = io.BytesIO()
            coarse.save(out, format="WEBP", quality=quality)
            markdown = _markdown(out.getvalue(), "image/webp")
            if len(markdown) <= POSTER_MARKDOWN_MAX_CHARS:
                return markdown
    image.thumbnail((_FLOOR_SIDE, _FLOOR_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.quantize(16).save(out, format="PNG", bits=4)
    return _markdown(out.getvalue(), "image/png")
