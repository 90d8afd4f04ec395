"""Streaming, atomic video storage: local disk and moto's S3, truncated bodies retried, nothing partial
ever visible, nothing left behind on failure."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.media import (
    DownloadError,
    NotAVideoError,
    VideoProbeError,
    probe_video,
    remove_stale_parts,
    sha256_of,
    store_video,
    write_bytes_atomic,
)
from dagster_runway.retry import RetryPolicy
from tests.fixtures.s3 import S3Bucket
from tests.test_media_service_url import _submit_and_wait
from tests.test_media_support import ScriptedServer, ServerScript, mp4_bytes, png_bytes, sha256


def mp4ish(size: int) -> bytes:
    """Bytes that start like an MP4 (an ``ftyp`` box), so that they pass the signature check."""
    head = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    return head + os.urandom(size - len(head))


PAYLOAD = mp4ish(3 * 2**20 + 12345)


NO_WAIT = RetryPolicy(max_attempts=3, backoff_initial=0)


def _serve(**script: object) -> ScriptedServer:
    return ScriptedServer(ServerScript(payload=PAYLOAD, **script))  # type: ignore[arg-type]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def _uploads(s3: S3Bucket) -> list[dict]:
    return s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])


def test_local_store_streams_hashes_and_publishes(tmp_path: Path) -> None:
    with _serve() as server:
        dest = tmp_path / "new" / "folder" / "clip.mp4"
        stored = store_video(f"{server.url}/v.mp4", str(dest))
    assert dest.read_bytes() == PAYLOAD
    assert (stored.uri, stored.size, stored.sha256) == (str(dest), len(PAYLOAD), sha256(PAYLOAD))
    assert stored.content_type == "video/mp4" and stored.attempts == 1
    assert _leftovers(dest.parent) == []
    assert sha256_of(str(dest)) == sha256(PAYLOAD)


@pytest.mark.parametrize("ranges", [False, True], ids=["restart", "resume"])
def test_truncated_body_is_retried(tmp_path: Path, ranges: bool) -> None:
    with _serve(truncate_times=1, truncate_fraction=0.4, ranges=ranges) as server:
        stored = store_video(f"{server.url}/v.mp4", str(tmp_path / "v.mp4"), retry=NO_WAIT)
        requests = server.script.requests
    assert stored.attempts == 2 and stored.sha256 == sha256(PAYLOAD)
    assert (tmp_path / "v.mp4").read_bytes() == PAYLOAD
    assert len(requests) == 2
    if ranges:  # the retry asks only for the missing part
        start = int(requests[1]["range"].removeprefix("bytes=").removesuffix("-"))
        assert 0 < start <= int(len(PAYLOAD) * 0.4)
    else:
        assert requests[1]["range"] == ""
    assert _leftovers(tmp_path) == []


def test_always_truncated_fails_and_leaves_nothing_local(tmp_path: Path) -> None:
    (tmp_path / "keep.mp4").write_bytes(b"old video")
    with _serve(always_truncate=True) as server:
        with pytest.raises(DownloadError) as info:
            store_video(
                f"{server.url}/v.mp4?token=abc",
                str(tmp_path / "keep.mp4"),
                retry=RetryPolicy(max_attempts=3, backoff_initial=0),
            )
        assert len(server.script.requests) == 3
    message = str(info.value)
    assert "after 3 attempt(s)" in message and "nothing was stored" in message
    assert "token=abc" not in message
    assert (tmp_path / "keep.mp4").read_bytes() == b"old video", (
        "a failed download never replaces the old file"
    )
    assert _leftovers(tmp_path) == []


def test_retryable_statuses_then_success(tmp_path: Path) -> None:
    with _serve(statuses=[503, 429, 502]) as server:
        stored = store_video(
            f"{server.url}/v.mp4",
            str(tmp_path / "v.mp4"),
            retry=RetryPolicy(max_attempts=4, backoff_initial=0),
        )
    assert stored.attempts == 4 and stored.sha256 == sha256(PAYLOAD)


def test_downloads_follow_the_shared_retry_rule_for_retry_after(tmp_path: Path) -> None:
    """The client's rule: a Retry-After is honoured when it is longer than the backoff, and one longer
    than ``retry_after_max`` ends the download at once instead of holding the run."""
    policy = RetryPolicy(max_attempts=3, backoff_initial=0, retry_after_max=5.0)
    with _serve(statuses=[503], retry_after="0.3") as server:
        started = time.monotonic()
        stored = store_video(f"{server.url}/v.mp4", str(tmp_path / "v.mp4"), retry=policy)
        assert time.monotonic() - started >= 0.3, "the server's Retry-After was honoured"
    assert stored.attempts == 2
    with _serve(statuses=[503], retry_after="3600") as server:
        with pytest.raises(DownloadError, match="after 1 attempt.*asked to wait 3600 s"):
            store_video(f"{server.url}/v.mp4", str(tmp_path / "w.mp4"), retry=policy)
        assert len(server.script.requests) == 1
    assert not (tmp_path / "w.mp4").exists()


@pytest.mark.parametrize("status", [403, 404, 410])
def test_permanent_statuses_are_not_retried(tmp_path: Path, status: int) -> None:
    with _serve(statuses=[status]) as server:
        with pytest.raises(DownloadError, match=f"HTTP {status}.*expired") as info:
            store_video(
                f"{server.url}/v.mp4",
                str(tmp_path / "v.mp4"),
                retry=RetryPolicy(max_attempts=5, backoff_initial=0),
            )
        assert len(server.script.requests) == 1
    assert "fresh URL" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    with _serve() as server:
        url = f"{server.url}/v.mp4"
    with pytest.raises(DownloadError, match=r"after 2 attempt\(s\).*ConnectError"):
        store_video(url, str(tmp_path / "v.mp4"), retry=RetryPolicy(max_attempts=2, backoff_initial=0))
    assert list(tmp_path.iterdir()) == []


def test_reader_never_sees_a_partial_local_file(tmp_path: Path) -> None:
    dest = tmp_path / "clip.mp4"
    dest.write_bytes(b"previous version")
    with _serve(pause_at=2 * 2**20) as server:
        result: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: result.update(stored=store_video(f"{server.url}/v.mp4", str(dest)))
        )
        worker.start()
        assert server.script.paused.wait(10)
        time.sleep(0.05)  # let the client write what it has received
        assert dest.read_bytes() == b"previous version"
        parts = _leftovers(tmp_path)
        assert len(parts) == 1 and parts[0].startswith(".clip.mp4.")  # hidden, in the same folder
        server.script.resume.set()
        worker.join(10)
    assert dest.read_bytes() == PAYLOAD and _leftovers(tmp_path) == []


def test_s3_store_is_one_multipart_object_with_content_type(s3: S3Bucket) -> None:
    payload = mp4ish(19 * 2**20)  # three 8 MiB parts
    with ScriptedServer(ServerScript(payload=payload, content_type="application/octet-stream")) as server:
        stored = store_video(f"{server.url}/v", s3.url("videos/a.mp4"), storage_options=s3.storage_options)
    assert stored.uri == s3.url("videos/a.mp4") and stored.size == len(payload)
    assert stored.content_type == "video/mp4"  # guessed from the name, not the server's octet-stream
    head = s3.client.head_object(Bucket=s3.bucket, Key="videos/a.mp4")
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3"), "uploaded in parts, never held whole"
    assert sha256_of(stored.uri, s3.storage_options) == sha256(payload)
    assert _uploads(s3) == [] and s3.fs.ls(s3.path("videos"), refresh=True) == [s3.path("videos/a.mp4")]


def test_s3_object_appears_only_when_complete_and_checked(s3: S3Bucket) -> None:
    payload = mp4ish(12 * 2**20)
    s3.put("videos/b.mp4", b"old")
    checked: list[int] = []
    with ScriptedServer(ServerScript(payload=payload, pause_at=10 * 2**20)) as server:
        worker = threading.Thread(
            target=store_video,
            args=(f"{server.url}/v", s3.url("videos/b.mp4")),
            kwargs={
                "storage_options": s3.storage_options,
                "verify": lambda path: checked.append(os.path.getsize(path)),
            },
        )
        worker.start()
        assert server.script.paused.wait(10)
        time.sleep(0.05)
        # The body is spooled locally until it is whole and checked: nothing is uploaded yet.
        assert _uploads(s3) == []
        assert s3.client.get_object(Bucket=s3.bucket, Key="videos/b.mp4")["Body"].read() == b"old"
        server.script.resume.set()
        worker.join(20)
    assert checked == [len(payload)]
    body = s3.client.get_object(Bucket=s3.bucket, Key="videos/b.mp4")["Body"].read()
    assert sha256(body) == sha256(payload) and _uploads(s3) == []


def test_s3_failed_download_aborts_the_upload(s3: S3Bucket) -> None:
    payload = mp4ish(18 * 2**20)
    script = ServerScript(payload=payload, always_truncate=True, truncate_fraction=0.9)
    with ScriptedServer(script) as server, pytest.raises(DownloadError):
        store_video(
            f"{server.url}/v",
            s3.url("videos/c.mp4"),
            storage_options=s3.storage_options,
            retry=RetryPolicy(max_attempts=2, backoff_initial=0),
        )
    assert not s3.fs.exists(s3.path("videos/c.mp4"))
    assert _uploads(s3) == [], "no incomplete multipart upload is left behind"


def test_s3_truncation_retried_into_one_object(s3: S3Bucket) -> None:
    payload = mp4ish(10 * 2**20)
    with ScriptedServer(ServerScript(payload=payload, truncate_times=1, truncate_fraction=0.7)) as server:
        stored = store_video(
            f"{server.url}/v", s3.url("videos/d.mp4"), storage_options=s3.storage_options, retry=NO_WAIT
        )
    assert stored.attempts == 2 and stored.sha256 == sha256(payload)
    assert s3.fs.cat_file(s3.path("videos/d.mp4")) == payload
    assert _uploads(s3) == []


def test_unwritable_destination_is_a_download_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_bytes(b"")
    with _serve() as server, pytest.raises(DownloadError, match="cannot write the video"):
        store_video(f"{server.url}/v.mp4", str(blocker / "v.mp4"))


def test_emulator_video_with_injected_truncation(emulator: Emulator, tmp_path: Path, s3: S3Bucket) -> None:
    result = _submit_and_wait(
        emulator, "data:image/png;base64," + __import__("base64").b64encode(png_bytes(96, 96)).decode()
    )
    assert result["status"] == "succeeded", result
    url = result["output"]["video"]
    clean = httpx.get(url).content

    emulator.add_fault(FaultRule(kind="truncate_video", endpoint="files", times=1))
    stored = store_video(url, str(tmp_path / "emu.mp4"), retry=NO_WAIT)
    assert stored.attempts == 2 and stored.sha256 == sha256(clean)
    probe = probe_video(stored.uri)
    assert probe.decodable and probe.codec == "h264" and probe.frames > 0

    emulator.add_fault(FaultRule(kind="truncate_video", endpoint="files", times=1))
    on_s3 = store_video(url, s3.url("emu/emu.mp4"), storage_options=s3.storage_options, retry=NO_WAIT)
    assert on_s3.attempts == 2 and on_s3.sha256 == sha256(clean)
    assert sha256_of(on_s3.uri, s3.storage_options) == sha256(clean)

    emulator.add_fault(FaultRule(kind="truncate_video", endpoint="files", times=5))
    with pytest.raises(DownloadError):
        store_video(url, str(tmp_path / "never.mp4"), retry=RetryPolicy(max_attempts=2, backoff_initial=0))
    assert not (tmp_path / "never.mp4").exists() and _leftovers(tmp_path) == []


def test_write_bytes_atomic_local_and_s3(tmp_path: Path, s3: S3Bucket) -> None:
    data = mp4_bytes()
    assert write_bytes_atomic(str(tmp_path / "x.bin"), data) == str(tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == data
    uri = write_bytes_atomic(
        s3.url("p/x.jpg"), b"jpeg", storage_options=s3.storage_options, content_type="image/jpeg"
    )
    assert s3.client.head_object(Bucket=s3.bucket, Key="p/x.jpg")["ContentType"] == "image/jpeg"
    assert uri == s3.url("p/x.jpg")


def test_unfixable_urls_fail_at_once(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"only http\(s\) URLs.*check the video URL") as info:
        store_video(
            "ftp://example.com/v.mp4?sig=secret",
            str(tmp_path / "v.mp4"),
            retry=RetryPolicy(max_attempts=5, backoff_initial=0),
        )
    assert "secret" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_error_body_served_as_the_video_is_never_published(
    tmp_path: Path, s3: S3Bucket, where: str
) -> None:
    """A 2xx whose body is a JSON error (the service's quirk) is refused by its Content-Type or its bytes."""
    error = b'{"error_code": 500001, "error_message": "Internal error reported with HTTP 200"}'
    dest = str(tmp_path / "v.mp4") if where == "local" else s3.url("videos/v.mp4")
    options = {} if where == "local" else s3.storage_options
    for content_type in ("application/json", "application/octet-stream"):
        with (
            ScriptedServer(ServerScript(payload=error, content_type=content_type)) as server,
            pytest.raises(NotAVideoError, match="not a video|not an MP4"),
        ):
            store_video(f"{server.url}/v.mp4", dest, storage_options=options, retry=NO_WAIT)
    if where == "local":
        assert not Path(dest).exists() and _leftovers(tmp_path) == []
    else:
        assert not s3.fs.exists(s3.path("videos/v.mp4")) and _uploads(s3) == []


def test_a_body_that_fails_verification_is_never_published(tmp_path: Path) -> None:
    dest = tmp_path / "v.mp4"
    dest.write_bytes(b"previous good video")

    def verify(path: str) -> None:
        raise VideoProbeError(f"{path}: its frames do not decode")

    with _serve() as server, pytest.raises(NotAVideoError, match="not a playable video"):
        store_video(f"{server.url}/v.mp4", str(dest), verify=verify)
    assert dest.read_bytes() == b"previous good video" and _leftovers(tmp_path) == []


def test_stale_part_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    import multiprocessing

    dest = tmp_path / "clip.mp4"
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    stale = tmp_path / f".clip.mp4.{dead.pid}.abc.part"
    live = tmp_path / f".clip.mp4.{os.getpid()}.def.part"
    other = tmp_path / f".other.mp4.{dead.pid}.abc.part"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_parts(str(dest)) == 1
    assert not stale.exists() and live.exists() and other.exists()
