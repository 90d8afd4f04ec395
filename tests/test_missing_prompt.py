"""The missing_prompt policy, at the pipeline level: nothing is paid for a prompt nobody chose, unless asked.

The service's default prompt is a specific scene (schema.DEFAULT_PROMPT_TEXT). Each policy is run through
the deferred pipeline against the emulator; the emulator's record of each request's input is the proof of
what was sent, and the lineage must say the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from dagster_runway.media import GenerationSettings
from dagster_runway.pipeline import records as rec
from dagster_runway.schema import DEFAULT_PROMPT_TEXT
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    REQUESTS,
    latest_failure,
    make_defs,
    run_until_idle,
    video_metadata,
    write_images,
)


@pytest.fixture
def instance():
    with instance_for_test() as instance:
        yield instance


def _settle(defs, instance: DagsterInstance) -> list[str]:
    daemon = LocalDaemon(defs, instance)
    daemon.tick("runway_discovery_sensor")
    return run_until_idle(daemon)


def _sent(emulator, instance: DagsterInstance, key: str) -> tuple[dict, rec.RequestRecord]:
    """The input the service generated from (its defaults applied) for the partition's request, and the
    request's lineage record (whose ``fields`` are what was sent)."""
    record = rec.latest_request(instance, REQUESTS, key)
    assert record is not None, key
    return emulator.request_input(record.request_id), record


def test_fail_pays_nothing_for_an_image_without_a_prompt_and_names_the_three_places(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    images = write_images(tmp_path / "images", valid=3, invalid=False)
    prompted = sorted(images)[0]
    images[prompted].with_suffix(".txt").write_text("a slow pan across the hills")
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), missing_prompt="fail")

    failed_runs = _settle(defs, instance)
    assert len(failed_runs) == 1  # the submit run fails for the two without a prompt, after the third
    assert emulator.ledger().billed_submissions == 1
    for key in sorted(images)[1:]:
        failure = latest_failure(instance, key)
        assert failure.failure_class == "missing_prompt", failure
        assert str(images[key]) in failure.reason and "nothing was submitted" in failure.reason
        stem = str(images[key]).rsplit(".", 1)[0]
        for place in (f"{stem}.txt", "manifest row (promptText)", "GenerationSettings(prompt_text=...)"):
            assert place in failure.next_step, (place, failure.next_step)
        assert video_metadata(instance, key) is None
    sent, record = _sent(emulator, instance, prompted)
    assert sent["promptText"] == record.metadata["prompt_text"] == "a slow pan across the hills"
    assert record.metadata["prompt_source"].startswith("sidecar ")
    assert "prompt_warning" not in record.metadata


def test_warn_submits_with_the_default_and_says_so_on_the_partition_and_in_the_run_log(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(emulator, str(tmp_path / "images"), str(tmp_path / "videos"), missing_prompt="warn")

    assert _settle(defs, instance) == []
    assert emulator.ledger().billed_submissions == 2
    warnings = [
        entry.user_message
        for entry in instance.all_logs(instance.get_runs()[-1].run_id)
        if entry.level >= 30 and "no prompt is given" in entry.user_message
    ]
    for key in instance.get_dynamic_partitions("runway_images"):
        sent, record = _sent(emulator, instance, key)
        assert "promptText" not in record.fields  # no prompt was sent...
        assert sent["promptText"] == DEFAULT_PROMPT_TEXT  # ...so the service applied its default...
        assert record.metadata["prompt_text"] == DEFAULT_PROMPT_TEXT  # ...and the lineage records that text
        assert record.metadata["prompt_source"] == "service default"
        assert (
            key in record.metadata["prompt_warning"]
            and "default prompt applies" in record.metadata["prompt_warning"]
        )
        video = video_metadata(instance, key)
        assert video["runway/prompt_warning"] == record.metadata["prompt_warning"]
        assert video["runway/prompt_text"] == DEFAULT_PROMPT_TEXT
        assert any(key in message for message in warnings), warnings


def test_service_default_is_accepted_quietly_and_recorded_as_such(tmp_path: Path, emulator, instance) -> None:
    write_images(tmp_path / "images", valid=2, invalid=False)
    defs = make_defs(
        emulator, str(tmp_path / "images"), str(tmp_path / "videos"), missing_prompt="service_default"
    )

    assert _settle(defs, instance) == []
    assert emulator.ledger().billed_submissions == 2
    for key in instance.get_dynamic_partitions("runway_images"):
        sent, record = _sent(emulator, instance, key)
        assert "promptText" not in record.fields
        assert sent["promptText"] == record.metadata["prompt_text"] == DEFAULT_PROMPT_TEXT
        assert record.metadata["prompt_source"] == "service default"
        assert "prompt_warning" not in record.metadata


def test_a_default_prompt_in_the_pipeline_settings_is_sent_and_satisfies_fail(
    tmp_path: Path, emulator, instance
) -> None:
    write_images(tmp_path / "images", valid=2, invalid=False)
    defaults = GenerationSettings(ratio="auto", prompt_text="gentle camera push-in, soft light")
    defs = make_defs(
        emulator, str(tmp_path / "images"), str(tmp_path / "videos"), missing_prompt="fail", defaults=defaults
    )

    assert _settle(defs, instance) == []
    assert emulator.ledger().billed_submissions == 2
    for key in instance.get_dynamic_partitions("runway_images"):
        sent, record = _sent(emulator, instance, key)
        assert sent["promptText"] == record.metadata["prompt_text"] == "gentle camera push-in, soft light"
        assert record.metadata["prompt_source"] == "defaults"
        assert int(sent["seed"]) == int(record.metadata["seed"])  # the seed derived from the image, recorded
    seeds = {
        rec.latest_request(instance, REQUESTS, k).metadata["seed"]
        for k in instance.get_dynamic_partitions("runway_images")
    }
    assert len(seeds) == 2  # one per image, not the service's single default seed


def test_the_missing_prompt_policy_rejects_an_unknown_value(tmp_path: Path, emulator) -> None:
    with pytest.raises(ValueError, match="missing_prompt"):
        make_defs(emulator, str(tmp_path), str(tmp_path / "videos"), missing_prompt="maybe")
