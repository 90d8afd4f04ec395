"""Validate, reuse or submit: the only place where credits are spent.

For each partition: find the image, validate it from its header, resolve its settings, hash it,
and compute the fingerprint of the generation. A live or finished request with the same
fingerprint is reused. Otherwise the image is submitted, concurrently with the async client, and
each request id is yielded as an asset event the moment it arrives, so that it is durable in the
event log before anything else can fail.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import AssetMaterialization, AssetObservation, MetadataValue

from dagster_runway._redact import redact_url
from dagster_runway.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    InsufficientCreditsError,
    RequestNotFoundError,
    RunComfyError,
)
from dagster_runway.media import (
    ImageEntry,
    ImageSource,
    MediaError,
    content_sha256,
    service_image_url,
    validate_image,
)
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipeline
from dagster_runway.resource import RunComfyResource
from dagster_runway.schema import ImageToVideoInput, RequestState, Submission
from dagster_runway.version import __version__


@dataclass(frozen=True)
class Prepared:
    """One partition, checked and ready to submit."""

    key: str
    entry: ImageEntry
    width: int
    height: int
    image_format: str
    sha256: str
    fields: dict[str, Any]
    fingerprint: str
    settings_sources: tuple[str, ...]

    def metadata(self) -> dict[str, Any]:
        """Lineage of the input: what goes to the service, from which file."""
        return {
            rec.FINGERPRINT: self.fingerprint,
            rec.INPUT: MetadataValue.json(self.fields),
            "runway/prompt_text": self.fields.get("promptText", "(service default)"),
            "runway/ratio": self.fields["ratio"],
            "runway/duration_s": self.fields["duration"],
            "runway/seed": self.fields["seed"],
            "runway/settings_from": ", ".join(self.settings_sources),
            rec.SOURCE_PATH: MetadataValue.path(self.entry.url),
            rec.SOURCE_SHA256: self.sha256,
            rec.SOURCE_CHANGE_TOKEN: self.entry.change_token,
            rec.SOURCE_VERSION: rec.image_version(self.entry.change_token, self.entry.sidecar_token),
            "runway/source_size_bytes": self.entry.size,
            "runway/source_pixels": f"{self.width}x{self.height} {self.image_format}",
            "runway/package_version": __version__,
        }


@dataclass(frozen=True)
class PartitionFailure:
    key: str
    reason: str
    kind: str  # "invalid_input", "ambiguous", "api", "not_found"


def resolve_entries(source: ImageSource, keys: Sequence[str]) -> dict[str, ImageEntry]:
    """The source entry of each key (one listing of the source)."""
    wanted = set(keys)
    return {entry.partition_key: entry for entry in source.list() if entry.partition_key in wanted}


def prepare(
    pipeline: RunwayPipeline, source: ImageSource, key: str, entry: ImageEntry, model_id: str
) -> Prepared:
    """Check one image and settle its input. Raises ``MediaError`` naming the file, the rule and the fix."""
    info = validate_image(source.fs, entry.path, size=entry.size)
    sha256 = content_sha256(source.fs, entry.path)
    settings = source.settings_for(entry, image_size=(info.width, info.height), content_sha256=sha256)
    fields = settings.request_fields()
    return Prepared(
        key=key,
        entry=entry,
        width=info.width,
        height=info.height,
        image_format=info.format,
        sha256=sha256,
        fields=fields,
        fingerprint=rec.fingerprint(model_id, sha256, fields),
        settings_sources=tuple(settings.sources),
    )


def submission_metadata(
    prepared: Prepared, submission: Submission, submitted_at: float, image_url: str, model_id: str
) -> dict[str, Any]:
    return {
        rec.REQUEST_ID: submission.request_id,
        rec.STATE: rec.SUBMITTED,
        rec.SUBMITTED_AT: MetadataValue.timestamp(submitted_at),
        "runway/model": model_id,
        "runway/prompt_image": redact_url(image_url),
        **prepared.metadata(),
    }


def _submit_concurrently(
    resource: RunComfyResource,
    jobs: list[tuple[Prepared, ImageToVideoInput]],
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Submit every job with the async client; put ``(prepared, submission | error, time)`` on ``out``."""

    async def main() -> None:
        async with resource.get_async_client() as client:

            async def one(prepared: Prepared, model_input: ImageToVideoInput) -> None:
                if stop.is_set():
                    return
                try:
                    submission = await client.submit(model_input)
                    out.put((prepared, submission, time.time()))
                except RunComfyError as exc:
                    if isinstance(exc, AuthenticationError | InsufficientCreditsError):
                        stop.set()  # every other submit would fail the same way
                    out.put((prepared, exc, time.time()))

            await asyncio.gather(*(one(p, i) for p, i in jobs))

    try:
        asyncio.run(main())
    finally:
        out.put(None)


