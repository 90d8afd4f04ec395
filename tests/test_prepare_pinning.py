"""Pay for the bytes you hashed: what the service gets is exactly what prepare() hashed and validated.

A local image replaced between prepare() and the URL build is still sent as the bytes hashed; on a
versioned bucket (moto's S3 server) the presigned URL names the version read; on an unversioned one,
the change is detected at collect by source_matches().
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dagster_runway.media import ImageValidationError, MediaError, service_image_url, source_matches
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.prepare import prepare
from tests.fixtures.s3 import S3Bucket

MODEL = "runwayml/runway-gen-4/turbo/image-to-video"


def _png(color: tuple[int, int, int], size: tuple[int, int] = (320, 180)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _pipeline(source: str, output: str, **options) -> RunwayPipelineConfig:
    return RunwayPipelineConfig(source=source, output=output, missing_prompt="service_default", **options)


def _prepared(pipeline: RunwayPipelineConfig, relpath: str):
    source = pipeline.image_source()
    entry = next(e for e in source.list() if e.relpath == relpath)
    return source, prepare(pipeline, source, entry.partition_key, entry)


def _decoded(uri: str) -> bytes:
    assert uri.startswith("data:image/png;base64,")
    return base64.b64decode(uri.split(",", 1)[1])


def test_a_local_image_replaced_after_prepare_is_sent_as_the_bytes_hashed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    old, new = _png((200, 30, 30)), _png((30, 30, 200))
    (images / "cat.png").write_bytes(old)
    source, prepared = _prepared(_pipeline(str(images), str(tmp_path / "out")), "cat.png")
    assert prepared.sha256 == hashlib.sha256(old).hexdigest()

    (images / "cat.png.tmp").write_bytes(new)  # replaced as editors and sync tools do: a rename over it
    os.replace(images / "cat.png.tmp", images / "cat.png")
    url = service_image_url(source.fs, prepared.entry.path, pin=prepared.pin)
    assert _decoded(url) == old
    assert hashlib.sha256(_decoded(url)).hexdigest() == prepared.sha256
    assert (
        source_matches(source.fs, prepared.entry.path, prepared.pin) is None
    )  # inline: always the bytes hashed
    # The lineage names the bytes that were sent, in the listing's change-token format.
    meta = md.read_metadata(prepared.metadata())
    assert meta["source_sha256"] == prepared.sha256 and meta["source_size_bytes"] == len(old)
    assert meta["source_change_token"] == prepared.entry.change_token


def test_a_local_image_too_large_for_a_data_uri_keeps_no_copy_and_says_how_to_fix_it(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    noise = Image.frombytes("RGB", (1800, 1000), os.urandom(1800 * 1000 * 3))
    out = io.BytesIO()
    noise.save(out, format="PNG")
    (images / "big.png").write_bytes(out.getvalue())
    source, prepared = _prepared(_pipeline(str(images), str(tmp_path / "out")), "big.png")
    assert prepared.pin.data_uri is None and prepared.pin.size == len(out.getvalue())
    with pytest.raises(MediaError, match="data URI, over the service's 5.0 MB limit"):
        service_image_url(source.fs, prepared.entry.path, pin=prepared.pin)


def test_an_image_that_grows_past_the_limit_after_listing_is_refused_without_reading_it_all(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.png").write_bytes(_png((1, 2, 3)))
    pipeline = _pipeline(str(images), str(tmp_path / "out"))
    source = pipeline.image_source()
    (entry,) = source.list()
    with open(images / "cat.png", "ab") as handle:
        handle.truncate(17 * 2**20)
    with pytest.raises(
        ImageValidationError,
        match=r"image is 17825792 bytes, more than the limit of 16777216 bytes for one image; compress it",
    ):
        prepare(pipeline, source, entry.partition_key, entry)


def _s3_pipeline(s3: S3Bucket, tmp_path: Path) -> RunwayPipelineConfig:
    return _pipeline(s3.url("in"), str(tmp_path / "out"), source_storage_options=s3.storage_options)


def test_a_versioned_bucket_pins_the_presigned_url_to_the_version_hashed(
    s3: S3Bucket, tmp_path: Path
) -> None:
    s3.client.put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    old, new = _png((10, 200, 10)), _png((200, 10, 200))
    s3.put("in/cat.png", old)
    source, prepared = _prepared(_s3_pipeline(s3, tmp_path), "cat.png")
    head = s3.client.head_object(Bucket=s3.bucket, Key="in/cat.png")
    assert prepared.pin.version_id == head["VersionId"] and prepared.pin.etag == head["ETag"]

    s3.put("in/cat.png", new)  # overwritten before the service fetches it
    url = service_image_url(source.fs, prepared.entry.path, presign_expires_s=600, pin=prepared.pin)
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.content == old
    assert hashlib.sha256(fetched.content).hexdigest() == prepared.sha256
    assert fetched.headers["content-type"] == "image/png"
    assert source_matches(source.fs, prepared.entry.path, prepared.pin) is None
    token = prepared.pin.change_token
    assert source_matches(source.fs, prepared.entry.path, token, version_id=prepared.pin.version_id) is None
    # Without the pin, the same call fetches the new bytes: what the pin prevents.
    assert httpx.get(service_image_url(source.fs, prepared.entry.path, presign_expires_s=600)).content == new


def test_an_unversioned_bucket_records_the_etag_hashed_and_the_change_is_detected(
    s3: S3Bucket, tmp_path: Path
) -> None:
    old, new = _png((10, 20, 30)), _png((30, 20, 10))
    s3.put("in/cat.png", old)
    source, prepared = _prepared(_s3_pipeline(s3, tmp_path), "cat.png")
    etag = s3.client.head_object(Bucket=s3.bucket, Key="in/cat.png")["ETag"]
    assert prepared.pin.version_id is None and prepared.pin.etag == etag
    meta = md.read_metadata(prepared.metadata())
    assert meta["source_change_token"] == prepared.entry.change_token == f"etag:{etag}|size:{len(old)}"
    assert source_matches(source.fs, prepared.entry.path, prepared.pin) is None

    s3.put("in/cat.png", new)
    reason = source_matches(source.fs, prepared.entry.path, prepared.pin)
    assert reason is not None
    assert "in/cat.png changed after it was hashed" in reason and etag in reason and prepared.sha256 in reason
    assert "regenerate the partition" in reason and "versioning" in reason
    # At collect, from what the lineage recorded: the same verdict.
    recorded = source_matches(
        source.fs, prepared.entry.path, meta["source_change_token"], sha256=meta["source_sha256"]
    )
    assert recorded == reason

    s3.client.delete_object(Bucket=s3.bucket, Key="in/cat.png")
    assert "deleted now" in (source_matches(source.fs, prepared.entry.path, prepared.pin) or "")


def test_s3_bytes_are_read_once_and_validated_as_read(s3: S3Bucket, tmp_path: Path) -> None:
    good = _png((5, 5, 5))
    s3.put("in/cat.png", good)
    pipeline = _s3_pipeline(s3, tmp_path)
    source = pipeline.image_source()
    (entry,) = source.list()
    prepared = prepare(pipeline, source, entry.partition_key, entry)
    assert prepared.sha256 == hashlib.sha256(good).hexdigest()
    assert prepared.pin.data_uri is None  # a bucket image is fetched by URL, never inlined
    # Replaced by a truncated upload after the listing: the bytes read are the ones checked, so it is refused.
    s3.put("in/cat.png", good[: len(good) // 2])
    with pytest.raises(ImageValidationError, match="truncated|corrupt"):
        prepare(pipeline, source, entry.partition_key, entry)
