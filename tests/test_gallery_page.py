"""The review page in headless Chromium over indexes written from made-up cards: paging, the order of the
first screen, plurals, text that looks like markup, and long paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagster_runway.pipeline.gallery import GALLERY_NAME, Card, GalleryIndex

MARKUP = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
LONG_PATH = "/data/" + "/".join(f"a_rather_long_folder_name_{i}" for i in range(8)) + "/photo-of-the-sea.png"
HEADER = {"title": "runway: made-up cards " + MARKUP, "total_usd": 12.5, "run_usd": None}
pytestmark = pytest.mark.browser

ORDER = "return Array.from(document.querySelectorAll('.card')).map(c => c.dataset.partition)"


def _ok(key: str) -> Card:
    checks = dict.fromkeys(("video_playable", "duration_matches_request", "aspect_matches_ratio",
                            "checksum_at_rest", "source_unchanged"), "SUCCEEDED")  # fmt: skip
    return Card(
        key,
        "ok",
        video=True,
        source=f"/data/{key}",
        details={"prompt": "a calm sea"},
        cost_usd=0.25,
        checks=checks,
    )


@pytest.fixture
def browser(tmp_path: Path):
    from tests.browser import Browser

    with Browser.from_env(log_dir=tmp_path / "browser") as browser:
        yield browser
        assert browser.console_errors() == []


def test_the_first_screen_shows_the_failed_and_stale_cards_first_and_pages_through_the_rest(
    tmp_path: Path, browser
) -> None:
    found = [_ok(f"a{i:03d}.png") for i in range(130)]
    found.append(
        Card(
            "zz-failed.png",
            "failed",
            source=LONG_PATH,
            reason=f"{LONG_PATH}: not an image. Next step: fix it",
        )
    )
    found.append(Card("m-stale.png", "stale", video=True, checks={"source_unchanged": "FAILED"}))
    GalleryIndex(str(tmp_path)).write_all((card.row() for card in found), HEADER)
    browser.open(
        (tmp_path / GALLERY_NAME).as_uri(), ["132 partitions: 1 failed, 1 stale, 130 ok", "Page 1 of 3"]
    )
    assert "Spent 12.50 USD in all." in browser.text()  # no run spend given: none shown
    shown = browser.execute(ORDER)
    assert shown[:3] == ["zz-failed.png", "m-stale.png", "a000.png"] and len(shown) == 48
    browser.click("//button[@data-page='next']")
    browser.wait_for_text(["Page 2 of 3 (49–96 of 132 cards)"])
    assert browser.execute(ORDER)[0] == "a046.png"
    browser.click("//button[@data-page='next']")
    browser.wait_for_text(["Page 3 of 3 (97–132 of 132 cards)"])
    assert len(browser.execute(ORDER)) == 36
    assert browser.execute("return document.getElementById('next').disabled") is True
    browser.click("//button[@data-page='prev']")
    browser.wait_for_text(["Page 2 of 3"])

    browser.click("//button[@data-show='stale']")
    browser.wait_for_text(["Page 1 of 1 (1–1 of 1 card)"])
    assert browser.execute(ORDER) == ["m-stale.png"] and "checks: from before the change" in browser.text()
    browser.click("//button[@data-show='all']")
    browser.execute(
        "const s = document.getElementById('search'); s.value = 'A12'; s.dispatchEvent(new Event('input'))"
    )
    browser.wait_for_text(["Page 1 of 1 (1–10 of 10 cards)"])
    assert browser.execute(ORDER) == [f"a12{i}.png" for i in range(10)]

    # A long path wraps at its separators: no text between two of them is split over two lines.
    browser.execute(
        "const s = document.getElementById('search'); s.value = 'zz'; s.dispatchEvent(new Event('input'))"
    )
    browser.wait_for_text(["1 card)"])
    pieces = """
      const card = document.querySelector('.card');
      const texts = [...card.querySelectorAll('td, .reason')].flatMap(e => [...e.childNodes]).filter(n => n.nodeType === 3);
      return texts.map(n => { const r = document.createRange(); r.selectNodeContents(n);
        return [n.textContent, new Set([...r.getClientRects()].map(x => Math.round(x.top))).size]; });
    """
    found_pieces = browser.execute(pieces)
    assert "".join(text for text, _ in found_pieces).count(LONG_PATH) == 2  # the source and the reason
    assert [text for text, lines in found_pieces if lines > 1 and len(text) < 30] == []
    assert browser.execute(
        "return document.querySelector('.card').scrollWidth <= document.querySelector('.card').clientWidth"
    )
    # A failed card whose image is not shown has a placeholder, never a broken image.
    assert browser.execute("return document.querySelectorAll('.card img').length") == 0
    assert "no preview" in browser.text()


def test_one_partition_is_one_partition_and_markup_in_the_data_is_text(tmp_path: Path, browser) -> None:
    card = Card(
        "cat.png",
        "failed",
        source=f"/data/{MARKUP}.png",
        source_href=f"{MARKUP}.png",
        details={"prompt": MARKUP},
        reason=f"{MARKUP} Next step: rename it",
    )
    GalleryIndex(str(tmp_path)).write_all([card.row()], {**HEADER, "run_usd": 0.0})
    text = browser.open(
        (tmp_path / GALLERY_NAME).as_uri(), ["1 partition: 1 failed", "Page 1 of 1 (1–1 of 1 card)"]
    )
    assert "Spent 12.50 USD in all; 0.00 USD in this run." in text
    assert text.count(MARKUP) >= 3 and browser.execute("return window.pwned") is None
    assert browser.execute("return document.title") == HEADER["title"]
    # The image that is not there becomes a placeholder once it fails to load.
    browser.wait_for_text(["not viewable as an image"])
    browser.console_errors()  # the missing file's load error is expected here


def test_an_empty_index_says_so(tmp_path: Path, browser) -> None:
    GalleryIndex(str(tmp_path)).write_all([], HEADER)
    browser.open((tmp_path / GALLERY_NAME).as_uri(), ["No partitions yet.", "Page 1 of 1 (no cards)"])