class SubmitBatch:
    """Runs the submit step for a set of partitions and yields its events as they happen."""

    def __init__(
        self,
        pipeline: RunwayPipeline,
        resource: RunComfyResource,
        context: Any,
        keys: Sequence[str],
        *,
        force_after_ambiguous: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.resource = resource
        self.instance = context.instance
        self.log = context.log
        self.keys = list(keys)
        self.force_after_ambiguous = force_after_ambiguous
        self.failures: list[PartitionFailure] = []
        self.ready: dict[str, tuple[Prepared, str]] = {}  # key -> (prepared, request_id)
        self.submitted_ids: list[str] = []

    def run(self) -> Iterator[AssetMaterialization | AssetObservation]:
        pipeline, key_ = self.pipeline, self.pipeline.submit_key
        source = pipeline.source()
        entries = resolve_entries(source, self.keys)
        jobs: list[tuple[Prepared, ImageToVideoInput]] = []
        urls: dict[str, str] = {}
        for key in self.keys:
            entry = entries.get(key)
            if entry is None:
                self._fail(
                    key,
                    f"no image in {redact_url(pipeline.source_url)} maps to partition {key!r}; "
                    "it was moved or deleted. Restore it, or delete the partition.",
                    "not_found",
                )
                continue
            try:
                prepared = prepare(pipeline, source, key, entry, self.resource.model_id)
            except (MediaError, ValueError) as exc:
                self._fail(key, str(exc), "invalid_input")
                continue
            previous = rec.latest_request_record(self.instance, key_, key)
            if previous is not None and previous.fingerprint == prepared.fingerprint:
                if previous.state == rec.AMBIGUOUS and not self.force_after_ambiguous:
                    self._fail(
                        key,
                        "an earlier submit of this exact input may have been accepted and billed (its answer was "
                        "lost). Check your RunComfy generations; to submit anyway, run again with config "
                        "force_after_ambiguous: true.",
                        "ambiguous",
                    )
                    continue
                reusable = previous.request_id and previous.state != rec.AMBIGUOUS
                if reusable:
                    try:
                        reusable = self._reusable(previous.request_id)
                    except RunComfyError as exc:
                        self._fail(
                            key, f"could not check earlier request {previous.request_id}: {exc}", "api"
                        )
                        continue
                if reusable:
                    self.log.info(
                        f"{key}: reusing request {previous.request_id} (same fingerprint); nothing billed"
                    )
                    self.ready[key] = (prepared, previous.request_id)
                    yield AssetObservation(
                        asset_key=key_,
                        partition=key,
                        description="Reused an earlier request with the same fingerprint; nothing was billed.",
                        metadata={
                            rec.REQUEST_ID: previous.request_id,
                            rec.STATE: rec.REUSED,
                            rec.FINGERPRINT: prepared.fingerprint,
                        },
                    )
                    continue
            try:
                image_url = service_image_url(
                    source.fs,
                    entry.path,
                    presign_expires_s=pipeline.presign_expires_s,
                    public_base_url=pipeline.public_base_url,
                    relpath=entry.relpath,
                )
            except MediaError as exc:
                self._fail(key, str(exc), "invalid_input")
                continue
            try:
                model_input = ImageToVideoInput.model_validate({"promptImage": image_url, **prepared.fields})
            except ValueError as exc:
                self._fail(key, f"{entry.url}: the input breaks the model's schema: {exc}", "invalid_input")
                continue
            urls[key] = image_url
            jobs.append((prepared, model_input))

        if jobs:
            yield from self._submit(jobs, urls)

    def _submit(self, jobs: list[tuple[Prepared, ImageToVideoInput]], urls: dict[str, str]):
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(
            target=_submit_concurrently,
            args=(self.resource, jobs, out, stop),
            name="runway-submit",
            daemon=True,
        )
        worker.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    break
                prepared, answer, at = item
                key = prepared.key
                if isinstance(answer, Submission):
                    self.submitted_ids.append(answer.request_id)
                    self.ready[key] = (prepared, answer.request_id)
                    metadata = submission_metadata(prepared, answer, at, urls[key], self.resource.model_id)
                    yield self._record(key, metadata, f"Submitted request {answer.request_id}.")
                elif isinstance(answer, AmbiguousSubmitError):
                    self._fail(key, str(answer), "ambiguous")
                    yield AssetObservation(
                        asset_key=self.pipeline.submit_key,
                        partition=key,
                        description=str(answer),
                        metadata={
                            rec.STATE: rec.AMBIGUOUS,
                            rec.FINGERPRINT: prepared.fingerprint,
                            rec.SUBMITTED_AT: MetadataValue.timestamp(at),
                        },
                    )
                else:
                    self._fail(key, str(answer), "api")
            for prepared, _ in jobs:
                if prepared.key not in self.ready and not any(f.key == prepared.key for f in self.failures):
                    self._fail(
                        prepared.key,
                        "not submitted: an earlier submit in this run failed for the whole "
                        "account (authentication or credits); fix that and run again.",
                        "api",
                    )
        finally:
            stop.set()
            worker.join(timeout=30)

    def _reusable(self, request_id: str) -> bool:
        """Whether an earlier request can stand for this one: still running, or finished well.

        A failed, cancelled or expired request is not reused: running the partition again is how a
        user asks for a new attempt.
        """
        client = self.resource.get_client()
        try:
            status = client.status(request_id).status
            if status.is_pending:
                return True
            if status is RequestState.CANCELLED:
                return False
            return client.result(request_id, include_cost=False).status in (
                RequestState.SUCCEEDED,
                RequestState.COMPLETED,
            )
        except RequestNotFoundError:
            return False

    def _record(self, key: str, metadata: dict, description: str) -> AssetMaterialization | AssetObservation:
        """Deferred mode materializes the requests asset; blocking mode observes the videos asset."""
        if self.pipeline.mode == "deferred":
            prepared = self.ready[key][0]
            images_key = self.pipeline.images_key
            return AssetMaterialization(
                asset_key=self.pipeline.requests_key,
                partition=key,
                description=description,
                metadata=metadata,
                tags=rec.provenance_tags(
                    {
                        images_key: (
                            rec.image_version(prepared.entry.change_token, prepared.entry.sidecar_token),
                            rec.latest_observation_storage_id(self.instance, images_key, key),
                        )
                    },
                    prepared.fingerprint[:16],
                ),
            )
        return AssetObservation(
            asset_key=self.pipeline.videos_key, partition=key, description=description, metadata=metadata
        )

    def _fail(self, key: str, reason: str, kind: str) -> None:
        self.log.error(f"{key}: {reason}")
        self.failures.append(PartitionFailure(key, reason, kind))

    def cancel_submitted(self) -> list[str]:
        """Cancel this batch's requests that are still queued (best effort). Returns the cancelled ids."""
        cancelled = []
        client = self.resource.get_client()
        for request_id in self.submitted_ids:
            try:
                if client.cancel(request_id).cancelled:
                    cancelled.append(request_id)
            except RunComfyError as exc:
                self.log.warning(f"Could not cancel request {request_id}: {exc}")
        return cancelled
