"""A hostile input fails only its own partition, before paying: the pipeline over real files, the emulator
and a real Dagster instance (moto's S3 server for keys).

Judged by the emulator's ledger (billed == the distinct valid inputs), by the failure recorded on the bad
partition (naming the file, the rule and the fix), and by a search for the secret in everything the run
wrote: the event log, the journal, the gallery and what the service received.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test, serialize_value

from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    PARTITIONS,
    latest_failure,
    make_defs,
    run_until_idle,
    video_metadata,
    write_images,
)

SECRET = "sk-live-7f3a9c0e5d1b2468ace0"


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


def _settle(daemon: LocalDaemon) -> list[str]:
    daemon.tick("runway_discovery_sensor")
    return run_until_idle(daemon)


def _event_log_text(instance: DagsterInstance) -> str:
    return "\n".join(
        serialize_value(record) for run in instance.get_runs() for record in instance.all_logs(run.run_id)
    )


def _files_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


def test_a_deeply_nested_sidecar_fails_only_its_partition_and_the_other_is_billed(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    images = tmp_path / "images"
    write_images(images, valid=2, invalid=False)
    (images / "img00.json").write_text("[" * 30_000 + "]" * 30_000)  # RecursionError in json.loads
    (images / "img01.txt").write_text("a slow dolly-in")
    defs = make_defs(emulator, str(images), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)

    failed_runs = _settle(daemon)
    assert len(failed_runs) == 1  # the submit run fails, for img00 alone
    assert emulator.ledger().billed_submissions == 1
    assert video_metadata(instance, "img01.png")["runway/prompt_text"] == "a slow dolly-in"
    failure = latest_failure(instance, "img00.png")
    assert failure.failure_class == "invalid_input"
    assert str(images / "img00.json") in failure.reason and "nests 30000 levels deep" in failure.reason
    assert video_metadata(instance, "img00.png") is None

    # Fixed, it is submitted once; the other is not paid again.
    (images / "img00.json").write_text('{"promptText": "a crane shot"}')
    assert _settle(daemon) == []
    assert emulator.ledger().billed_submissions == 2
    assert video_metadata(instance, "img00.png")["runway/prompt_text"] == "a crane shot"


def test_a_sidecar_linked_out_of_the_source_never_sends_or_stores_its_contents(
    tmp_path: Path, emulator, instance: DagsterInstance, monkeypatch
) -> None:
    images = tmp_path / "images"
    write_images(images, valid=2, invalid=False)
    monkeypatch.setenv("RUNWAY_TEST_API_TOKEN", SECRET)  # in this process's /proc/self/environ
    os.symlink("/proc/self/environ", images / "img00.txt")
    secrets = tmp_path / "secrets.txt"
    secrets.write_text(f"token={SECRET}\n")
    os.symlink(secrets, images / "img01.png.txt")
    write_images(images / "more", valid=1, invalid=False)
    defs = make_defs(emulator, str(images), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)

    assert len(_settle(daemon)) == 1
    assert emulator.ledger().billed_submissions == 1  # more/img00.png only
    assert video_metadata(instance, "more/img00.png") is not None
    for key, link in (("img00.png", "img00.txt"), ("img01.png", "img01.png.txt")):
        failure = latest_failure(instance, key)
        assert failure.failure_class == "invalid_input" and link in failure.reason
        assert (
            "outside the source root" in failure.reason and "copy the file into the source" in failure.reason
        )
    for entry in emulator.ledger().entries:
        assert SECRET not in str(emulator.request_input(entry.request_id))
    assert SECRET not in _event_log_text(instance)
    assert SECRET not in _files_text(tmp_path / "videos")  # the journal and gallery.html


def test_odd_s3_keys_become_partitions_that_fail_before_paying(
    tmp_path: Path, emulator, s3, instance: DagsterInstance
) -> None:
    images = write_images(tmp_path / "images", valid=3, invalid=False)
    data = [path.read_bytes() for path in images.values()]
    s3.put("stills/a//b.png", data[0], content_type="image/png")
    s3.put("stills/odd/../escape.png", data[1], content_type="image/png")
    s3.put("stills/ok.png", data[2], content_type="image/png")
    defs = make_defs(
        emulator,
        s3.url("stills"),
        s3.url("videos"),
        source_storage_options=s3.storage_options,
        output_storage_options=s3.storage_options,
    )
    daemon = LocalDaemon(defs, instance)
    discovery = daemon.tick("runway_discovery_sensor")
    assert discovery.new_partitions == 3  # nothing is skipped silently
    assert len(run_until_idle(daemon)) == 1
    assert emulator.ledger().billed_submissions == 1
    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert video_metadata(instance, "ok.png") is not None
    odd = [k for k in keys if k != "ok.png"]
    assert len(odd) == 2
    for key in odd:
        failure = latest_failure(instance, key)
        assert failure.failure_class == "invalid_input" and "rename the object" in failure.reason
        assert "a//b.png" in failure.reason or "odd/../escape.png" in failure.reason


def test_odd_local_names_are_submitted_or_refused_clearly(
    tmp_path: Path, emulator, instance: DagsterInstance
) -> None:
    images = tmp_path / "images"
    made = write_images(images, valid=3, invalid=False)
    data = [path.read_bytes() for path in made.values()]
    for path in made.values():
        path.unlink()
    (images / "what #1? 100%.png").write_bytes(data[0])
    (images / "new\nline.png").write_bytes(data[1])
    with open(os.fsencode(images) + b"/caf\xe9.png", "wb") as handle:  # Latin-1 bytes: not UTF-8
        handle.write(data[2])
    defs = make_defs(emulator, str(images), str(tmp_path / "videos"))
    daemon = LocalDaemon(defs, instance)

    assert len(_settle(daemon)) == 1
    assert emulator.ledger().billed_submissions == 2  # the two valid UTF-8 names, sent as data URIs
    keys = instance.get_dynamic_partitions(PARTITIONS)
    assert len(keys) == 3 and all(key.isascii() and "\n" not in key for key in keys)
    (bad,) = [key for key in keys if video_metadata(instance, key) is None]
    failure = latest_failure(instance, bad)
    assert failure.failure_class == "invalid_input"
    assert (
        "caf\\xe9.png: the file name is not valid UTF-8" in failure.reason
        and "rename the file" in failure.reason
    )
