"""A deleted source image marks its partition: when the discovery pass that no longer sees it ends, its
video is checked again and source_unchanged fails with "deleted"; nothing is paid for it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetCheckKey, DagsterInstance, instance_for_test
from dagster._core.event_api import PartitionKeyFilter

from dagster_runway.testing import LocalDaemon
from tests.pipeline_helpers import VIDEOS, check_statuses, make_defs, run_until_idle, write_images


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def test_a_deleted_image_fails_its_source_check_when_the_pass_ends(
    tmp_path: Path, emulator, instance
) -> None:
    write_images(tmp_path / "images", valid=3, invalid=False)
    daemon = LocalDaemon(make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos")), instance)
    daemon.tick("runway_discovery_sensor")
    assert run_until_idle(daemon) == [] and emulator.ledger().billed_submissions == 3
    assert check_statuses(instance, "img01.png")["source_unchanged"] == "SUCCEEDED"

    (tmp_path / "images" / "img01.png").unlink()
    tick = daemon.tick("runway_discovery_sensor")  # one tick is a whole pass over three images
    assert json.loads(tick.cursor or "{}")["pass_done"] is True
    assert len(tick.run_ids) == 1  # the verify run of the one partition whose image is gone
    assert check_statuses(instance, "img01.png")["source_unchanged"] == "FAILED"
    (latest,) = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(VIDEOS, "source_unchanged")], partition_filter=PartitionKeyFilter(key="img01.png")
    ).values()
    evaluation = latest.event.dagster_event.asset_check_evaluation_data
    assert (
        evaluation.metadata["why"].value == "deleted: the source image is gone; the video shows what it was"
    )
    assert evaluation.metadata["change_token_now"].value == "(image missing)"
    assert {k: check_statuses(instance, k)["source_unchanged"] for k in ("img00.png", "img02.png")} == {
        "img00.png": "SUCCEEDED",
        "img02.png": "SUCCEEDED",
    }
    assert daemon.tick("runway_discovery_sensor").run_ids == []  # the next pass knows it is gone already
    assert run_until_idle(daemon) == [] and emulator.ledger().billed_submissions == 3  # nothing paid for it
