"""A submit run prices its claims at the catalog's price, falls back to estimated_usd_per_second when the
catalog cannot be read, and stops before paying on a breaking change of the live input schema; and it
refuses an output bound to another image source. The emulator's ledger is the judge of money."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from dagster_runway.emulator import FaultRule
from dagster_runway.journal import Journal
from dagster_runway.pipeline import records as rec
from dagster_runway.schema import INPUT_SCHEMA
from dagster_runway.testing import LocalDaemon
from tests.pipeline_helpers import (
    PARTITIONS,
    REQUESTS,
    latest_failure,
    make_defs,
    png_bytes,
    run_until_idle,
    video_metadata,
    write_images,
)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _settle(daemon: LocalDaemon) -> list[str]:
    daemon.tick("runway_discovery_sensor")
    return run_until_idle(daemon)


def _requests(instance: DagsterInstance) -> dict[str, rec.RequestRecord]:
    keys = instance.get_dynamic_partitions(PARTITIONS)
    return rec.latest_requests(instance, REQUESTS, keys)


def test_the_catalog_price_prices_the_cap_and_the_estimate(
    tmp_path: Path, emulator_factory, instance
) -> None:
    emulator = emulator_factory(price_usd=0.08)  # 0.40 USD a 5 s video; the configured estimate says 0.25
    write_images(tmp_path / "images", valid=4, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_spend_usd=0.9)
    assert len(_settle(LocalDaemon(defs, instance))) == 1  # the submit run fails on the two past the cap
    # At 0.25 USD a claim three would fit under 0.90 USD and the third would overspend; at 0.40 two do.
    assert emulator.ledger().billed_submissions == 2
    requests = _requests(instance)
    assert sorted(
        (r.metadata["estimated_cost_usd"], r.metadata["price_source"]) for r in requests.values()
    ) == [
        (0.4, "catalog"),
        (0.4, "catalog"),
    ]
    for key in requests:
        assert video_metadata(instance, key)["runway/price_source"] == "result"
        assert video_metadata(instance, key)["runway/cost_usd"] == 0.4
    capped = [k for k in instance.get_dynamic_partitions(PARTITIONS) if k not in requests]
    assert len(capped) == 2 and latest_failure(instance, capped[0]).failure_class == "spend_cap"


def test_a_price_change_between_two_runs_is_followed_by_the_cap_and_the_estimate(
    tmp_path: Path, emulator_factory, instance
) -> None:
    emulator = emulator_factory(price_usd=0.08)
    write_images(tmp_path / "images", valid=2, invalid=False)
    daemon = LocalDaemon(
        make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), max_spend_usd=1.0), instance
    )
    assert _settle(daemon) == [] and emulator.ledger().total_cost_usd == 0.8
    first = set(_requests(instance))

    emulator.config.price_usd = 0.02  # the service lowers its price: 0.10 USD a video
    for i in range(2):
        (tmp_path / "images" / f"late{i:02d}.png").write_bytes(png_bytes(320, 200, (9, 9, i)))
    assert _settle(daemon) == []
    # At the old price neither would fit in the 0.20 USD left; at the new one both do, and say so.
    later = {k: r for k, r in _requests(instance).items() if k not in first}
    assert len(later) == 2 and emulator.ledger().billed_submissions == 4
    assert {(r.metadata["estimated_cost_usd"], r.metadata["price_source"]) for r in later.values()} == {
        (0.1, "catalog")
    }
    assert round(emulator.ledger().total_cost_usd, 6) == 1.0


def test_an_unreadable_catalog_prices_with_the_configured_estimate(
    tmp_path: Path, emulator_factory, instance, caplog
) -> None:
    emulator = emulator_factory(price_usd=0.08)
    emulator.add_fault(FaultRule(kind="server_error", endpoint="models"))
    write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(
        emulator, str(tmp_path / "images"), str(tmp_path / "videos"), estimated_usd_per_second=0.06
    )
    assert _settle(LocalDaemon(defs, instance)) == []
    assert emulator.ledger().billed_submissions == 2  # a price is not worth a lost video
    assert {
        (r.metadata["estimated_cost_usd"], r.metadata["price_source"]) for r in _requests(instance).values()
    } == {(0.3, "estimate")}
    assert (
        "the catalog could not be read" in caplog.text
        and "pricing with estimated_usd_per_second" in caplog.text
    )


def _rename(live: dict) -> None:
    live["properties"]["prompt_text"] = live["properties"].pop("promptText")


@pytest.mark.parametrize(
    ("edit", "change"),
    [
        (
            lambda s: (s["properties"].update(motion={"type": "string"}), s["required"].append("motion")),
            "motion.required",
        ),
        (lambda s: s["properties"]["seed"].update(maximum=2**31 - 1), "seed.maximum"),
        (_rename, "promptText.removed"),
    ],
    ids=["new-required-field", "changed-bound", "renamed-field"],
)
def test_each_kind_of_breaking_change_fails_before_paying(
    tmp_path: Path, emulator_factory, instance, edit, change
) -> None:
    live = copy.deepcopy(INPUT_SCHEMA)
    edit(live)
    emulator = emulator_factory(input_schema=live)
    write_images(tmp_path / "images", valid=2, invalid=False)
    assert (
        len(
            _settle(
                LocalDaemon(make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos")), instance)
            )
        )
        == 1
    )
    assert emulator.ledger().submissions == 0
    for key in instance.get_dynamic_partitions(PARTITIONS):
        failure = latest_failure(instance, key)
        assert failure.failure_class == "schema_drift" and change in failure.reason


def test_a_breaking_schema_change_stops_the_run_before_paying_until_it_is_accepted(
    tmp_path: Path, emulator_factory, instance
) -> None:
    live = copy.deepcopy(INPUT_SCHEMA)
    live["properties"]["duration"]["enum"] = [5]  # 10 s videos gone: breaking, though these inputs are 5 s
    emulator = emulator_factory(input_schema=live)
    write_images(tmp_path / "images", valid=3, invalid=False)
    images, videos = str(tmp_path / "images"), str(tmp_path / "videos")
    assert (
        len(_settle(LocalDaemon(make_defs(emulator, images, videos), instance))) == 1
    )  # the submit run fails
    assert emulator.ledger().submissions == 0
    keys = instance.get_dynamic_partitions(PARTITIONS)
    for key in keys:
        failure = latest_failure(instance, key)
        assert failure.failure_class == "schema_drift" and "duration.enum" in failure.reason
        assert "Nothing was sent" in failure.reason
        assert "accept_schema_changes=['duration.enum']" in failure.next_step

    accepted = make_defs(emulator, images, videos, accept_schema_changes=["duration.enum"])
    assert _settle(LocalDaemon(accepted, instance)) == []
    assert emulator.ledger().billed_submissions == 3
    assert all(video_metadata(instance, k) for k in keys)


def test_a_harmless_schema_change_is_sent(tmp_path: Path, emulator_factory, instance) -> None:
    live = copy.deepcopy(INPUT_SCHEMA)
    live["properties"]["ratio"]["description"] = "The frame's shape."
    emulator = emulator_factory(input_schema=live)
    write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"))
    assert _settle(LocalDaemon(defs, instance)) == []
    assert emulator.ledger().billed_submissions == 2


def test_an_output_of_another_source_is_refused_before_paying(tmp_path: Path, emulator, instance) -> None:
    write_images(tmp_path / "images", valid=2, invalid=False)
    videos = tmp_path / "videos"
    journal = Journal(str(videos / ".runway"))
    journal.bind_output(str(videos), str(tmp_path / "other-images"))
    images = str(tmp_path / "images")
    assert (
        len(_settle(LocalDaemon(make_defs(emulator, images, str(videos)), instance))) == 1
    )  # the submit run fails
    assert emulator.ledger().submissions == 0
    for key in instance.get_dynamic_partitions(PARTITIONS):
        failure = latest_failure(instance, key)
        assert failure.failure_class == "output_mismatch" and "other-images" in failure.reason
        assert "Nothing was sent" in failure.reason and "adopt_output=True" in failure.next_step

    adopted = make_defs(emulator, images, str(videos), adopt_output=True)
    assert _settle(LocalDaemon(adopted, instance)) == []
    assert emulator.ledger().billed_submissions == 2
    assert journal.bind_output(str(videos), images) is None  # bound to this source now


@pytest.mark.parametrize(
    ("price", "unit", "why"),
    [
        (
            0.0,
            "second",
            "the catalog's price 0.0 is not a positive number",
        ),  # would reserve nothing under the cap
        (None, "second", "the catalog gives no price"),
        (0.1, "minute", "the catalog's price_unit 'minute' is not 'second' or 'output'"),
    ],
)
def test_a_price_the_cap_cannot_use_falls_back_to_the_estimate(price, unit, why) -> None:
    from dagster_runway.client import ModelInfo
    from dagster_runway.pipeline import catalog

    info = ModelInfo(model_id="m", base_price_usd=price, price_unit=unit, input_schema=INPUT_SCHEMA)
    seen = catalog.view("m", info, 0.05).price
    assert (seen.source, seen.estimate_usd(5), seen.why_estimate) == ("estimate", 0.25, why)
    assert (
        catalog.view(
            "m", ModelInfo(model_id="m", base_price_usd=0.2, price_unit="output"), 0.05
        ).price.estimate_usd(10)
        == 0.2
    )
