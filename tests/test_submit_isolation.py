"""Each partition's submit is decided and recorded on its own (issue 17, cases 3 and 4).

A journal write that fails, an answer that cannot be decoded, an exception nobody planned for, a dead
submit worker, a gateway's 404 during a backfill: none of them may cancel another partition's submit,
lose an answer that arrived, let the run end SUCCESS with an outcome missing, or pay twice. Pipelines
run on a real Dagster instance against the emulator over loopback HTTP; the emulator's ledger judges
the money. Journal and client faults are injected in-process, where no server can make them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetRecordsFilter, DagsterInstance, Definitions, instance_for_test

from dagster_runway import RunComfyResource
from dagster_runway.client import AsyncRunComfyClient
from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.journal import AMBIGUOUS, CLAIMED, SUBMITTED, Journal
from dagster_runway.pipeline import build_runway_pipeline
from dagster_runway.pipeline import records as rec
from dagster_runway.testing import LocalDaemon

from .pipeline_helpers import (
    REQUESTS,
    VIDEOS,
    latest_failure,
    make_defs,
    run_until_idle,
    video_metadata,
    write_images,
)

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
KEYS = ["img00.png", "img01.png", "img02.png"]
READ_ONLY = OSError(30, "Read-only file system")


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


class Pipeline:
    """Three images, their pipeline against the emulator, and what the event log and journal say."""

    def __init__(
        self, tmp_path: Path, emulator: Emulator, instance: DagsterInstance, **resource: Any
    ) -> None:
        write_images(tmp_path / "images", valid=3, invalid=False)
        self.output = tmp_path / "videos"
        self.defs: Definitions = make_defs(emulator, str(tmp_path / "images"), str(self.output))
        if resource:  # the same pipeline on a resource with other settings
            runcomfy = RunComfyResource(api_token=emulator.token, base_url=emulator.base_url, **resource)
            self.defs = build_runway_pipeline(
                str(tmp_path / "images"),
                str(self.output),
                resource=runcomfy,
                missing_prompt="service_default",
            )
        self.emulator, self.instance = emulator, instance
        self.daemon = LocalDaemon(self.defs, instance)

    def discover(self) -> None:
        self.daemon.tick("runway_discovery_sensor")
        assert sorted(self.instance.get_dynamic_partitions("runway_images")) == KEYS

    def settle(self) -> list[str]:
        """What the daemon would do: discover, submit, poll and collect until nothing is owed."""
        self.daemon.tick("runway_discovery_sensor")
        return run_until_idle(self.daemon)

    def submit_job(self, first: str = KEYS[0], last: str = KEYS[-1]) -> Any:
        job = self.defs.resolve_job_def("runway_submit_job")
        return job.execute_in_process(
            instance=self.instance, tags={RANGE_START: first, RANGE_END: last}, raise_on_error=False
        )

    def request_ids(self) -> dict[str, str]:
        """Each partition's request id, as the event log has it."""
        found = {key: rec.latest_request(self.instance, REQUESTS, key) for key in KEYS}
        return {key: record.request_id for key, record in found.items() if record is not None}

    def videos(self) -> dict[str, str]:
        """Each collected partition's video request id."""
        found = {key: video_metadata(self.instance, key) for key in KEYS}
        return {key: meta["runway/request_id"] for key, meta in found.items() if meta is not None}

    def failure_classes(self, key: str) -> list[str]:
        """Every failure class ever recorded on the partition, oldest first."""
        classes = []
        for asset_key in (REQUESTS, VIDEOS):
            records = self.instance.fetch_observations(
                AssetRecordsFilter(asset_key=asset_key, asset_partitions=[key]), limit=100
            ).records
            for record in records:
                value = record.asset_observation.metadata.get("runway/failure_class")
                if value is not None:
                    classes.append((record.storage_id, value.value))
        return [value for _, value in sorted(classes)]

    def journal_claim(self, key: str) -> Any:
        request = rec.latest_request(self.instance, REQUESTS, key)
        fingerprint = request.fingerprint if request else self._fingerprint(key)
        return Journal(f"{self.output}/.runway").latest(fingerprint)

    def _fingerprint(self, key: str) -> str:
        failure = latest_failure(self.instance, key)
        assert failure is not None and "fingerprint" in failure.metadata, f"no fingerprint for {key}"
        return str(failure.metadata["fingerprint"])

    def billed(self) -> tuple[int, int]:
        ledger = self.emulator.ledger()
        return ledger.submissions, ledger.billed_submissions


