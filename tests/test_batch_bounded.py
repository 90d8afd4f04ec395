"""A submit run and a collect run read their own partitions' images, never a listing of the source.

Each image is found from its recorded path (discovery's ``runway/images`` record) with a few metadata
requests: ``media.lookup`` gives the same entry as ``ImageSource.list()`` (change token, sidecars,
settings token, problem), on local disk and on moto's S3 server. The runs are real (an instance, the
emulator over loopback) and every listing call on the source is counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
from aiobotocore.client import AioBaseClient
from dagster import DagsterInstance, instance_for_test
from fsspec.implementations.local import LocalFileSystem

from dagster_runway import _compat
from dagster_runway.media import ImageSource, SettingsError
from dagster_runway.media.lookup import change_tokens, lookup
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline.sensors import op_config
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import PARTITIONS, latest_failure, make_defs, png_bytes, video_metadata

HASHED = "my cats/Café 1.png"  # a name that is not a safe key: its key is hashed ("~" in it)
MANIFEST = "path,promptText\nimg01.png,a row of the manifest\nIMG02.png,a row that differs only in case\n"


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


@dataclass
class Listings:
    """Listing calls (``find``, ``ls``, ``walk``, ``glob``, ``os.scandir``, ...) on paths under ``root``."""

    root: str
    calls: list[tuple[str, str]] = field(default_factory=list)

    def seen(self, name: str, path: Any) -> None:
        text = str(path[0] if isinstance(path, list | tuple) and path else path)
        text = text.split("://", 1)[-1].rstrip("/")
        if text == self.root or text.startswith(self.root + "/"):
            self.calls.append((name, text))


@contextmanager
def counting(monkeypatch: pytest.MonkeyPatch, root: str) -> Iterator[Listings]:
    """Count every listing of ``root``: through fsspec (local and s3fs), ``os``, or any S3 request."""
    listings = Listings(root.split("://", 1)[-1].rstrip("/"))

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)
        if name.startswith("_"):  # s3fs: the coroutines its sync methods are made from, per instance

            async def counted_async(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
                listings.seen(name, path)
                return await original(self, path, *args, **kwargs)

            monkeypatch.setattr(owner, name, counted_async)
        else:

            def counted(*args: Any, **kwargs: Any) -> Any:
                path = (
                    args[1]
                    if owner is not os and len(args) > 1
                    else (args[0] if args else kwargs.get("path", "."))
                )
                listings.seen(name, path)
                return original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)

    for name in ("ls", "find", "walk", "glob"):
        wrap(LocalFileSystem, name)
    for name in ("_ls", "_find", "_walk", "_glob", "_lsdir"):
        wrap(s3fs.S3FileSystem, name)
    make_api_call = AioBaseClient._make_api_call

    async def api_call(self: Any, operation: str, params: dict[str, Any]) -> Any:
        # Every S3 request, a paginator's too. MaxKeys=1 is s3fs's check that a missing name is no folder.
        if operation in ("ListObjects", "ListObjectsV2") and params.get("MaxKeys") != 1:
            listings.seen(operation, f"{params.get('Bucket')}/{params.get('Prefix', '')}")
        return await make_api_call(self, operation, params)

    monkeypatch.setattr(AioBaseClient, "_make_api_call", api_call)
    for name in ("scandir", "listdir", "walk"):
        wrap(os, name)
    yield listings


# -- the same entry as the listing -----------------------------------------------------------------


def _local_source(folder: Path) -> dict[str, bytes]:
    """Images with a sidecar, a hashed key, manifest rows (one refused: it differs in case), a link to an
    image inside the source, a link out of it, a linked folder, a poster beside its video, a hidden file."""
    files = _files()
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / "linked.png").symlink_to(folder / "real" / "target.png")
    outside = folder.parent / "outside.png"
    outside.write_bytes(png_bytes(64, 64))
    (folder / "escape.png").symlink_to(outside)
    (folder / "folder-link").symlink_to(folder / "real", target_is_directory=True)
    return files


def _files() -> dict[str, bytes]:
    return {
        "cat.png": png_bytes(64, 48),
        "cat.txt": b"a cat, from its sidecar",
        "cat.png.json": b'{"ratio": "auto"}',
        HASHED: png_bytes(48, 64),
        "img01.png": png_bytes(64, 64),
        "img02.png": png_bytes(64, 64, (1, 2, 3)),
        "real/target.png": png_bytes(60, 40),
        "clip.mp4": b"not an image",
        "clip.poster.jpg": png_bytes(32, 32, fmt="JPEG"),
        ".hidden.png": png_bytes(32, 32),
        "manifest.csv": MANIFEST.encode(),
    }


def _looked_up_like_listed(make_source: Any, also: list[str], images: set[str]) -> None:
    listed = make_source()
    entries = {entry.relpath: entry for entry in listed.list()}
    looking = make_source()
    found = lookup(looking, [*entries, *also])
    assert found == entries  # the same entries: change tokens, sidecars, settings tokens, problems
    # ...and the source knows them afterwards, as after a listing.
    assert {e.partition_key: looking.entry_for_key(e.partition_key) for e in entries.values()} == {
        e.partition_key: e for e in entries.values()
    }
    assert change_tokens(make_source(), [*entries, *also]) == {
        rel: e.change_token for rel, e in entries.items()
    }
    for rel, entry in entries.items():  # and the same settings, or the same refusal, without a listing
        try:
            settings: Any = listed.settings_for(entry, image_size=(64, 48), content_sha256="0" * 64)
        except SettingsError as exc:
            settings = str(exc)
        try:
            got: Any = looking.settings_for(found[rel], image_size=(64, 48), content_sha256="0" * 64)
        except SettingsError as exc:
            got = str(exc)
        assert got == settings, rel
    assert entries.keys() == images
    assert entries["cat.png"].sidecars and entries["img01.png"].settings_token
    assert "~" in entries[HASHED].partition_key


def test_a_looked_up_image_is_the_listed_one_on_local_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "images"
    _local_source(folder)

    def source() -> ImageSource:
        return ImageSource(str(folder), manifest="manifest.csv")

    with counting(monkeypatch, str(folder)) as listings:
        looking = source()
        found = lookup(
            looking, ["escape.png", "linked.png", "folder-link/target.png", "clip.poster.jpg", ".hidden.png"]
        )
    assert listings.calls == []
    assert set(found) == {
        "escape.png",
        "linked.png",
    }  # not an image: a linked folder's, a poster, a hidden file
    assert "outside the source root" in found["escape.png"].problem and not found["linked.png"].problem
    _looked_up_like_listed(
        source,
        ["gone.png", "folder-link/target.png", "clip.poster.jpg", ".hidden.png"],
        {"cat.png", HASHED, "img01.png", "img02.png", "real/target.png", "linked.png", "escape.png"},
    )
    assert listings.calls  # the listings compared with were counted


def test_a_looked_up_image_is_the_listed_one_on_s3(s3, monkeypatch: pytest.MonkeyPatch):
    for rel, data in _files().items():
        s3.put(f"stills/{rel}", data)

    def source() -> ImageSource:
        return ImageSource(s3.url("stills"), storage_options=s3.storage_options, manifest="manifest.csv")

    with counting(monkeypatch, s3.path("stills")) as listings:
        found = lookup(source(), ["cat.png", HASHED, "img01.png", "gone.png"])
    assert listings.calls == [] and set(found) == {"cat.png", HASHED, "img01.png"}
    _looked_up_like_listed(
        source,
        ["gone.png", "clip.poster.jpg", ".hidden.png"],
        {"cat.png", HASHED, "img01.png", "img02.png", "real/target.png"},
    )
    assert listings.calls  # the listings compared with were counted


# -- real runs ---------------------------------------------------------------------------------------


def _run(defs: Any, instance: DagsterInstance, job: str, op: str, keys: list[str]) -> Any:
    """One run of ``job`` over ``keys`` (consecutive partitions), as the status sensor launches it."""
    tags = (
        {_compat.PARTITION_NAME_TAG: keys[0]}
        if len(keys) == 1
        else {
            _compat.ASSET_PARTITION_RANGE_START_TAG: keys[0],
            _compat.ASSET_PARTITION_RANGE_END_TAG: keys[-1],
        }
    )
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, run_config=op_config(op, keys), tags=tags, raise_on_error=False
    )


def _submit_and_collect_without_listing(
    defs: Any, instance: DagsterInstance, emulator: Any, listings: Listings, delete: Any
) -> None:
    LocalDaemon(defs, instance).tick("runway_discovery_sensor")  # discovery lists; the runs must not
    assert listings.calls  # (and its listing is seen)
    keys = instance.get_dynamic_partitions(PARTITIONS)
    hashed = next(key for key in keys if "~" in key)
    assert len(keys) == 4
    delete("img02.png")  # recorded, then deleted: its partition fails as a missing image
    never = "never~aaaaaaaaaaaa"  # a hashed partition nobody discovered
    instance.add_dynamic_partitions(PARTITIONS, [never])
    keys = instance.get_dynamic_partitions(PARTITIONS)
    listings.calls.clear()

    submitted = _run(defs, instance, "runway_submit_job", "runway_requests", keys)
    assert not submitted.success
    assert listings.calls == []
    assert emulator.ledger().billed_submissions == 2  # cat.png and the hashed one
    missing, unknown = latest_failure(instance, "img02.png"), latest_failure(instance, never)
    assert missing.failure_class == fl.IMAGE_MISSING and "moved or deleted" in missing.reason
    assert unknown.failure_class == fl.IMAGE_MISSING and "never discovered" in unknown.reason
    assert "discovery sensor" in unknown.next_step

    collected = _run(defs, instance, "runway_collect_job", "runway_videos", ["cat.png", hashed])
    assert collected.success
    assert listings.calls == []
    for key in ("cat.png", hashed):
        meta = video_metadata(instance, key)
        assert meta is not None and meta["runway/state"] == "collected"
    assert video_metadata(instance, "cat.png")["runway/prompt_text"] == "a cat, from its sidecar"
    checks = collected.get_asset_check_evaluations()
    assert len(checks) == 10 and all(check.passed for check in checks)  # source_unchanged included
    # Again: nothing billed twice, still no listing, and the videos are verified unchanged.
    assert _run(defs, instance, "runway_submit_job", "runway_requests", ["cat.png"]).success
    assert _run(defs, instance, "runway_collect_job", "runway_videos", ["cat.png", hashed]).success
    assert listings.calls == [] and emulator.ledger().billed_submissions == 2
    assert video_metadata(instance, hashed)["runway/state"] == "verified"


def _run_files() -> dict[str, bytes]:
    return {
        "cat.png": png_bytes(320, 180),
        "cat.txt": b"a cat, from its sidecar",
        HASHED: png_bytes(180, 320),
        "img02.png": png_bytes(240, 240),
        "too-wide.png": png_bytes(600, 200),
    }


def test_submit_and_collect_runs_never_list_a_local_source(
    tmp_path: Path, emulator, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
):
    folder = tmp_path / "images"
    for rel, data in _run_files().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    defs = make_defs(emulator, str(folder), str(tmp_path / "videos"))
    with counting(monkeypatch, str(folder)) as listings:
        _submit_and_collect_without_listing(
            defs, instance, emulator, listings, lambda rel: (folder / rel).unlink()
        )


def test_submit_and_collect_runs_never_list_an_s3_source(
    emulator, s3, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
):
    for rel, data in _run_files().items():
        s3.put(f"stills/{rel}", data, content_type="text/plain" if rel.endswith(".txt") else "image/png")
    defs = make_defs(
        emulator,
        s3.url("stills"),
        s3.url("videos"),
        source_storage_options=s3.storage_options,
        output_storage_options=s3.storage_options,
    )
    fs = fsspec.filesystem("s3", **s3.storage_options)
    with counting(monkeypatch, s3.path("stills")) as listings:
        _submit_and_collect_without_listing(
            defs, instance, emulator, listings, lambda rel: fs.rm(s3.path(f"stills/{rel}"))
        )
