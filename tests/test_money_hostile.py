"""The money promise under hostile configuration, the way a user meets it (issue 17, cases 2, 5 and 6, and
resolving "ambiguous"): a real Dagster instance, the emulator over loopback HTTP (its ledger is the judge of
money), real files, and a real S3 server that ignores conditional writes (moto 5.0.0, ``old_s3``).

- A store without conditional writes (case 2): two separate processes over the same images pay nothing
  while the journal is on it, each partition failing ``journal_unsafe`` naming the option ``journal``; with
  ``journal`` on local disk the same two processes pay exactly once per image and every request is collected.
- Pay for the bytes hashed (case 5): an image replaced on disk right after it was hashed is sent as the
  bytes hashed (the service's fingerprint of what it received, and the video rendered from it), and the
  lineage names their sha256.
- Resolve "ambiguous" without paying twice: the CLI (``dagster-runway journal list`` / ``adopt``) and the op
  config ``adopt_request_ids`` each attach the lost request, which is then collected, billed once; a wrong
  id (bad characters, one the service never issued, or a partition with nothing ambiguous) fails its
  partition with a clear message, pays nothing, and leaves the attempt ambiguous.
- Manifest rows that match nothing (case 6): an NFC row matches its NFD file; a ``Cat.png`` row beside
  ``cat.png`` is reported on the images asset (``runway/manifest_unmatched``) and the image fails before
  paying, naming both spellings.

Case 8 (a sidecar linked out of the source never sent nor stored) is proven at pipeline level in
``tests/test_prepare_pipeline.py`` (``test_a_sidecar_linked_out_of_the_source_never_sends_or_stores_its_contents``),
so it is not repeated here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest
from dagster import AssetRecordsFilter, DagsterInstance, Definitions, instance_for_test

from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.emulator.inputs import ModelInput
from dagster_runway.journal import AMBIGUOUS, SUBMITTED, Claim, Journal
from dagster_runway.media import probe_video
from dagster_runway.pipeline import submit as submit_module
from dagster_runway.pipeline.records import FailureRecord
from dagster_runway.schema import MODEL_ID
from dagster_runway.testing import LocalDaemon
from tests.fixtures.s3 import S3Bucket

from .pipeline_helpers import (
    IMAGES,
    PARTITIONS,
    REQUESTS,
    latest_failure,
    make_defs,
    png_bytes,
    run_until_idle,
    video_metadata,
    write_images,
)

ROOT = Path(__file__).resolve().parent.parent
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
SUBMIT_JOB = "runway_submit_job"


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _submit_op(defs: Definitions) -> str:
    """The submit job's one op, whose config takes ``adopt_request_ids``."""
    (name,) = [node.name for node in defs.resolve_job_def(SUBMIT_JOB).graph.nodes]
    return name


def _submit(
    defs: Definitions, instance: DagsterInstance, first: str, last: str | None = None, config: Any = None
) -> Any:
    job = defs.resolve_job_def(SUBMIT_JOB)
    return job.execute_in_process(
        instance=instance,
        tags={RANGE_START: first, RANGE_END: last or first},
        run_config=config or {},
        raise_on_error=False,
    )


def _request_metadata(instance: DagsterInstance, key: str) -> dict[str, Any] | None:
    """The newest request materialization's metadata, as the UI shows it (full ``runway/*`` keys)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=REQUESTS, asset_partitions=[key]), limit=1
    ).records
    event = records[0].asset_materialization if records else None
    return None if event is None else {k: v.value for k, v in event.metadata.items()}


def _failure(instance: DagsterInstance, key: str) -> FailureRecord:
    failure = latest_failure(instance, key)
    assert failure is not None, f"no failure recorded for {key}"
    return failure


def _claim(output: Path, fingerprint: str) -> Claim:
    """The journal's latest attempt for a fingerprint, read as a fresh process would."""
    claim = Journal(f"{output}/.runway").latest(fingerprint)
    assert claim is not None, f"no claim for {fingerprint}"
    return claim


