"""Collect finished requests: fetch the result, store the video, probe it, check it, record lineage.

Every partition a collect run targets ends materialized or explicitly failed:

- a video already stored from the same request, and intact, is recorded again as *verified
  unchanged* (same data version, so nothing downstream turns stale) and its checks run again;
- a request still rendering is waited for (a backfill over the videos may start before the renders
  end; the status sensor only launches collects of finished requests);
- a finished request's video is downloaded, checked to be a playable video, and only then published;
- anything else fails the partition with its class and next step (see ``failures``).

Check evaluations are linked to the materialization they judge, so the UI's per-partition check
status is current.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec
from dagster import AssetMaterialization, MetadataValue

from dagster_runway import _compat
from dagster_runway import journal as jn
from dagster_runway._redact import redact_url
from dagster_runway.client import failure_error
from dagster_runway.errors import RequestNotFoundError, RunComfyError
from dagster_runway.media import (
    MediaError,
    NotAVideoError,
    VideoProbe,
    VideoProbeError,
    extract_poster,
    probe_video,
    remove_stale_parts,
    sha256_of,
    store_video,
)
from dagster_runway.media.lookup import change_tokens
from dagster_runway.media.probe import poster_markdown
from dagster_runway.media.provenance import tag_video
from dagster_runway.media.publish import write_bytes_atomic
from dagster_runway.media.storage import VideoTooLargeError, trusted_origins_for
from dagster_runway.pipeline import catalog
from dagster_runway.pipeline import checks as ck
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.gallery import gallery_uri
from dagster_runway.pipeline.prepare import recorded_relpaths
from dagster_runway.pipeline.step import Step, poll_statuses
from dagster_runway.resource import RunComfyResource
from dagster_runway.schema import RequestResult
from dagster_runway.version import __version__


@dataclass(frozen=True)
class Stored:
    """A video just published, and what was measured of it before it was published."""

    uri: str
    size: int
    sha256: str
    probe: VideoProbe


JUDGE_BATCH = 25  # videos recorded before their checks are evaluated together


@dataclass(frozen=True)
class _Fetched:
    """What a pool thread found for one partition, for the step's thread to record."""

    key: str
    record: rec.RequestRecord
    pending: bool = False
    failure: fl.PartitionFailure | None = None
    verified: rec.VideoRecord | None = None  # stored before from the same request, and intact
    result: RequestResult | None = None
    stored: Stored | None = None
    poster: bool = False
    preview: str | None = None
    inputs: ck.CheckInputs | None = None  # what the checks measured


