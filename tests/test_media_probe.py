"""Probing real MP4s with PyAV (local and on moto's S3), corrupt and non-video files, poster frames."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import pytest
from PIL import Image

from dagster_runway.media import VideoProbeError, extract_poster, poster_uri_for, probe_video
from tests.fixtures.s3 import S3Bucket
from tests.test_media_support import mp4_bytes, png_bytes, write_mp4


def test_probe_faststart_mp4(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "clip.mp4", width=192, height=108, fps=8, seconds=2)
    probe = probe_video(str(path))
    assert (probe.container, probe.codec, probe.width, probe.height) == ("mp4", "h264", 192, 108)
    assert probe.fps == 8.0 and probe.duration_s == pytest.approx(2.0, abs=0.15)
    assert probe.frames == 16 and probe.declared_frames == 16
    assert probe.decodable and probe.decode_error is None
    assert probe.pix_fmt == "yuv420p" and probe.size == path.stat().st_size
    assert probe.ratio == "192:108"


def test_probe_fragmented_mp4(tmp_path: Path) -> None:
    path = tmp_path / "frag.mp4"
    path.write_bytes(mp4_bytes(width=128, height=128, fps=10, seconds=1))
    probe = probe_video(str(path))
    assert (probe.codec, probe.width, probe.height, probe.frames) == ("h264", 128, 128, 10)
    assert probe.decodable and probe.duration_s == pytest.approx(1.0, abs=0.15)


def test_probe_webm_vp9(tmp_path: Path) -> None:
    path = tmp_path / "clip.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(6):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 64), (index * 40, 0, 0)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    probe = probe_video(str(path))
    assert (probe.container, probe.codec, probe.frames, probe.decodable) == ("webm", "vp9", 6, True)


def test_probe_on_s3(s3: S3Bucket, tmp_path: Path) -> None:
    data = write_mp4(tmp_path / "c.mp4", width=160, height=90, fps=8, seconds=1).read_bytes()
    s3.put("v/c.mp4", data, content_type="video/mp4")
    probe = probe_video(s3.url("v/c.mp4"), s3.storage_options)
    assert (probe.codec, probe.width, probe.height, probe.frames, probe.decodable) == (
        "h264",
        160,
        90,
        8,
        True,
    )
    assert probe.size == len(data)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("image.mp4", png_bytes(64, 64), r"is a still image \(png\), not a video"),
        ("text.mp4", b"this is not a video at all\n" * 100, "not a readable video"),
        ("random.mp4", bytes(range(256)) * 64, "not a readable video"),
        ("empty.mp4", b"", "file is empty"),
    ],
)
def test_non_videos_raise_a_clear_error(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(VideoProbeError, match=message) as info:
        probe_video(str(path))
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path, s3: S3Bucket) -> None:
    with pytest.raises(VideoProbeError, match="does not exist"):
        probe_video(str(tmp_path / "nope.mp4"))
    with pytest.raises(VideoProbeError, match="does not exist"):
        probe_video(s3.url("nope.mp4"), s3.storage_options)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for index in range(5):
            frame = av.AudioFrame(format="fltp", layout="mono", samples=1024)
            frame.sample_rate = 8000
            frame.pts = index * 1024
            frame.time_base = Fraction(1, 8000)
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoProbeError, match="no video stream"):
        probe_video(str(path))


def test_truncated_mp4_is_not_decodable(tmp_path: Path) -> None:
    data = write_mp4(tmp_path / "full.mp4", width=160, height=96, fps=8, seconds=2).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:-200])  # moov is first (faststart); the last frames are gone
    probe = probe_video(str(cut))
    assert probe.declared_frames == 16
    assert not probe.decodable
    assert probe.decode_error and "of the 16 frames the container declares" in probe.decode_error


def test_mp4_without_its_index_raises(tmp_path: Path) -> None:
    # A fragmented file cut inside its header: nothing to demux.
    data = mp4_bytes(seconds=1)
    path = tmp_path / "head.mp4"
    path.write_bytes(data[:40])
    with pytest.raises(VideoProbeError):
        probe_video(str(path))


def test_corrupt_frame_data(tmp_path: Path) -> None:
    data = bytearray(write_mp4(tmp_path / "ok.mp4", width=160, height=96, fps=8, seconds=2).read_bytes())
    moov_end = data.find(b"mdat") + 4
    for offset in range(moov_end + 64, len(data), 97):  # scribble over the coded frames
        data[offset : offset + 8] = b"\xff" * 8
    path = tmp_path / "scribbled.mp4"
    path.write_bytes(bytes(data))
    probe = probe_video(str(path))
    assert probe.codec == "h264"
    assert not probe.decodable and probe.decode_error


def test_poster_local(tmp_path: Path) -> None:
    video = write_mp4(tmp_path / "clip.mp4", width=640, height=360, fps=8, seconds=2)
    poster = poster_uri_for(str(video))
    assert poster == str(tmp_path / "clip.poster.jpg")
    assert extract_poster(str(video), poster) == poster
    with Image.open(poster) as image:
        assert (image.format, image.size) == ("JPEG", (320, 180))
    small = extract_poster(str(video), str(tmp_path / "small.jpg"), max_width=1000)
    with Image.open(small) as image:
        assert image.size == (640, 360), "never scaled up"


def test_poster_on_s3(s3: S3Bucket, tmp_path: Path) -> None:
    s3.put("v/clip.mp4", write_mp4(tmp_path / "c.mp4", width=480, height=480, fps=8, seconds=1).read_bytes())
    poster = extract_poster(
        s3.url("v/clip.mp4"), poster_uri_for(s3.url("v/clip.mp4")), s3.storage_options, max_width=100
    )
    assert poster == s3.url("v/clip.poster.jpg")
    head = s3.client.head_object(Bucket=s3.bucket, Key="v/clip.poster.jpg")
    assert head["ContentType"] == "image/jpeg"
    with Image.open(io.BytesIO(s3.fs.cat_file(s3.path("v/clip.poster.jpg")))) as image:
        assert image.size == (100, 100)


def test_poster_of_a_non_video(tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(png_bytes(32, 32))
    with pytest.raises(VideoProbeError):
        extract_poster(str(path), str(tmp_path / "x.jpg"))
    assert not (tmp_path / "x.jpg").exists()
