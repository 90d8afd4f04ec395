"""A collected video carries its lineage when it leaves the pipeline: in its MP4 metadata (read back with
PyAV and with ffprobe) and in a ``<video>.json`` sidecar; the recorded checksum is of those bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from dagster_runway.media import probe_video
from dagster_runway.media.provenance import VideoTagError, read_tags, tag_video
from dagster_runway.pipeline import records as rec
from dagster_runway.testing import LocalDaemon
from dagster_runway.version import __version__
from tests.pipeline_helpers import (
    PARTITIONS,
    REQUESTS,
    check_statuses,
    make_defs,
    run_until_idle,
    video_metadata,
    write_images,
)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _collected(tmp_path: Path, emulator, instance: DagsterInstance) -> list[str]:
    write_images(tmp_path / "images", valid=2, invalid=False)
    (tmp_path / "images" / "img00.txt").write_text("a lighthouse at dusk, waves — «calm»")
    daemon = LocalDaemon(make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos")), instance)
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []
    return sorted(instance.get_dynamic_partitions(PARTITIONS))


def test_a_video_carries_its_lineage_in_its_metadata_and_a_sidecar(
    tmp_path: Path, emulator, instance
) -> None:
    keys = _collected(tmp_path, emulator, instance)
    requests = rec.latest_requests(instance, REQUESTS, keys)
    for key in keys:
        video = tmp_path / "videos" / f"{key}.mp4"
        tags = read_tags(str(video))
        request = requests[key]
        assert tags["request_id"] == request.request_id and tags["fingerprint"] == request.fingerprint
        assert tags["seed"] == str(request.fields["seed"]) and tags["ratio"] == request.fields["ratio"]
        assert tags["duration_s"] == str(request.fields["duration"])
        assert tags["model"] == "runwayml/runway-gen-4/turbo/image-to-video"
        assert tags["source_sha256"] == request.metadata["source_sha256"]
        assert tags["package_version"] == __version__
        sidecar = json.loads((tmp_path / "videos" / f"{key}.mp4.json").read_text())
        stored = hashlib.sha256(video.read_bytes()).hexdigest()
        assert sidecar == {**tags, "video_sha256": stored, "video_size_bytes": video.stat().st_size}
        meta = video_metadata(instance, key)
        assert (
            meta["runway/video_sha256"] == stored and meta["runway/video_size_bytes"] == video.stat().st_size
        )
        assert check_statuses(instance, key)["checksum_at_rest"] == "SUCCEEDED"
        assert probe_video(str(video)).decodable
    assert (
        read_tags(str(tmp_path / "videos" / "img00.png.mp4"))["prompt_text"]
        == "a lighthouse at dusk, waves — «calm»"
    )
    assert read_tags(str(tmp_path / "videos" / "img00.png.mp4"))["prompt_source"].startswith("sidecar ")
    assert emulator.token not in (tmp_path / "videos" / "img00.png.mp4.json").read_text()


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed (CI installs ffmpeg)")
def test_ffprobe_reads_the_tags(tmp_path: Path, emulator, instance) -> None:
    key = _collected(tmp_path, emulator, instance)[0]
    shown = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-of", "json", str(tmp_path / "videos" / f"{key}.mp4")],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    format_tags = json.loads(shown.stdout)["format"]["tags"]
    expected = {f"runway_{k}": v for k, v in read_tags(str(tmp_path / "videos" / f"{key}.mp4")).items()}
    assert {k: v for k, v in format_tags.items() if k.startswith("runway_")} == expected


def test_tagging_copies_the_streams_and_replaces_earlier_tags(tmp_path: Path, emulator, instance) -> None:
    key = _collected(tmp_path, emulator, instance)[0]
    video = tmp_path / "videos" / f"{key}.mp4"
    copy = tmp_path / "copy.mp4"
    shutil.copy(video, copy)
    before = probe_video(str(copy))
    tag_video(str(copy), {"request_id": "other"})
    assert read_tags(str(copy)) == {"request_id": "other"}  # the old runway_* tags do not linger
    after = probe_video(str(copy))
    assert (after.frames, after.width, after.height, after.codec) == (
        before.frames,
        before.width,
        before.height,
        before.codec,
    )


def test_a_file_that_is_no_video_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    with pytest.raises(VideoTagError, match="could not be copied"):
        tag_video(str(broken), {"request_id": "r"})
    assert broken.read_bytes() == b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64
    assert list(tmp_path.iterdir()) == [broken]


def test_control_characters_in_a_prompt_are_dropped_from_its_tag(tmp_path: Path, emulator, instance) -> None:
    key = _collected(tmp_path, emulator, instance)[0]
    copy = tmp_path / "copy.mp4"
    shutil.copy(tmp_path / "videos" / f"{key}.mp4", copy)
    tag_video(str(copy), {"prompt_text": "two\nlines\tand a NUL\x00 and a bell\x07"})
    assert read_tags(str(copy)) == {"prompt_text": "two\nlines\tand a NUL and a bell"}


@pytest.mark.parametrize("broken", ["tagging", "sidecar"])
def test_a_failure_to_tag_or_write_the_sidecar_never_loses_the_paid_video(
    tmp_path: Path, emulator, instance, monkeypatch, broken: str
) -> None:
    from dagster_runway.pipeline import collect

    def refuse(*args: object, **kwargs: object) -> None:
        raise VideoTagError("no") if broken == "tagging" else PermissionError("read-only output")

    monkeypatch.setattr(collect, "tag_video" if broken == "tagging" else "write_bytes_atomic", refuse)
    keys = _collected(tmp_path, emulator, instance)
    assert emulator.ledger().billed_submissions == 2
    for key in keys:
        video = tmp_path / "videos" / f"{key}.mp4"
        meta = video_metadata(instance, key)
        assert meta["runway/video_sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()
        assert check_statuses(instance, key)["checksum_at_rest"] == "SUCCEEDED"
        assert (read_tags(str(video)) == {}) is (broken == "tagging")
        assert (tmp_path / "videos" / f"{key}.mp4.json").exists() is (broken == "tagging")