class CollectBatch(Step):
    """The collect step for a set of partitions; ``run()`` yields its events as they happen."""

    def __init__(
        self,
        pipeline: RunwayPipelineConfig,
        resource: RunComfyResource,
        context: Any,
        keys: Sequence[str],
        *,
        requests: Mapping[str, rec.RequestRecord] | None = None,
        wait_s: float | None = None,
    ) -> None:
        super().__init__(pipeline, resource, context, keys)
        self.failure_key = pipeline.videos_key
        self.requests = dict(requests) if requests is not None else None
        self.wait_s = resource.wait_timeout if wait_s is None else wait_s
        self.collected: list[str] = []
        self._tokens: dict[str, str | None] | None = None
        self._image_ids: dict[str, int] = {}
        self._unjudged: list[
            tuple[str, ck.CheckInputs, bool]
        ] = []  # recorded videos whose checks wait for _judge

    # The step

    def run(self) -> Iterator[Any]:
        """Look each partition up (in this thread: the event log), then fetch, store, probe and measure
        them concurrently (``max_concurrency`` at a time), and record each here as soon as it is ready."""
        self._load_change_tokens()
        pipeline = self.pipeline
        requests = self.requests
        if requests is None:
            requests = rec.latest_requests(self.instance, pipeline.requests_key, self.keys)
        videos = rec.latest_videos(self.instance, pipeline.videos_key, self.keys)
        self._image_ids = rec.latest_image_storage_ids(self.instance, pipeline.images_key, self.keys)
        pool = ThreadPoolExecutor(
            max_workers=max(1, self.resource.max_concurrency), thread_name_prefix="collect"
        )
        try:
            futures = []
            for key in self.keys:
                record = requests.get(key)
                if record is None:
                    yield from self._fail(fl.no_request(key), None)
                    continue
                futures.append(pool.submit(self._fetch, key, record, videos.get(key)))
            pending: dict[str, rec.RequestRecord] = {}
            for future in as_completed(futures):
                fetched = future.result()
                if fetched.pending:
                    pending[fetched.key] = fetched.record
                else:
                    yield from self._record(fetched)
            yield from self._judge()
            if pending:
                yield from self._wait_and_collect(pending, pool)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _wait_and_collect(
        self, pending: dict[str, rec.RequestRecord], pool: ThreadPoolExecutor
    ) -> Iterator[Any]:
        """Wait (polling, all at once) for requests still queued or rendering, then collect each."""
        self.log.info(f"Waiting up to {self.wait_s:.0f}s for {len(pending)} request(s) still rendering")
        deadline = time.monotonic() + self.wait_s
        waiting = dict(pending)
        while waiting and time.monotonic() < deadline:
            statuses = poll_statuses(
                self.resource, [r.request_id for r in waiting.values()], max(1.0, deadline - time.monotonic())
            )
            futures = []
            for key, record in list(waiting.items()):
                status = statuses.get(record.request_id)
                if isinstance(status, RequestNotFoundError):
                    del waiting[key]
                    yield from self._fail(self._result_failure(key, record, status), record.source_version)
                elif status is not None and not isinstance(status, Exception) and status.status.is_terminal:
                    del waiting[key]
                    futures.append(pool.submit(self._fetch, key, record, None))
            for future in as_completed(futures):
                yield from self._record(future.result())
            yield from self._judge()
            if waiting:
                time.sleep(min(self.resource.poll_interval, max(0.0, deadline - time.monotonic())))
        for key, record in waiting.items():
            yield from self._fail(
                fl.still_running(key, record.request_id, self.wait_s), record.source_version
            )

    # Fetching (in the pool's threads: HTTP, storage and decoding only, no event log)

    @functools.cached_property
    def trusted_origins(self) -> frozenset[str]:
        """Where a video URL may go although it is not a public https host: the API's own origin when it
        is loopback or private (the emulator), else nowhere."""
        return trusted_origins_for(self.resource.base_url)

    def _fetch(self, key: str, record: rec.RequestRecord, video: rec.VideoRecord | None) -> _Fetched:
        if video is not None and video.request_id == record.request_id and self._intact(video):
            return _Fetched(key, record, verified=video, inputs=self._stored_inputs(key, video, record))
        try:
            result = self.resource.get_client().result(record.request_id)
        except RunComfyError as exc:
            return _Fetched(key, record, failure=self._result_failure(key, record, exc))
        if result.status.is_pending:
            return _Fetched(key, record, pending=True)
        error = failure_error(result)
        if error is not None:
            return _Fetched(key, record, failure=self._result_failure(key, record, error))
        assert result.video_url is not None
        try:
            stored = self._store(key, result.video_url, lineage_tags(record))
        except NotAVideoError as exc:
            return _Fetched(key, record, failure=fl.bad_output(key, record.request_id, exc))
        except (MediaError, OSError) as exc:
            step = "nothing to do: the status sensor collects it again in a later run."
            if isinstance(exc, VideoTooLargeError):
                step = (
                    f"if videos this large are expected, raise max_video_bytes (now {self.pipeline.max_video_bytes}); "
                    "the status sensor collects it again in a later run."
                )
            return _Fetched(key, record, failure=fl.download_failed(key, record.request_id, exc, step))
        poster, preview = self._poster(key, stored.uri)
        inputs = self._check_inputs(key, record, stored.sha256, stored.probe, None)
        return _Fetched(
            key, record, result=result, stored=stored, poster=poster, preview=preview, inputs=inputs
        )

    def _result_failure(self, key: str, record: rec.RequestRecord, exc: RunComfyError) -> fl.PartitionFailure:
        if exc.request_id is None:
            exc.request_id = record.request_id
        return fl.from_result_error(
            key, exc, attempt=record.attempt, retries_allowed=self.pipeline.retry_failed_generations
        )

    def _store(self, key: str, video_url: str, tags: Mapping[str, str]) -> Stored:
        """Download, tag (the lineage in the MP4's metadata), check, publish; then the lineage sidecar."""
        pipeline = self.pipeline
        options = dict(pipeline.output_storage_options)
        video_uri = pipeline.video_uri(key)
        remove_stale_parts(video_uri, options)
        probes: list[VideoProbe] = []

        def verify(local_path: str) -> None:
            probe = probe_video(local_path)
            if not probe.decodable:
                raise VideoProbeError(f"its frames do not decode: {probe.decode_error}")
            probes.append(probe)

        video = store_video(
            video_url,
            video_uri,
            storage_options=options,
            verify=verify,
            rewrite=lambda local_path: tag_video(local_path, tags, check=verify),
            max_bytes=pipeline.max_video_bytes,
            deadline_s=pipeline.download_timeout_s,
            trusted_origins=self.trusted_origins,
        )
        sidecar = json.dumps({**tags, "video_sha256": video.sha256, "video_size_bytes": video.size}, indent=2)
        try:
            write_bytes_atomic(
                f"{video_uri}.json",
                sidecar.encode(),
                storage_options=options,
                content_type="application/json",
            )
        except Exception as exc:  # noqa: BLE001 - the video is stored and paid for: a missing sidecar must not lose it
            self.log.warning(
                f"{video.uri}: the lineage sidecar could not be written ({type(exc).__name__}: {exc})"
            )
        return Stored(uri=video.uri, size=video.size, sha256=video.sha256, probe=probes[-1])

    def _poster(self, key: str, video_uri: str) -> tuple[bool, str | None]:
        """Extract the poster frame beside the video; whether it exists, and its inline thumbnail."""
        options = dict(self.pipeline.output_storage_options)
        poster_uri = self.pipeline.poster_uri(key)
        try:
            extract_poster(video_uri, poster_uri, options)
        except (MediaError, OSError) as exc:
            self.log.warning(f"{key}: no poster frame for {video_uri}: {exc}")
            return False, None
        try:
            return True, _poster_markdown(poster_uri, options)
        except (OSError, ValueError) as exc:
            self.log.warning(f"{key}: no poster thumbnail for {poster_uri}: {exc}")
            return True, None

    # Recording (in the step's thread: events and the event log)

    def _record(self, fetched: _Fetched) -> Iterator[Any]:
        if len(self._unjudged) >= JUDGE_BATCH:
            yield from self._judge()
        if fetched.failure is not None:
            yield from self._fail(fetched.failure, fetched.record.source_version)
        elif fetched.verified is not None:
            yield from self._verified(fetched)
        else:
            yield from self._collected(fetched)

    def _collected(self, fetched: _Fetched) -> Iterator[Any]:
        key, record, result, stored = fetched.key, fetched.record, fetched.result, fetched.stored
        assert result is not None and stored is not None and fetched.inputs is not None
        pipeline = self.pipeline
        options = dict(pipeline.output_storage_options)
        probe = stored.probe
        metadata = {
            "dagster/uri": MetadataValue.path(stored.uri),
            **md.RunwayMetadata(
                state=md.COLLECTED,
                video_uri=md.uri_value(stored.uri, options),
                video_size_bytes=stored.size,
                video_sha256=stored.sha256,
                result_url=MetadataValue.url(redact_url(str(result.video_url))),
                video_codec=probe.codec,
                video_size=f"{probe.width}x{probe.height}",
                video_fps=round(probe.fps, 3),
                video_duration_s=round(probe.duration_s, 3),
                video_frames=probe.frames,
                poster=md.uri_value(pipeline.poster_uri(key), options) if fetched.poster else None,
                poster_preview=MetadataValue.md(fetched.preview) if fetched.preview else None,
                gallery=md.uri_value(gallery_uri(pipeline), options),
                cost_usd=result.cost,
                price_source=catalog.RESULT if result.cost is not None else None,
                package_version=__version__,
                **_timings(result),
            ),
            **_request_lineage(record),
        }
        description = f"Video of request {record.request_id}" + (
            f" ({result.cost:.2f} USD)" if result.cost is not None else ""
        )
        yield AssetMaterialization(
            asset_key=pipeline.videos_key,
            partition=key,
            description=description,
            metadata=md.headline_first(metadata),
            tags=self._provenance(key, record, stored.sha256),
        )
        self.collected.append(key)
        if result.cost is not None:
            self._settle(record, result.cost)
        self._unjudged.append((key, fetched.inputs, True))

    def _verified(self, fetched: _Fetched) -> Iterator[Any]:
        """Record the stored video again, unchanged (same data version), and run its checks again."""
        key, record, video = fetched.key, fetched.record, fetched.verified
        assert video is not None and fetched.inputs is not None
        self.log.info(
            f"{key}: the video of request {record.request_id} is stored and intact; re-recorded unchanged"
        )
        yield AssetMaterialization(
            asset_key=self.pipeline.videos_key,
            partition=key,
            description=f"Verified unchanged: the video of request {record.request_id} is stored and intact.",
            metadata=md.headline_first(
                {**video.raw_metadata, **md.RunwayMetadata(state=md.VERIFIED, verified_unchanged=True)}
            ),
            tags=video.tags,
        )
        self.collected.append(key)
        self._unjudged.append((key, fetched.inputs, False))

    def evaluate_stored(
        self, key: str, video: rec.VideoRecord, record: rec.RequestRecord | None
    ) -> Iterator[Any]:
        """The checks of a stored video, measured now, linked to its latest materialization."""
        self._unjudged.append((key, self._stored_inputs(key, video, record), False))
        yield from self._judge()

    def _stored_inputs(
        self, key: str, video: rec.VideoRecord, record: rec.RequestRecord | None
    ) -> ck.CheckInputs:
        probe, error = None, None
        try:
            probe = probe_video(self.pipeline.video_uri(key), dict(self.pipeline.output_storage_options))
        except (MediaError, OSError) as exc:
            error = str(exc)
        meta = video.metadata
        return self._check_inputs(
            key, record, video.video_sha256, probe, error, asked_of=None if record is not None else meta,
            source_token=meta.get("source_change_token"),
        )  # fmt: skip

    def _check_inputs(
        self,
        key: str,
        record: rec.RequestRecord | None,
        recorded_sha256: str | None,
        probe: VideoProbe | None,
        probe_error: str | None,
        *,
        asked_of: Mapping[str, Any] | None = None,
        source_token: str | None = None,
    ) -> ck.CheckInputs:
        """``asked_of``: the video's metadata, to read the ratio and duration asked from when its request
        is not known."""
        at_rest, at_rest_error = None, None
        try:
            at_rest = sha256_of(self.pipeline.video_uri(key), dict(self.pipeline.output_storage_options))
        except (MediaError, OSError) as exc:
            at_rest_error = str(exc)
        return ck.CheckInputs(
            probe=probe,
            probe_error=probe_error,
            ratio=record.ratio if record is not None else (asked_of or {}).get("ratio"),
            duration_s=record.duration_s if record is not None else (asked_of or {}).get("duration_s"),
            recorded_sha256=recorded_sha256,
            sha256_at_rest=at_rest,
            at_rest_error=at_rest_error,
            source_change_token=source_token
            if source_token is not None
            else (record.metadata.get("source_change_token") if record else None),
            current_change_token=self.current_change_token(key),
            pipeline=self.pipeline,
        )

    def _load_change_tokens(self) -> None:
        """Each partition's image change token now, before the pool's threads read it: one metadata
        request per image, at its recorded path (never a listing)."""
        if self._tokens is None:
            source = self.pipeline.image_source()
            relpaths = recorded_relpaths(self.pipeline, source, self.instance, self.keys)
            tokens = change_tokens(source, relpaths.values())
            self._tokens = {key: tokens.get(relpath) for key, relpath in relpaths.items()}

    def current_change_token(self, key: str) -> str | None:
        self._load_change_tokens()
        assert self._tokens is not None
        return self._tokens.get(key)

    def _judge(self) -> Iterator[Any]:
        """The checks of the videos recorded since the last call, each linked to the materialization it
        judges (looked up for all of them at once: events are stored as they are yielded)."""
        if not self._unjudged:
            return
        unjudged, self._unjudged = self._unjudged, []
        latest = rec.latest_materializations(
            self.instance, self.pipeline.videos_key, [key for key, _, _ in unjudged]
        )
        for key, inputs, this_run in unjudged:
            record = latest.get(key)
            target = None
            if record is not None and not (
                this_run and self.run_id is not None and record.run_id != self.run_id
            ):
                target = _compat.AssetCheckEvaluationTargetMaterializationData(
                    storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
                )
            yield from ck.evaluate(inputs, key, target)

    def _provenance(self, key: str, record: rec.RequestRecord, video_sha256: str) -> dict[str, str]:
        """The video's inputs: its source image (so a changed image shows it stale) and, when deferred, its request."""
        pipeline = self.pipeline
        inputs = {
            pipeline.images_key: (
                str(record.source_version),
                self._image_ids[key]
                if key in self._image_ids
                else rec.latest_image_storage_id(self.instance, pipeline.images_key, key),
            )
        }
        if pipeline.mode == "deferred":
            inputs[pipeline.requests_key] = (record.fingerprint[:16], record.storage_id or None)
        return rec.provenance_tags(inputs, video_sha256[:16])

    def _settle(self, record: rec.RequestRecord, cost: float) -> None:
        journal = jn.Journal(self.pipeline.journal_url, self.pipeline.journal_options)
        with contextlib.suppress(Exception):  # the estimate stays counted: the cap errs on the safe side
            claim = journal.read(record.fingerprint, record.attempt)
            if claim is not None and claim.request_id == record.request_id:
                journal.settle(claim, cost)

    def _intact(self, video: rec.VideoRecord) -> bool:
        try:
            at_rest = sha256_of(
                self.pipeline.video_uri(video.partition), dict(self.pipeline.output_storage_options)
            )
        except (MediaError, OSError):
            return False
        return at_rest == video.video_sha256

    def _fail(self, failure: fl.PartitionFailure, source_version: str | None) -> Iterator[Any]:
        yield from super()._fail(failure, source_version)
        yield from self.explain_checks(failure)

    @classmethod
    def verify(
        cls, pipeline: RunwayPipelineConfig, context: Any, keys: Sequence[str], resource: RunComfyResource
    ) -> Iterator[Any]:
        """The checks alone, on every stored video of ``keys`` (the verify job): nothing is regenerated.
        The videos are read and measured concurrently, ``max_concurrency`` at a time."""
        batch = cls(pipeline, resource, context, keys)
        batch._load_change_tokens()
        videos = rec.latest_videos(batch.instance, pipeline.videos_key, keys)
        deferred = pipeline.mode == "deferred"
        requests = (
            rec.latest_requests(batch.instance, pipeline.requests_key, list(videos)) if deferred else {}
        )
        with ThreadPoolExecutor(
            max_workers=max(1, resource.max_concurrency), thread_name_prefix="verify"
        ) as pool:
            futures = {}
            for key in keys:
                video = videos.get(key)
                if video is None:
                    batch.log.info(f"{key}: no video stored yet; nothing to check")
                    continue
                record = requests.get(key)
                if record is not None and record.request_id != video.request_id:
                    record = None
                futures[pool.submit(batch._stored_inputs, key, video, record)] = key
            for future in as_completed(futures):
                batch._unjudged.append((futures[future], future.result(), False))
                if len(batch._unjudged) >= JUDGE_BATCH:
                    yield from batch._judge()
            yield from batch._judge()

    def explain_checks(self, failure: fl.PartitionFailure) -> Iterator[Any]:
        """The checks of a partition that failed: a video stored before still stands, and its checks run
        again; with no video, every check fails with the partition's reason rather than show as skipped."""
        video = rec.latest_video(self.instance, self.pipeline.videos_key, failure.key)
        if video is not None:
            yield from self.evaluate_stored(failure.key, video, None)
        else:
            yield from ck.no_video(self.pipeline, failure.key, failure.message)