# -- case 2: a store without conditional writes, two hosts ---------------------------------------------


class Hosts:
    """Images on local disk, output on a bucket, one Dagster home shared by separate pipeline processes."""

    def __init__(self, tmp_path: Path, emulator: Emulator, bucket: S3Bucket) -> None:
        self.emulator, self.bucket = emulator, bucket
        self.source = tmp_path / "images"
        write_images(self.source, valid=3, invalid=False)
        self.keys = sorted(p.name for p in self.source.glob("*.png"))
        self.output = bucket.url("videos")
        self.home = tmp_path / "home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        with self.instance() as instance:
            instance.add_dynamic_partitions(PARTITIONS, self.keys)

    def options(self, **more: Any) -> dict[str, Any]:
        return {
            "missing_prompt": "service_default",
            "output_storage_options": self.bucket.storage_options,
            **more,
        }

    def instance(self) -> DagsterInstance:
        return DagsterInstance.from_config(str(self.home))

    def spawn_submit(self, options: dict[str, Any]) -> subprocess.Popen[str]:
        params = {
            "action": "job",
            "job": SUBMIT_JOB,
            "range": [self.keys[0], self.keys[-1]],
            "source": str(self.source),
            "output": self.output,
            "base_url": self.emulator.base_url,
            "token": self.emulator.token,
            "options": options,
        }
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "DAGSTER_DISABLE_TELEMETRY": "1"}
        return subprocess.Popen(
            [sys.executable, "-m", "tests.pipeline_process", json.dumps(params)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def two_hosts(self, options: dict[str, Any]) -> list[dict[str, Any]]:
        """Two processes started together over the same partitions; what each printed."""
        processes = [self.spawn_submit(options) for _ in range(2)]
        printed = []
        for process in processes:
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, f"exit {process.returncode}\n{out[-2000:]}\n{err[-4000:]}"
            printed.append(json.loads(out.strip().splitlines()[-1]))
        return printed

    def overlapped(self, printed: list[dict[str, Any]]) -> bool:
        with self.instance() as instance:
            records = [instance.get_run_record_by_id(p["run_id"]) for p in printed]
        starts = [r.start_time for r in records if r is not None and r.start_time is not None]
        ends = [r.end_time for r in records if r is not None and r.end_time is not None]
        assert len(starts) == len(ends) == len(printed)
        return max(starts) < min(ends)


def test_two_hosts_on_a_store_without_conditional_writes_pay_nothing_until_the_journal_moves(
    tmp_path: Path, emulator: Emulator, old_s3: S3Bucket
) -> None:
    hosts = Hosts(tmp_path, emulator, old_s3)
    emulator.add_fault(FaultRule(kind="slow", endpoint="submit", delay_seconds=1.0))  # were anything sent

    # The journal on the bucket (the default, <output>/.runway): refused before any POST, by both hosts.
    printed = hosts.two_hosts(hosts.options())
    assert [p["success"] for p in printed] == [False, False]
    assert emulator.ledger().submissions == 0 and emulator.ledger().billed_submissions == 0
    with hosts.instance() as instance:
        for key in hosts.keys:
            failure = latest_failure(instance, key)
            assert failure is not None and failure.failure_class == "journal_unsafe", (key, failure)
            assert f"s3://{old_s3.bucket}/videos/.runway" in failure.reason
            assert "ignores conditional writes" in failure.reason and "pay for it twice" in failure.reason
            assert "nothing was submitted" in failure.reason
            assert "`journal`" in failure.reason  # the option that fixes it
            assert "testing" not in failure.reason + failure.next_step  # no credential in the message

    # The fix the message names: the journal on a local folder every run shares. Output stays on the bucket.
    moved = hosts.options(journal=str(tmp_path / "journal"))
    printed = hosts.two_hosts(moved)
    assert hosts.overlapped(printed)  # both hosts were submitting at once
    emulator.clear_faults()
    ledger = emulator.ledger()
    assert ledger.billed_submissions == 3 and len(ledger.by_fingerprint) == 3  # once per distinct image
    claims = list(Journal(str(tmp_path / "journal")).iter_claims())
    assert sorted(c.partition for c in claims) == hosts.keys and {c.state for c in claims} == {SUBMITTED}

    # Every request is collectable: the status sensor collects all three onto the bucket, paying nothing more.
    with hosts.instance() as instance:
        defs = make_defs(emulator, str(hosts.source), hosts.output, **moved)
        daemon = LocalDaemon(defs, instance, log_level="WARNING")
        daemon.tick("runway_discovery_sensor")
        assert run_until_idle(daemon) == []
        collected = {key: video_metadata(instance, key) for key in hosts.keys}
    assert {(meta or {}).get("runway/request_id") for meta in collected.values()} == {
        e.request_id for e in ledger.entries
    }
    assert emulator.ledger().billed_submissions == 3
    videos = old_s3.fs.glob(old_s3.path("videos/*.mp4"))
    assert len(videos) == 3
    local_copy = tmp_path / "one.mp4"
    local_copy.write_bytes(old_s3.fs.cat_file(videos[0]))
    assert probe_video(str(local_copy)).decodable


# -- case 5: pay for the bytes hashed ---------------------------------------------------------------------


def test_an_image_replaced_right_after_it_was_hashed_is_sent_and_recorded_as_the_bytes_hashed(
    tmp_path: Path, emulator: Emulator, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    original = png_bytes(320, 180, (200, 30, 30))
    edited = png_bytes(320, 180, (30, 30, 200))  # as valid, other pixels
    (images / "cat.png").write_bytes(original)
    defs = make_defs(emulator, str(images), str(tmp_path / "videos"))
    LocalDaemon(defs, instance).tick("runway_discovery_sensor")

    real_prepare = submit_module.prepare
    replaced: list[str] = []

    def prepare_then_edit(*args: Any, **kwargs: Any) -> Any:
        prepared = real_prepare(*args, **kwargs)
        path = Path(prepared.entry.path)
        (path.parent / ".edit.tmp").write_bytes(edited)  # an editor's save: a rename over the file
        os.replace(path.parent / ".edit.tmp", path)
        replaced.append(prepared.key)
        return prepared

    monkeypatch.setattr(submit_module, "prepare", prepare_then_edit)
    result = _submit(defs, instance, "cat.png")
    assert result.success
    assert replaced == ["cat.png"] and (images / "cat.png").read_bytes() == edited  # the edit happened

    ledger = emulator.ledger()
    (entry,) = ledger.entries
    assert ledger.billed_submissions == 1
    # The service identifies an inline image by the sha256 of the bytes it received (its ledger's fingerprint):
    # the bytes that were hashed and validated, not the edit.
    received = emulator.request_input(entry.request_id)
    assert entry.fingerprint == _service_fingerprint(received, original)
    assert entry.fingerprint != _service_fingerprint(received, edited)
    meta = _request_metadata(instance, "cat.png")
    assert meta is not None and meta["runway/request_id"] == entry.request_id
    assert meta["runway/source_sha256"] == hashlib.sha256(original).hexdigest()  # the lineage names them

    # The video the user gets is rendered from the original (red) image, and its lineage says so.
    assert run_until_idle(LocalDaemon(defs, instance, log_level="WARNING")) == []
    video = video_metadata(instance, "cat.png")
    assert video is not None and video["runway/request_id"] == entry.request_id
    assert video["runway/source_sha256"] == hashlib.sha256(original).hexdigest()
    red, _, blue = _corner_colour(tmp_path / "videos" / "cat.png.mp4")
    assert red > 150 and blue < 80, (red, blue)
    assert emulator.ledger().billed_submissions == 1


def _service_fingerprint(fields: dict[str, Any], image: bytes) -> str:
    """The emulator's fingerprint of a request with these fields and this inline image."""
    model_input = ModelInput(
        prompt_image="", fields=fields, image_identity="sha256:" + hashlib.sha256(image).hexdigest()
    )
    return model_input.fingerprint(MODEL_ID)


def _corner_colour(video: Path) -> tuple[int, int, int]:
    """The colour near the top-left corner of a video's first frame (the image's background)."""
    with av.open(str(video)) as container:
        frame = next(container.decode(video=0)).to_image().convert("RGB")
    return frame.getpixel((4, 4))


# -- resolving "ambiguous" without paying twice ---------------------------------------------------------


class Ambiguous:
    """Two images; the submit of one is accepted and billed, and its answer lost (a reset after accept)."""

    def __init__(self, tmp_path: Path, emulator: Emulator, instance: DagsterInstance) -> None:
        self.emulator, self.instance = emulator, instance
        write_images(tmp_path / "images", valid=2, invalid=False)
        self.output = tmp_path / "videos"
        self.defs = make_defs(emulator, str(tmp_path / "images"), str(self.output))
        self.daemon = LocalDaemon(self.defs, instance, log_level="WARNING")
        self.daemon.tick("runway_discovery_sensor")
        self.lost, self.other = "img00.png", "img01.png"
        emulator.add_fault(FaultRule(kind="reset", endpoint="submit", times=1, after_accept=True))
        assert not _submit(self.defs, instance, self.lost).success
        emulator.clear_faults()
        failure = latest_failure(instance, self.lost)
        assert failure is not None and failure.failure_class == "ambiguous", failure
        assert emulator.ledger().billed_submissions == 1
        self.fingerprint = str(failure.metadata["fingerprint"])
        # What the operator finds in their RunComfy history (by the seed and time the failure names).
        (entry,) = emulator.ledger().entries
        self.request_id, self.service_fingerprint = entry.request_id, entry.fingerprint
        claim = _claim(self.output, self.fingerprint)
        assert claim.state == AMBIGUOUS and claim.request_id is None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The operator's shell: the service's token and URL exported, so ``adopt`` checks the id with it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCOMFY_")}
        env |= {"RUNCOMFY_API_TOKEN": self.emulator.token, "RUNCOMFY_BASE_URL": self.emulator.base_url}
        return subprocess.run(
            [sys.executable, "-m", "dagster_runway.cli", "journal", *args, "--output", str(self.output)],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip

    def collect(self) -> None:
        assert run_until_idle(self.daemon) == []

    def billed(self) -> int:
        return self.emulator.ledger().billed_submissions

    def lost_billed_once(self) -> None:
        """The lost partition's input paid once in all; the other image once; nothing else."""
        ledger = self.emulator.ledger()
        assert ledger.by_fingerprint[self.service_fingerprint].billed_submissions == 1
        assert ledger.billed_submissions == len(ledger.by_fingerprint) == 2  # billed == distinct images


@pytest.fixture
def ambiguous(tmp_path: Path, emulator: Emulator, instance: DagsterInstance) -> Ambiguous:
    return Ambiguous(tmp_path, emulator, instance)


def test_the_cli_lists_the_ambiguous_attempt_and_adopting_its_request_collects_it_billed_once(
    ambiguous: Ambiguous,
) -> None:
    listed = ambiguous.cli("list")
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if ambiguous.lost in line]
    assert row.split()[0] == "ambiguous" and ambiguous.fingerprint[:12] in row
    assert "adopt FINGERPRINT REQUEST_ID" in listed.stdout  # the way out, said where the operator looks

    adopted = ambiguous.cli("adopt", ambiguous.fingerprint[:12], ambiguous.request_id)
    assert adopted.returncode == 0, adopted.stderr
    assert ambiguous.request_id in adopted.stdout and "instead of paying again" in adopted.stdout

    assert _submit(ambiguous.defs, ambiguous.instance, ambiguous.lost).success  # reused, not paid
    assert ambiguous.billed() == 1
    ambiguous.collect()  # the status sensor: collects it (and submits the other image, never submitted)
    video = video_metadata(ambiguous.instance, ambiguous.lost)
    assert video is not None and video["runway/request_id"] == ambiguous.request_id
    assert video_metadata(ambiguous.instance, ambiguous.other) is not None
    ambiguous.lost_billed_once()


def test_op_config_adopt_request_ids_collects_the_ambiguous_request_billed_once(ambiguous: Ambiguous) -> None:
    op = _submit_op(ambiguous.defs)
    config = {"ops": {op: {"config": {"adopt_request_ids": {ambiguous.lost: ambiguous.request_id}}}}}
    result = _submit(ambiguous.defs, ambiguous.instance, ambiguous.lost, config=config)
    assert result.success
    meta = _request_metadata(ambiguous.instance, ambiguous.lost)
    assert meta is not None and meta["runway/request_id"] == ambiguous.request_id
    assert ambiguous.billed() == 1
    # The same config again (a retried or re-executed run) reuses what it adopted; it fails nothing.
    assert _submit(ambiguous.defs, ambiguous.instance, ambiguous.lost, config=config).success
    assert (
        "nothing to adopt" not in latest_failure(ambiguous.instance, ambiguous.lost).reason
    )  # the first one's
    ambiguous.collect()
    video = video_metadata(ambiguous.instance, ambiguous.lost)
    assert video is not None and video["runway/request_id"] == ambiguous.request_id
    ambiguous.lost_billed_once()
    claim = _claim(ambiguous.output, ambiguous.fingerprint)
    assert claim.state == SUBMITTED and claim.request_id == ambiguous.request_id
    assert "adopted by the operator" in (claim.reason or "")


def _adopt_config(ambiguous: Ambiguous, ids: dict[str, str]) -> dict[str, Any]:
    return {"ops": {_submit_op(ambiguous.defs): {"config": {"adopt_request_ids": ids}}}}


def test_op_config_adopting_an_id_with_bad_characters_fails_clearly_and_pays_nothing(
    ambiguous: Ambiguous,
) -> None:
    config = _adopt_config(ambiguous, {ambiguous.lost: "../../etc/passwd"})
    result = _submit(ambiguous.defs, ambiguous.instance, ambiguous.lost, config=config)
    assert not result.success
    failure = _failure(ambiguous.instance, ambiguous.lost)
    assert failure.failure_class == "ambiguous"
    assert "could not adopt request '../../etc/passwd'" in failure.reason
    assert "[A-Za-z0-9_-]" in failure.reason and "adopt_request_ids" in failure.next_step
    assert ambiguous.billed() == 1 and ambiguous.emulator.ledger().submissions == 1
    claim = _claim(ambiguous.output, ambiguous.fingerprint)
    assert claim.state == AMBIGUOUS and claim.request_id is None  # still protected


def test_op_config_adopting_for_a_partition_whose_claim_is_not_ambiguous_fails_clearly(
    ambiguous: Ambiguous,
) -> None:
    assert _submit(ambiguous.defs, ambiguous.instance, ambiguous.other).success  # its own request, billed
    assert ambiguous.billed() == 2
    config = _adopt_config(ambiguous, {ambiguous.other: ambiguous.request_id})  # the wrong partition's row
    result = _submit(ambiguous.defs, ambiguous.instance, ambiguous.other, config=config)
    assert ambiguous.billed() == 2  # nothing paid, whatever happens
    assert not result.success
    failure = latest_failure(ambiguous.instance, ambiguous.other)
    assert failure is not None and "not ambiguous" in failure.reason and "nothing to adopt" in failure.reason


def test_op_config_adopting_for_a_partition_never_submitted_pays_nothing(ambiguous: Ambiguous) -> None:
    config = _adopt_config(ambiguous, {ambiguous.other: ambiguous.request_id})
    result = _submit(ambiguous.defs, ambiguous.instance, ambiguous.other, config=config)
    assert ambiguous.billed() == 1, "a submit was paid for a partition the operator said was paid already"
    assert not result.success


def test_op_config_adopting_an_id_the_service_never_issued_keeps_the_claim_ambiguous(
    ambiguous: Ambiguous,
) -> None:
    typo = ambiguous.request_id[:-4] + "beef"
    assert typo != ambiguous.request_id
    result = _submit(
        ambiguous.defs,
        ambiguous.instance,
        ambiguous.lost,
        config=_adopt_config(ambiguous, {ambiguous.lost: typo}),
    )
    assert not result.success  # fails, naming the id
    assert typo in _failure(ambiguous.instance, ambiguous.lost).reason
    assert ambiguous.billed() == 1
    _submit(ambiguous.defs, ambiguous.instance, ambiguous.lost)  # a plain re-run, as the next day's backfill
    assert ambiguous.billed() == 1, "the ambiguous input was paid for again after a mistyped adopt"
    claim = _claim(ambiguous.output, ambiguous.fingerprint)
    assert claim.state == AMBIGUOUS


# -- case 6: manifest rows that match no file -------------------------------------------------------------


def test_manifest_rows_match_after_nfc_and_a_case_only_match_is_reported_and_refused_before_paying(
    tmp_path: Path, emulator: Emulator, instance: DagsterInstance, capfd: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    nfd, nfc = unicodedata.normalize("NFD", "café.png"), unicodedata.normalize("NFC", "café.png")
    assert nfd != nfc
    (images / nfd).write_bytes(png_bytes(320, 180, (10, 120, 60)))  # as macOS writes the name
    (images / "cat.png").write_bytes(png_bytes(240, 240, (120, 10, 60)))
    (images / "manifest.csv").write_text(
        f'path,promptText\nCat.png,a cat on a sofa\n{nfc},"a café at dawn, slow dolly-in"\n', encoding="utf-8"
    )
    assert sorted(os.listdir(images)) == sorted([nfd, "cat.png", "manifest.csv"])
    defs = make_defs(emulator, str(images), str(tmp_path / "videos"), manifest="manifest.csv")
    daemon = LocalDaemon(defs, instance, log_level="WARNING")

    daemon.tick("runway_discovery_sensor")  # one tick
    keys = sorted(instance.get_dynamic_partitions(PARTITIONS))
    assert len(keys) == 2 and "cat.png" in keys
    (cafe,) = [key for key in keys if key != "cat.png"]
    observations = [r.asset_observation for r in instance.fetch_observations(IMAGES, limit=100).records]
    reported = [
        o for o in observations if o and o.partition is None and "runway/manifest_unmatched" in o.metadata
    ]
    assert len(reported) == 1
    assert reported[0].metadata["runway/manifest_unmatched"].value == ["Cat.png"]  # the NFC row matched
    warned = capfd.readouterr().err  # the tick's log, as dagster dev shows it
    assert "WARNING" in warned and "1 row(s) of the manifest manifest.csv match no image" in warned
    assert "'Cat.png'" in warned and "NFC" in warned

    result = _submit(defs, instance, keys[0], keys[-1])
    assert not result.success  # for cat.png alone
    ledger = emulator.ledger()
    assert ledger.billed_submissions == 1  # café only: cat.png was refused before paying
    (entry,) = ledger.entries
    assert emulator.request_input(entry.request_id)["promptText"] == "a café at dawn, slow dolly-in"
    assert (_request_metadata(instance, cafe) or {}).get(
        "runway/prompt_text"
    ) == "a café at dawn, slow dolly-in"
    failure = latest_failure(instance, "cat.png")
    assert failure is not None and failure.failure_class == "invalid_input"
    assert (
        "'Cat.png'" in failure.reason and "'cat.png'" in failure.reason and "manifest.csv" in failure.reason
    )
    assert _request_metadata(instance, "cat.png") is None  # no request: nothing sent

    # The next ticks collect café and do not pay for cat.png either, with the default prompt or any other.
    run_until_idle(daemon)
    assert emulator.ledger().billed_submissions == 1
    assert (video_metadata(instance, cafe) or {}).get("runway/prompt_text") == "a café at dawn, slow dolly-in"