@pytest.fixture
def pipeline(tmp_path: Path, emulator: Emulator, instance: DagsterInstance) -> Pipeline:
    return Pipeline(tmp_path, emulator, instance)


def _fail_for(method: str, partition: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one journal write raise, for one partition (or all), as a read-only store or an expired token would."""
    original = getattr(Journal, method)

    def failing(self: Journal, claim: Any, *args: Any) -> Any:
        if partition is None or claim.partition == partition:
            raise READ_ONLY
        return original(self, claim, *args)

    monkeypatch.setattr(Journal, method, failing)


def _step_failure(result: Any) -> str:
    failures = [event for event in result.all_events if event.is_step_failure]
    assert failures, "the step did not fail"
    return str(failures[0].step_failure_data.error.message)


# Case 3: one journal write, one answer or one exception must not cost the others


def test_an_answer_the_journal_cannot_record_is_kept_in_the_event_log_and_collected(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_for("record_submitted", "img01.png", monkeypatch)
    assert pipeline.settle() == []  # every partition has its outcome: no run fails
    assert pipeline.billed() == (3, 3)
    ledger_ids = {entry.request_id for entry in pipeline.emulator.ledger().entries}
    assert set(pipeline.request_ids().values()) == ledger_ids  # all three request ids are in the event log
    assert pipeline.videos() == pipeline.request_ids()  # and all three videos were collected
    assert all("ambiguous" not in pipeline.failure_classes(key) for key in KEYS)
    assert pipeline.journal_claim("img01.png").state == CLAIMED  # the journal lost it, the event log did not
    assert pipeline.submit_job().success  # a re-run while the store is still read-only reuses it from there
    assert pipeline.billed() == (3, 3)

    monkeypatch.undo()  # the store is writable again: a re-run repairs the journal and pays nothing
    assert pipeline.submit_job().success
    assert pipeline.billed() == (3, 3)
    repaired = pipeline.journal_claim("img01.png")
    assert repaired.state == SUBMITTED and repaired.request_id == pipeline.request_ids()["img01.png"]


def _one_ambiguous(pipeline: Pipeline) -> str:
    """The partition that failed ambiguous; the two others must have been collected."""
    videos = pipeline.videos()
    assert len(videos) == 2
    (lost,) = set(KEYS) - set(videos)
    failure = latest_failure(pipeline.instance, lost)
    assert failure is not None and failure.failure_class == "ambiguous"
    assert "force_after_ambiguous: true" in failure.next_step
    return lost


def _never_paid_again(pipeline: Pipeline, lost: str) -> None:
    assert pipeline.settle() == []  # the status sensor does not resubmit an ambiguous partition
    result = pipeline.submit_job(lost, lost)  # nor does a plain re-run of it
    assert not result.success and latest_failure(pipeline.instance, lost).failure_class == "ambiguous"
    assert pipeline.billed() == (3, 3)


def test_an_undecodable_answer_is_ambiguous_and_the_other_submits_are_collected(pipeline: Pipeline) -> None:
    pipeline.emulator.add_fault(FaultRule(kind="bad_gzip", endpoint="submit", times=1))  # accepted, billed
    failed = pipeline.settle()
    assert len(failed) == 1  # the submit run fails, loudly, for the one partition
    assert pipeline.billed() == (3, 3)  # billed equals the accepted requests
    lost = _one_ambiguous(pipeline)
    assert "DecodingError" in latest_failure(pipeline.instance, lost).reason
    assert pipeline.journal_claim(lost).state == AMBIGUOUS
    _never_paid_again(pipeline, lost)


def test_an_undecodable_answer_whose_ambiguity_the_journal_cannot_record(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_for("record_ambiguous", None, monkeypatch)
    pipeline.emulator.add_fault(FaultRule(kind="bad_gzip", endpoint="submit", times=1))
    assert len(pipeline.settle()) == 1
    assert pipeline.billed() == (3, 3)
    lost = _one_ambiguous(pipeline)
    assert pipeline.journal_claim(lost).state == CLAIMED  # an open claim: later runs read it as ambiguous
    _never_paid_again(pipeline, lost)


def test_an_unexpected_exception_after_the_post_is_ambiguous_and_cancels_nothing(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = AsyncRunComfyClient.submit
    raised: list[str] = []

    async def submit_then_raise(self: AsyncRunComfyClient, *args: Any, **kwargs: Any) -> Any:
        submission = await original(self, *args, **kwargs)
        if not raised:
            raised.append(submission.request_id)
            raise RuntimeError("an error nobody planned for")
        return submission

    monkeypatch.setattr(AsyncRunComfyClient, "submit", submit_then_raise)
    assert len(pipeline.settle()) == 1
    assert pipeline.billed() == (3, 3)
    lost = _one_ambiguous(pipeline)
    reason = latest_failure(pipeline.instance, lost).reason
    assert "RuntimeError: an error nobody planned for" in reason and "may have been" in reason
    _never_paid_again(pipeline, lost)


def test_a_dead_submit_worker_fails_the_run_and_every_partition_it_left(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: RunComfyResource) -> AsyncRunComfyClient:
        raise RuntimeError("the worker cannot start")

    monkeypatch.setattr(RunComfyResource, "get_async_client", broken)
    pipeline.discover()
    result = pipeline.submit_job()
    assert not result.success
    message = _step_failure(result)
    assert "submit worker stopped with RuntimeError: the worker cannot start" in message
    assert "3 of 3 submits got no outcome" in message
    for key in KEYS:
        failure = latest_failure(pipeline.instance, key)
        assert failure.failure_class == "service_unavailable" and failure.retryable
        assert "nothing was billed" in failure.reason
    assert pipeline.billed() == (0, 0)

    monkeypatch.undo()
    assert pipeline.settle() == []
    assert sorted(pipeline.videos()) == KEYS and pipeline.billed() == (3, 3)


def test_submits_stopped_by_an_account_error_each_get_their_own_failure(
    tmp_path: Path, emulator_factory: Any, instance: DagsterInstance
) -> None:
    emulator = emulator_factory(balance_usd=0.0)
    pipeline = Pipeline(
        tmp_path, emulator, instance, max_concurrency=1
    )  # one at a time: the first stops the rest
    pipeline.discover()
    result = pipeline.submit_job()
    assert not result.success
    reasons = []
    for key in KEYS:
        failure = latest_failure(pipeline.instance, key)
        assert failure is not None and failure.failure_class == "account"
        reasons.append(failure.reason)
    assert sum(reason.startswith("not sent: another submit of this run failed") for reason in reasons) == 2
    assert pipeline.billed() == (0, 0) and emulator.ledger().submissions == 0


# Case 4: a bare 404 during a backfill is not "expired"


def test_a_gateway_404_in_the_reuse_check_pays_nothing_and_the_request_is_collected_later(
    pipeline: Pipeline,
) -> None:
    emulator = pipeline.emulator
    emulator.pause()  # every request stays queued
    pipeline.discover()
    pipeline.daemon.tick("runway_status_sensor")  # submits all three
    assert pipeline.billed() == (3, 3)
    original = pipeline.request_ids()
    assert sorted(original) == KEYS

    emulator.add_fault(FaultRule(kind="gateway_404", endpoint="status"))
    emulator.add_fault(FaultRule(kind="gateway_404", endpoint="result"))
    result = pipeline.submit_job()  # a backfill over the same partitions meets the gateway's 404s
    assert not result.success
    assert pipeline.billed() == (3, 3)  # nothing new is paid
    for key in KEYS:
        failure = latest_failure(pipeline.instance, key)
        assert failure.failure_class == "service_unavailable" and failure.retryable
        assert failure.request_id == original[key] and "without the API's error" in failure.reason
    pipeline.daemon.tick("runway_status_sensor")  # its polls meet the 404 too: nothing is taken for expired
    assert all("expired" not in pipeline.failure_classes(key) for key in KEYS)
    assert pipeline.billed() == (3, 3)

    emulator.clear_faults()
    emulator.resume()
    assert pipeline.settle() == []
    assert pipeline.videos() == original  # the original requests, collected
    assert pipeline.billed() == (3, 3)