def lineage_tags(record: rec.RequestRecord) -> dict[str, str]:
    """What a video carries of its making when it leaves the pipeline: in its MP4 metadata (``runway_*``
    tags) and in the ``<video>.json`` sidecar beside it. Text only; no secret (the image's path as recorded)."""
    meta = record.metadata
    values = {
        "model": meta.get("model"),
        "prompt_text": record.prompt,
        "prompt_source": meta.get("prompt_source"),
        "seed": record.seed,
        "ratio": record.ratio,
        "duration_s": record.duration_s,
        "source_path": meta.get("source_path"),
        "source_sha256": meta.get("source_sha256"),
        "request_id": record.request_id,
        "fingerprint": record.fingerprint,
        "package_version": __version__,
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def _request_lineage(record: rec.RequestRecord) -> dict[str, Any]:
    """The request's metadata carried onto the video: what was asked, from which image, by which request.
    Each input field once (the request's ``input`` JSON repeats them); the estimate and the spend so far
    stay on the request (the video has its ``cost_usd``)."""
    meta = record.metadata
    values = md.RunwayMetadata(
        request_id=record.request_id,
        fingerprint=record.fingerprint,
        attempt=record.attempt,
        model=meta.get("model"),
        prompt_text=meta.get("prompt_text"),
        prompt_source=meta.get("prompt_source"),
        prompt_warning=meta.get("prompt_warning"),
        ratio=record.ratio,
        duration_s=record.duration_s,
        seed=str(record.seed) if record.seed is not None else None,
        settings_from=meta.get("settings_from"),
        source_path=MetadataValue.path(str(meta.get("source_path"))) if meta.get("source_path") else None,
        source_sha256=meta.get("source_sha256"),
        source_change_token=meta.get("source_change_token"),
        source_version=meta.get("source_version"),
        submitted_at=MetadataValue.timestamp(meta["submitted_at"]) if meta.get("submitted_at") else None,
        spend_cap_usd=meta.get("spend_cap_usd"),
    )
    return dict(**values)


def _timings(result: RequestResult) -> dict[str, Any]:
    def seconds(value: datetime | None) -> float | None:
        return value.timestamp() if value else None

    created, started, finished = (
        seconds(result.created_at),
        seconds(result.started_at),
        seconds(result.finished_at),
    )
    timings: dict[str, Any] = {}
    if started is not None:
        timings["started_at"] = MetadataValue.timestamp(started)
        if created is not None:
            timings["queue_s"] = round(started - created, 3)
    if finished is not None:
        timings["finished_at"] = MetadataValue.timestamp(finished)
        if started is not None:
            timings["render_s"] = round(finished - started, 3)
    return timings


def _poster_markdown(poster_uri: str, storage_options: Mapping[str, Any]) -> str:
    """A thumbnail of the poster inline as a data URI (the UI cannot load a local file), short enough
    for the UI to show it inline (:func:`~dagster_runway.media.probe.poster_markdown`)."""
    with fsspec.open(poster_uri, "rb", **storage_options) as handle:
        return poster_markdown(handle.read())
