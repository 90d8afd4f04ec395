"""The Dagster UI on a real deployment, read by headless Chromium: what a user sees of our metadata.

One deployment (PostgreSQL, dagster-daemon, dagster-webserver, the emulator) turns five images into
videos, one of which the emulator fails with ``SAFETY.INPUT.IMAGE``. Then a browser opens the pages a
user would, and every page must show its expected text (and no error page, error boundary, GraphQL
error toast or redirect):

- a video partition: the materialization's metadata (request id, cost, poster), the poster itself;
- the Checks tab, a check's Partitions view: a result per partition;
- the failed partition: the failed run, and the failure's code and next step where they can be reached;
- the images asset: its partitions materialized, and the lineage graph's fill.

Screenshots go to the test's tmp dir; with ``UI_SCREENSHOTS_DIR=docs`` the three documented ones
(``ui-video-partition.png``, ``ui-check-partitions.png``, ``ui-failed-partition.png``) are written there
too, which is how ``docs/`` is refreshed.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from dagster_runway.pipeline.checks import CHECK_NAMES
from tests.browser import Browser
from tests.pipeline_helpers import write_images

VIDEOS = "runway/videos"
IMAGES = "runway/images"
IMAGE_COUNT = 5
FAILURE_CODE = "SAFETY.INPUT.IMAGE"
FAULT = {"kind": "generation_failed", "endpoint": "any", "times": 1, "failure_code": FAILURE_CODE}
CHECK = "video_playable"
DOCUMENTED = {"ui-video-partition.png", "ui-check-partitions.png", "ui-failed-partition.png"}


def settled(statuses: dict[str, list[str]]) -> bool:
    """The end state the fault makes: one partition failed, every other one materialized.

    Not "everything materialized or failed": a collect run that ends while a video still renders
    fails its partition for a moment (class ``still_running``) and the status sensor collects it again."""
    failed = set(statuses["failed"])
    return (
        len(failed) == 1
        and len(set(statuses["materialized"]) - failed) == IMAGE_COUNT - 1
        and not statuses["materializing"]
    )


@pytest.mark.deployment
def test_dagster_ui_shows_video_metadata_check_results_and_the_failure(deploy, tmp_path: Path) -> None:
    started = time.monotonic()
    write_images(tmp_path / "images", valid=IMAGE_COUNT, invalid=False)
    deployment = deploy(
        source=tmp_path / "images",
        output=tmp_path / "videos",
        time_scale=0.01,
        env={
            "RUNWAY_MISSING_PROMPT": "service_default",
            "RUNWAY_OPTIONS": json.dumps({"status_interval_s": 5, "discovery_interval_s": 5}),
        },
    )
    deployment.emulator_admin("POST", "faults", json=FAULT)  # the first generation fails
    gql = deployment.graphql
    gql.set_nux_seen()  # no "Join the Dagster community" modal over the pages
    gql.start_sensor("runway_discovery_sensor")
    gql.start_sensor("runway_status_sensor")
    deployment.wait_until(
        lambda: gql.partition_statuses(VIDEOS),
        settled,
        timeout=300,
        interval=1.0,
        what="one video failed, the rest done",
    )
    gql.wait_for_runs_finished(timeout=120, on_poll=deployment.assert_alive)
    statuses = gql.partition_statuses(VIDEOS)
    pipeline_s = time.monotonic() - started

    assert len(statuses["failed"]) == 1, statuses
    failed = statuses["failed"][0]
    ok = sorted(set(statuses["materialized"]) - {failed})
    assert len(ok) == IMAGE_COUNT - 1, statuses
    shown = ok[0]
    materialization = gql.latest_materialization(VIDEOS, shown)
    assert materialization is not None
    request_id = materialization["metadata"]["runway/request_id"]
    cost = materialization["metadata"]["runway/cost_usd"]
    check_statuses = gql.check_partition_statuses(VIDEOS, CHECK)
    assert check_statuses["succeeded"] == ok, check_statuses
    assert gql.partition_statuses(IMAGES)["materialized"] == sorted([*ok, failed])

    base = deployment.webserver_url
    videos_url = f"{base}/assets/runway/videos"
    shots = tmp_path / "screenshots"
    publish = Path(os.environ["UI_SCREENSHOTS_DIR"]) if os.environ.get("UI_SCREENSHOTS_DIR") else None
    console: list[str] = []

    def screenshot(browser: Browser, name: str, crop: tuple[int, int, int, int] | None = None) -> None:
        browser.screenshot(shots / name, crop=crop)
        if publish is not None and name in DOCUMENTED:
            browser.screenshot(publish / name, crop=crop, colors=128)

    def partition_url(key: str, **more: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in more.items())
        return f"{videos_url}?view=partitions&partition={quote(key)}{extra}"

    with Browser.from_env(log_dir=deployment.root / "logs") as browser:
        # (a) A video partition: its materialization's metadata, as a table of rows in emit order.
        browser.resize(1440, 1650)  # tall enough to show the rows down to the request id
        text = browser.open(
            partition_url(shown),
            [
                shown,
                "Materialized",
                "runway/request_id",
                request_id,
                "runway/cost_usd",
                "runway/poster_preview",
            ],
        )
        assert re.search(rf"runway/cost_usd\s+{re.escape(str(cost))}\s", text), text
        screenshot(browser, "ui-video-partition.png", crop=(240, 100, 1440, 1440))
        # The poster renders inline in the table (its markdown is kept under the UI's ~1,000 characters).
        posters = "return Array.from(document.querySelectorAll('img')).filter(i => i.src.startsWith('data:image')).length"
        assert browser.execute(posters) == 1, "the poster thumbnail is not shown inline"
        console += browser.console_errors()
        browser.resize(1440, 900)
        # The materialization's description is not on the partition page; the Events tab shows it.
        text = browser.open(
            f"{videos_url}?view=events&partition={quote(shown)}",
            ["Description", request_id, "runway/request_id"],
        )
        assert f"Partition {shown} materialized" in text, text

        # (b) The checks: every check listed; the Partitions view of one counts a result per partition.
        browser.open(f"{videos_url}?view=checks&checkDetail={CHECK}", [*CHECK_NAMES, "Partitions"])
        browser.click("//button[@role='tab' and normalize-space(text())='Partitions']")
        # The failed partition's checks failed, each saying why (no video), rather than "Execution Failed".
        assert check_statuses["failed"] == [failed] and not check_statuses["execution_failed"], check_statuses
        counts = [f"Passed ({len(ok)})", "Failed (1)"]
        browser.wait_for_text(counts)
        browser.click_text(shown)
        browser.wait_for_text(["Latest execution", "Target materialization", "Passed", "Metadata"])
        screenshot(browser, "ui-check-partitions.png", crop=(240, 0, 1440, 760))
        # The failed partition's result, under the label the UI gives its GraphQL status.
        browser.click_text(failed)
        browser.wait_for_text([failed, "Failed", "No video to check", FAILURE_CODE])
        screenshot(browser, "check-failed-partition.png")
        console += browser.console_errors()

        # (c) The failed partition: a failed-run banner; no metadata of ours on the page itself.
        text = browser.open(
            partition_url(failed),
            [failed, "failed, and did not materialize this asset", "View logs", "View all historical events"],
        )
        screenshot(browser, "ui-failed-partition.png", crop=(240, 0, 1440, 560))
        # One click: "View logs" shows the run's logs, ending with the run failure that names the cause.
        browser.click_text("View logs")
        browser.wait_for_text(["RUN_FAILURE", failed, FAILURE_CODE, "Next step"])
        screenshot(browser, "failed-partition-logs.png")
        # Two clicks: "View all historical events", then the observation's row: our failure metadata.
        browser.open(
            partition_url(failed, showAllEvents="true"), [f"Historical events for {failed}", "Observation"]
        )
        browser.click_text("Observation")
        browser.wait_for_text([FAILURE_CODE, "runway/failure_class", "runway/next_step", "runway/state"])
        screenshot(browser, "failed-partition-events-dialog.png")
        # The Events tab, opened on the partition, shows the observation's description and metadata.
        browser.open(
            f"{videos_url}?view=events&partition={quote(failed)}",
            [
                f"Partition {failed} observed",
                "Description",
                FAILURE_CODE,
                "runway/failure_class",
                "runway/next_step",
            ],
        )
        screenshot(browser, "failed-partition-events-tab.png")
        console += browser.console_errors()

        # (d) The images: every partition materialized (runless materializations), and the graph's fill.
        browser.open(
            f"{base}/assets/runway/images?view=partitions",
            [f"Materialized ({IMAGE_COUNT})", "Missing (0)", "Failed (0)"],
        )
        screenshot(browser, "images-partitions.png")

        # Each node of the graph loads its partition counts on its own: wait for all three.
        def images_requests_videos_filled(text: str) -> bool:
            fills = sorted(int(pct) for pct in re.findall(r"(\d+)% filled", text))
            return fills == sorted([100, 100, 100 * len(ok) // IMAGE_COUNT])

        browser.open(
            f"{base}/assets/runway/images?view=lineage",
            ["images", "requests", "videos", f"{100 * len(ok) // IMAGE_COUNT}% filled (1 failed)"],
            until=images_requests_videos_filled,
        )
        screenshot(browser, "lineage.png")
        console += browser.console_errors()
        visited = list(browser.visited)

    graphql_errors = [message for message in console if "graphql" in message.lower()]
    assert not graphql_errors, graphql_errors
    total_s = time.monotonic() - started
    print(
        f"pipeline {pipeline_s:.1f}s, whole test {total_s:.1f}s; pages: "
        + ", ".join(f"{url.removeprefix(base)} {seconds:.1f}s" for url, seconds in visited)
    )
    if console:
        print("console errors:", *console, sep="\n  ")
