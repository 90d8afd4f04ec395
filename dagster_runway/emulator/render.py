"""Rendering: a slow pan and zoom (Ken Burns) over the input image, as a real H.264 MP4."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image

from dagster_runway.schema import ratio_size

_MAX_ZOOM = 1.15
_OVERSAMPLE = 1.25


@dataclass(frozen=True)
class Video:
    """A rendered file with its checksum and size."""

    path: Path
    sha256: str
    size: int


def output_size(ratio: str, scale: float) -> tuple[int, int]:
    """The scaled frame size of a ratio, each side rounded to an even number of pixels (for yuv420p).
    A ratio that is an aspect (``16:9``) rather than a size (``1280:720``) gets a long side of 1280 px."""
    width, height = ratio_size(ratio)
    if max(width, height) < 256:
        factor = 1280 / max(width, height)
        width, height = round(width * factor), round(height * factor)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def render_video(
    image: Image.Image,
    path: Path,
    *,
    ratio: str,
    duration: int,
    fps: int,
    scale: float,
    seed: int,
    durable: bool = False,
) -> Video:
    """Write ``duration`` seconds of video at ``fps`` to ``path``; the motion is chosen by ``seed``.

    The file appears whole or not at all; with ``durable``, it is on disk (fsynced) when this returns.
    """
    width, height = output_size(ratio, scale)
    source, crop_w, crop_h = _fit(image.convert("RGB"), width, height)
    partial = path.with_suffix(".part")
    try:
        _encode(
            source, crop_w, crop_h, partial, size=(width, height), frames=duration * fps, fps=fps, seed=seed
        )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    if durable:
        _fsync(partial)
    os.replace(partial, path)
    if durable:
        _fsync(path.parent)
    return Video(path=path, sha256=digest, size=path.stat().st_size)


def copy_video(clip: Video, path: Path, *, durable: bool = False) -> Video:
    """A copy of an already rendered ``clip`` at ``path``, whole or not at all, like :func:`render_video`."""
    partial = path.with_suffix(".part")
    shutil.copyfile(clip.path, partial)
    if durable:
        _fsync(partial)
    os.replace(partial, path)
    if durable:
        _fsync(path.parent)
    return Video(path=path, sha256=clip.sha256, size=clip.size)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(
    source: Image.Image,
    crop_w: float,
    crop_h: float,
    path: Path,
    *,
    size: tuple[int, int],
    frames: int,
    fps: int,
    seed: int,
) -> None:
    width, height = size
    rng = random.Random(seed)
    zoom_in = rng.random() < 0.5
    pan_x, pan_y = rng.uniform(-1, 1), rng.uniform(-1, 1)
    with av.open(str(path), "w", format="mp4", container_options={"movflags": "faststart"}) as container:
        # One encoder thread: renders of different requests run side by side in a pool.
        stream = container.add_stream(
            "libx264", rate=fps, options={"crf": "28", "preset": "veryfast", "threads": "1"}
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            progress = index / max(frames - 1, 1)
            zoom = 1 + (_MAX_ZOOM - 1) * (progress if zoom_in else 1 - progress)
            box_w, box_h = crop_w / zoom, crop_h / zoom
            # The box zooms steadily and its centre pans across the room left around it.
            room_x, room_y = (source.width - box_w) / 2, (source.height - box_h) / 2
            centre_x = source.width / 2 + room_x * pan_x * (2 * progress - 1)
            centre_y = source.height / 2 + room_y * pan_y * (2 * progress - 1)
            box = (centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2, centre_y + box_h / 2)
            frame = av.VideoFrame.from_image(  # type: ignore[no-untyped-call]  # PyAV leaves it unannotated
                source.resize((width, height), Image.Resampling.BILINEAR, box=box)
            )
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _fit(image: Image.Image, width: int, height: int) -> tuple[Image.Image, float, float]:
    """The largest centred crop of the output's aspect, with the image shrunk so that the crop is a
    little over the output size, which keeps the per-frame resize cheap."""
    aspect = width / height
    crop_w, crop_h = float(image.width), float(image.height)
    if crop_w / crop_h > aspect:
        crop_w = crop_h * aspect
    else:
        crop_h = crop_w / aspect
    shrink = min(1.0, _OVERSAMPLE * width / crop_w)
    if shrink < 1.0:
        image = image.resize(
            (max(1, round(image.width * shrink)), max(1, round(image.height * shrink))),
            Image.Resampling.BILINEAR,
        )
        # The shrunk image's sides are rounded, so the crop must not outgrow them.
        crop_w, crop_h = min(crop_w * shrink, image.width), min(crop_h * shrink, image.height)
    return image, crop_w, crop_h
