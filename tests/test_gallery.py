"""The review page (``<output>/gallery.html`` and its index ``<output>/gallery/``): what each row says,
that a write of a few partitions gives the same bytes as a rebuild, and what Chromium draws from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test
from PIL import Image

from dagster_runway.pipeline import RunwayPipelineConfig
from dagster_runway.pipeline.gallery import (
    GALLERY_NAME,
    INDEX_FOLDER,
    GalleryIndex,
    cards,
    shard_of,
    write_gallery,
)
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import PARTITIONS, make_defs, run_until_idle, video_metadata, write_images

XSS = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> & a calm sea'


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def _pipeline(tmp_path: Path) -> RunwayPipelineConfig:
    return RunwayPipelineConfig(source=str(tmp_path / "images"), output=str(tmp_path / "videos"))


@pytest.fixture
def reviewed(tmp_path: Path, emulator, instance: DagsterInstance) -> Path:
    """Four videos (then one of them stale and one with its image deleted), a rejected image and a file
    that is no image; the page as the collect step wrote it."""
    images = write_images(tmp_path / "images", valid=4, invalid=True)
    images["img01.png"].with_suffix(".txt").write_text(XSS)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    run_until_idle(daemon)
    rows = GalleryIndex(str(tmp_path / "videos")).rows()  # written by the collect step
    assert sorted(row["s"] for row in rows.values()) == ["failed", "failed", "ok", "ok", "ok", "ok"]
    Image.new("RGB", (320, 180), (250, 10, 10)).save(images["img02.png"])  # changed after its video
    images["img03.png"].unlink()  # deleted after its video
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []  # mark_stale: nothing to run, so the page is refreshed on demand
    return tmp_path / "videos" / GALLERY_NAME


def test_each_row_says_the_partitions_state_lineage_and_reason(
    reviewed: Path, tmp_path: Path, instance: DagsterInstance
) -> None:
    pipeline = _pipeline(tmp_path)
    assert write_gallery(pipeline, instance, run_spend_usd=0.25) == str(reviewed)
    found = {card.key: card for card in cards(pipeline, instance)}
    rows = GalleryIndex(pipeline.output).rows()
    assert {key: row["s"] for key, row in rows.items()} == {
        "img00.png": "ok", "img01.png": "ok", "img02.png": "stale", "img03.png": "source missing",
        "too-wide.png": "failed", "not-an-image.png": "failed",
    }  # fmt: skip
    assert {key: card.state for key, card in found.items()} == {key: row["s"] for key, row in rows.items()}
    meta = video_metadata(instance, "img00.png")
    row = rows["img00.png"]
    assert row["q"] == meta["runway/request_id"] and row["c"] == 0.25 and row["sd"] == meta["runway/seed"]
    assert row["v"] == 1 and row["po"] == 1 and row["ck"] == "SSSSS"
    assert (reviewed.parent / row["href"]).resolve() == (tmp_path / "images" / "img00.png").resolve()
    assert row["src"] == str(tmp_path / "images" / "img00.png")
    assert rows["img01.png"]["p"] == XSS  # kept as data; the page sets it as text
    assert "href" not in rows["img03.png"] and rows["img03.png"]["v"] == 1  # no <img> of a file that is gone
    assert "aspect ratio 3.00" in rows["too-wide.png"]["w"] and "Next step" in rows["too-wide.png"]["w"]
    assert "ck" not in rows["too-wide.png"] and "v" not in rows["too-wide.png"]

    manifest = GalleryIndex(pipeline.output).manifest()
    assert manifest is not None and manifest["run_usd"] == 0.25 and manifest["total_usd"] == 1.0
    assert set(manifest["shards"]) == {shard_of(key) for key in rows}
    assert (
        XSS not in reviewed.read_text() and "window.pwned" not in reviewed.read_text()
    )  # the page is static
    assert meta["runway/gallery"] == str(reviewed)  # linked from each video's materialization


def test_a_write_of_some_partitions_gives_the_bytes_of_a_rebuild(
    reviewed: Path, tmp_path: Path, instance: DagsterInstance
) -> None:
    """The page was written by the collect run before img02 changed and img03 went; a write of just
    those two (and of a partition that was then deleted) reads and rewrites only their shards."""
    pipeline = _pipeline(tmp_path)
    folder = reviewed.parent / INDEX_FOLDER
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert GalleryIndex(pipeline.output).rows()["img02.png"]["s"] == "ok"  # not yet rewritten
    instance.delete_dynamic_partition(PARTITIONS, "too-wide.png")
    changed = ["img02.png", "img03.png", "too-wide.png"]
    write_gallery(pipeline, instance, partitions=changed)
    incremental = {path.name: path.read_bytes() for path in folder.iterdir()}
    touched = {f"rows-{shard_of(key)}.js" for key in changed} | {"index.js"}
    after = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert {name for name in before if name in after and after[name] != before[name]} <= touched
    assert {name for name in before if name in after and after[name] == before[name]}  # others untouched
    rows = GalleryIndex(pipeline.output).rows()
    assert rows["img02.png"]["s"] == "stale" and rows["img03.png"]["s"] == "source missing"
    assert "too-wide.png" not in rows

    write_gallery(pipeline, instance)  # the rebuild
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == incremental
    write_gallery(pipeline, instance, partitions=["not-a-partition"])  # nothing to change
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == incremental


def test_an_index_that_is_gone_or_damaged_is_rebuilt(
    reviewed: Path, tmp_path: Path, instance: DagsterInstance
) -> None:
    pipeline = _pipeline(tmp_path)
    write_gallery(pipeline, instance)
    folder = reviewed.parent / INDEX_FOLDER
    full = {path.name: path.read_bytes() for path in folder.iterdir()}
    (folder / "index.js").write_text("not the index")
    write_gallery(pipeline, instance, partitions=["img00.png"])
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == full


def test_an_empty_pipeline_writes_an_empty_index(tmp_path: Path, instance: DagsterInstance) -> None:
    (tmp_path / "images").mkdir()
    pipeline = _pipeline(tmp_path)
    assert write_gallery(pipeline, instance) == str(tmp_path / "videos" / GALLERY_NAME)
    manifest = GalleryIndex(pipeline.output).manifest()
    assert manifest is not None and manifest["shards"] == {} and manifest["total_usd"] == 0.0
    assert manifest["run_usd"] is None and GalleryIndex(pipeline.output).rows() == {}


def test_a_file_name_that_is_not_utf8_does_not_stop_the_page(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=1, invalid=False)
    odd = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not valid UTF-8
    (tmp_path / "images" / odd).hardlink_to(tmp_path / "images" / "img00.png")
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    run_until_idle(daemon)
    pipeline = _pipeline(tmp_path)
    write_gallery(pipeline, instance)
    rows = GalleryIndex(pipeline.output).rows()
    assert len(rows) == 2 and rows["img00.png"]["s"] == "ok"
    (odd_row,) = [row for key, row in rows.items() if key != "img00.png"]
    assert odd_row["s"] == "failed" and "caf\\xe9 \\xff.png" in odd_row["src"] and "rename" in odd_row["w"]
    assert odd_row["href"] == "../images/caf%E9%20%FF.png"  # the link carries the file's own bytes
    assert emulator.ledger().submissions == 1  # the odd name paid for nothing


@pytest.mark.browser
def test_chromium_draws_failures_first_and_plays_a_video_with_no_console_error(
    reviewed: Path, tmp_path: Path, instance: DagsterInstance
) -> None:
    from tests.browser import Browser

    write_gallery(_pipeline(tmp_path), instance, run_spend_usd=0.25)
    with Browser.from_env(log_dir=tmp_path / "browser") as browser:
        browser.open(
            reviewed.as_uri(),
            [
                "6 partitions: 2 failed, 1 source missing, 1 stale, 2 ok",
                "Spent 1.00 USD in all; 0.25 USD in this run.",
            ],
        )
        order = "return Array.from(document.querySelectorAll('.card')).map(c => c.dataset.partition)"
        assert browser.execute(order) == [
            "not-an-image.png", "too-wide.png", "img03.png", "img02.png", "img00.png", "img01.png",
        ]  # fmt: skip
        card = "return document.querySelector(`.card[data-partition='${arguments[0]}']`).innerText"
        browser.wait_for_text(
            [], until=lambda _: "not viewable as an image" in browser.execute(card, "not-an-image.png")
        )
        assert "source missing" in browser.execute(card, "img03.png")
        assert "checks: from before the change" in browser.execute(card, "img02.png")
        assert "checks: from before the change" not in browser.execute(card, "img00.png")
        assert XSS in browser.execute(card, "img01.png") and browser.execute("return window.pwned") is None
        sources = "return Array.from(document.querySelectorAll('img.source')).map(i => [i.complete, i.naturalWidth])"
        browser.wait_for_text([], until=lambda _: all(done for done, _ in browser.execute(sources)))
        assert [width > 0 for _, width in browser.execute(sources)] == [
            True
        ] * 4  # img00, 01, 02 and too-wide

        assert browser.execute("return document.querySelectorAll('video').length") == 0  # nothing fetched yet
        browser.click("//section[@data-partition='img00.png']//button[contains(@class, 'poster-button')]")
        played = "const v = document.querySelector('video'); return v ? [v.readyState, v.videoWidth, v.duration] : null"
        browser.wait_for_text([], until=lambda _: (browser.execute(played) or [0])[0] >= 1)  # loadedmetadata
        _, width, duration = browser.execute(played)
        assert width > 0 and duration > 4

        browser.click("//button[@data-show='failed']")
        assert browser.execute(order) == ["not-an-image.png", "too-wide.png"]
        browser.click("//button[@data-show='all']")
        shot = tmp_path / "gallery.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 10_000
        if os.environ.get("UI_SCREENSHOTS_DIR"):
            browser.screenshot(Path(os.environ["UI_SCREENSHOTS_DIR"]) / "gallery.png", colors=128)
        assert browser.console_errors() == []


def test_the_index_works_on_s3_as_on_disk(s3) -> None:
    """On moto's S3 server: a rebuild, then a write of two rows (one changed, one dropped), read back."""
    from dagster_runway.pipeline.gallery import Card

    output = f"s3://{s3.bucket}/videos"
    index = GalleryIndex(output, s3.storage_options)
    header = {"title": "runway: s3", "total_usd": 0.5, "run_usd": None}
    index.write_all([Card("a.png", "ok").row(), Card("b.png", "pending").row()], header)
    index.update([Card("a.png", "stale").row()], ["a.png", "b.png"], header)
    fresh = GalleryIndex(output, s3.storage_options)
    assert {key: row["s"] for key, row in fresh.rows().items()} == {"a.png": "stale"}
    names = {p.rsplit("/", 1)[-1] for p in s3.fs.find(f"{s3.bucket}/videos")}
    assert names == {GALLERY_NAME, "index.js", f"rows-{shard_of('a.png')}.js"}  # b's emptied shard is gone
    head = s3.client.head_object(Bucket=s3.bucket, Key=f"videos/{GALLERY_NAME}")
    assert head["ContentType"].startswith("text/html")
