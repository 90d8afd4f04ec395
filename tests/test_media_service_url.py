"""URLs the service can fetch: presigned S3 URLs (fetched by the emulator), data URIs, public base URLs,
and redaction of the presigned query string everywhere it could show."""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import fsspec
import httpx
import pytest

from dagster_runway._redact import REDACTED
from dagster_runway.emulator import Emulator
from dagster_runway.media import (
    DownloadError,
    ImageValidationError,
    MediaError,
    ServiceUrlError,
    data_uri_length,
    service_image_url,
    store_video,
)
from dagster_runway.retry import RetryPolicy
from tests.fixtures.s3 import S3Bucket
from tests.test_media_support import jpeg_bytes, png_bytes

LOCAL = fsspec.filesystem("file")
SUBMIT = "/v1/models/runwayml/runway-gen-4/turbo/image-to-video"


def _submit_and_wait(emulator: Emulator, image_url: str) -> dict:
    headers = {"Authorization": f"Bearer {emulator.token}"}
    with httpx.Client(base_url=emulator.base_url, headers=headers, timeout=30) as client:
        submitted = client.post(SUBMIT, json={"promptImage": image_url, "ratio": "960:960"})
        assert submitted.status_code == 200, submitted.text
        request_id = submitted.json()["request_id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = client.get(f"/v1/requests/{request_id}/result").json()
            if result["status"] in ("succeeded", "failed", "cancelled"):
                return result
            time.sleep(0.02)
    raise AssertionError("the emulator did not finish the request")


def test_presigned_url_is_fetchable_and_typed(s3: S3Bucket) -> None:
    # Uploaded without a content type: the presigned URL still makes S3 answer image/png.
    s3.put("in/cat.png", png_bytes(96, 64))
    url = service_image_url(s3.fs, s3.path("in/cat.png"), presign_expires_s=900)
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1"  # moto on loopback
    assert parts.path == f"/{s3.bucket}/in/cat.png"
    query = parse_qs(parts.query)
    assert query["response-content-type"] == ["image/png"]
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == png_bytes(96, 64)
    assert response.headers["content-type"] == "image/png"
    assert httpx.get(url.split("?")[0]).status_code == 403, "the object itself is private"


def test_presign_expiry_is_configurable_and_bounded(s3: S3Bucket) -> None:
    s3.put("in/a.jpg", jpeg_bytes(64, 64))
    short = parse_qs(urlsplit(service_image_url(s3.fs, s3.path("in/a.jpg"), presign_expires_s=60)).query)
    long = parse_qs(urlsplit(service_image_url(s3.fs, s3.path("in/a.jpg"), presign_expires_s=86400)).query)
    if "Expires" in short:  # SigV2-style query (moto's default signer)
        assert abs(int(long["Expires"][0]) - int(short["Expires"][0]) - (86400 - 60)) <= 5
    else:  # SigV4
        assert (short["X-Amz-Expires"], long["X-Amz-Expires"]) == (["60"], ["86400"])
    with pytest.raises(ServiceUrlError, match="outside 1..604800"):
        service_image_url(s3.fs, s3.path("in/a.jpg"), presign_expires_s=8 * 86400)


def test_presigned_url_is_fetched_by_the_emulator(s3: S3Bucket, emulator: Emulator, tmp_path: Path) -> None:
    s3.put("in/dog.png", png_bytes(128, 128, (200, 30, 30)))
    url = service_image_url(s3.fs, s3.path("in/dog.png"))
    result = _submit_and_wait(emulator, url)
    assert result["status"] == "succeeded", result
    # The whole round trip: the rendered video lands back in the bucket.
    stored = store_video(result["output"]["video"], s3.url("out/dog.mp4"), storage_options=s3.storage_options)
    assert stored.size > 0 and s3.fs.size(s3.path("out/dog.mp4")) == stored.size


def test_local_small_file_becomes_a_data_uri(tmp_path: Path, emulator: Emulator) -> None:
    data = png_bytes(80, 60)
    path = tmp_path / "small.png"
    path.write_bytes(data)
    uri = service_image_url(LOCAL, str(path))
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == data
    assert len(uri) == data_uri_length(len(data), "image/png")
    # The type comes from the bytes, not the name.
    misnamed = tmp_path / "really-a-jpeg.png"
    misnamed.write_bytes(jpeg_bytes(64, 64))
    assert service_image_url(LOCAL, str(misnamed)).startswith("data:image/jpeg;base64,")
    assert _submit_and_wait(emulator, uri)["status"] == "succeeded"


def test_data_uri_limit_counts_the_encoded_length(tmp_path: Path) -> None:
    path = tmp_path / "mid.jpg"
    path.write_bytes(jpeg_bytes(64, 64) + b"\0" * 3000)
    size = path.stat().st_size
    encoded = data_uri_length(size, "image/jpeg")
    assert service_image_url(LOCAL, str(path), data_uri_max_bytes=encoded).startswith("data:image/jpeg")
    with pytest.raises(ServiceUrlError) as info:
        service_image_url(LOCAL, str(path), data_uri_max_bytes=encoded - 1)
    message = str(info.value)
    assert str(path) in message
    assert "public_base_url" in message and "s3://" in message  # says how to fix it


def test_large_local_file_needs_a_public_base_url(tmp_path: Path) -> None:
    path = tmp_path / "sub dir" / "big photo.png"
    path.parent.mkdir()
    path.write_bytes(png_bytes(32, 32) + b"\0" * (4 * 2**20))
    with pytest.raises(ServiceUrlError, match="over the service's 5.0 MB limit for data URIs"):
        service_image_url(LOCAL, str(path))
    url = service_image_url(
        LOCAL, str(path), public_base_url="https://cdn.example.com/images/", relpath="sub dir/big photo.png"
    )
    assert url == "https://cdn.example.com/images/sub%20dir/big%20photo.png"
    with pytest.raises(ServiceUrlError, match="not HTTPS"):
        service_image_url(LOCAL, str(path), public_base_url="http://cdn.example.com", relpath="x.png")
    with pytest.raises(ServiceUrlError, match="relpath"):
        service_image_url(LOCAL, str(path), public_base_url="https://cdn.example.com")


def test_non_image_local_file_is_not_inlined(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ServiceUrlError, match="not a PNG, JPEG or WebP"):
        service_image_url(LOCAL, str(path))


def test_http_filesystem_urls_pass_through() -> None:
    fs = fsspec.filesystem("https")
    assert service_image_url(fs, "https://example.com/a.png") == "https://example.com/a.png"
    with pytest.raises(ServiceUrlError, match="not HTTPS"):
        service_image_url(fsspec.filesystem("http"), "http://example.com/a.png")


def test_presigned_query_never_shows_in_errors_or_logs(
    s3: S3Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dagster_runway")
    s3.put("in/secret.png", png_bytes(64, 64))
    url = service_image_url(s3.fs, s3.path("in/secret.png"))
    signature = parse_qs(urlsplit(url).query)["Signature" if "Signature" in url else "X-Amz-Signature"][0]

    # A download that fails permanently: the error names the URL without its credential.
    with pytest.raises(DownloadError) as info:
        store_video(
            url.replace("secret.png", "missing.png"),
            str(tmp_path / "v.mp4"),
            retry=RetryPolicy(max_attempts=1),
        )
    text = str(info.value)
    assert "missing.png" in text and REDACTED in text
    assert signature not in text and "Signature=" + signature not in text

    # Any media error built from text that contains the URL is redacted too.
    assert signature not in str(MediaError(f"failed to fetch {url}"))
    assert signature not in str(ImageValidationError(url, f"rule broken at {url}", "fix"))
    assert all(signature not in record.getMessage() for record in caplog.records)
    debug_lines = [r.getMessage() for r in caplog.records if "presigned" in r.getMessage()]
    assert debug_lines and all(REDACTED in line for line in debug_lines)


def test_presigned_url_on_a_plain_http_endpoint_is_refused_without_leaking() -> None:
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url="http://minio.lan:9000",
        key="AKIDEXAMPLE",
        secret="wJalrXUtnFEMI",
        skip_instance_cache=True,
    )
    with pytest.raises(ServiceUrlError) as info:
        service_image_url(fs, "bucket/a.png")  # presigning is local: no request is made
    message = str(info.value)
    assert "not HTTPS" in message and "s3://bucket/a.png" in message
    assert "Signature=" not in message or f"Signature={REDACTED}" in message
    query = urlsplit(message.split(" the presigned URL ", 1)[1].split(" ", 1)[0]).query
    assert query and all(value == REDACTED for values in parse_qs(query).values() for value in values)


def test_overlong_urls_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(8, 8))
    with pytest.raises(ServiceUrlError, match="over the service's limit of 2048"):
        service_image_url(
            LOCAL, str(path), public_base_url="https://cdn.example.com", relpath="d/" * 1100 + "a.png"
        )
