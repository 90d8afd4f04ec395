"""The review page (``<output>/gallery.html``): what it says per partition, and that it plays in Chromium."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test
from PIL import Image

from dagster_runway.pipeline import RunwayPipelineConfig
from dagster_runway.pipeline.gallery import GALLERY_NAME, cards, render, write_gallery
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import make_defs, run_until_idle, video_metadata, write_images


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def reviewed(tmp_path: Path, emulator, instance: DagsterInstance) -> Path:
    """Three videos (one of them then stale), one image rejected, and the page the collect step wrote."""
    images = write_images(tmp_path / "images", valid=3, invalid=False)
    (tmp_path / "images" / "too-wide.png").write_bytes(images["img00.png"].read_bytes())
    Image.new("RGB", (600, 200), (9, 9, 9)).save(tmp_path / "images" / "too-wide.png")
    images["img01.png"].with_suffix(".txt").write_text('a <script>alert("x")</script> & a calm sea')
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    run_until_idle(daemon)
    page = tmp_path / "videos" / GALLERY_NAME
    written = page.read_text()  # by the collect step
    assert written.count('data-state="ok"') == 3 and written.count('data-state="failed"') == 1
    Image.new("RGB", (320, 180), (250, 10, 10)).save(images["img02.png"])  # changed after its video
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == []  # mark_stale: nothing to run, so the page is refreshed on demand
    pipeline = RunwayPipelineConfig(source=str(tmp_path / "images"), output=str(tmp_path / "videos"))
    assert write_gallery(pipeline, instance) == str(page)
    return page


def test_the_page_has_a_card_per_partition_with_its_lineage_state_and_reason(
    reviewed: Path, tmp_path: Path, instance: DagsterInstance
) -> None:
    pipeline = RunwayPipelineConfig(source=str(tmp_path / "images"), output=str(tmp_path / "videos"))
    found = {card.key: card for card in cards(pipeline, instance)}
    assert {k: c.state for k, c in found.items()} == {
        "img00.png": "ok", "img01.png": "ok", "img02.png": "stale", "too-wide.png": "failed",
    }  # fmt: skip
    meta = video_metadata(instance, "img00.png")
    card = found["img00.png"]
    assert card.details["request"] == meta["runway/request_id"] and card.details["cost"] == "0.25 USD"
    assert card.details["seed"] == meta["runway/seed"] and card.video == "img00.png.mp4"
    assert set(card.checks.values()) == {"SUCCEEDED"} and len(card.checks) == 5
    assert (reviewed.parent / card.source).resolve() == (tmp_path / "images" / "img00.png").resolve()
    assert "aspect ratio 3.00" in found["too-wide.png"].reason and "Next step" in found["too-wide.png"].reason

    text = reviewed.read_text()
    assert 'a &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a calm sea' in text  # escaped, not run
    assert "<script>alert" not in text
    assert 'data-state="stale"' in text and "Stale (1)" in text and "Failed (1)" in text
    assert meta["runway/gallery"] == str(reviewed)  # linked from each video's materialization


def test_an_empty_pipeline_renders_a_page_that_says_so() -> None:
    assert "no partitions yet" in render([], title="runway: nothing")


def test_the_page_plays_every_video_in_chromium_with_no_console_error(reviewed: Path, tmp_path: Path) -> None:
    from tests.browser import Browser

    with Browser.from_env(log_dir=tmp_path / "browser") as browser:
        browser.open(reviewed.as_uri(), ["img00.png", "img02.png", "too-wide.png", "Stale (1)"])
        ready = "return Array.from(document.querySelectorAll('video')).map(v => v.readyState)"
        deadline = time.monotonic() + 30
        while not all(state >= 1 for state in browser.execute(ready)):  # HAVE_METADATA: loadedmetadata fired
            assert time.monotonic() < deadline, browser.execute(ready)
            time.sleep(0.2)
        assert len(browser.execute(ready)) == 3
        sizes = browser.execute("return Array.from(document.querySelectorAll('video')).map(v => [v.videoWidth, v.duration])")
        assert all(width > 0 and duration > 4 for width, duration in sizes), sizes
        images = "return Array.from(document.querySelectorAll('img.source')).map(i => i.naturalWidth)"
        assert all(width > 0 for width in browser.execute(images))  # the source images load too
        browser.click("//button[@data-show='failed']")
        visible = "return Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden).map(c => c.dataset.partition)"
        assert browser.execute(visible) == ["too-wide.png"]
        browser.click("//button[@data-show='all']")
        shot = tmp_path / "gallery.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 10_000
        if os.environ.get("UI_SCREENSHOTS_DIR"):
            browser.screenshot(Path(os.environ["UI_SCREENSHOTS_DIR"]) / "gallery.png", colors=128)
        assert browser.console_errors() == []
