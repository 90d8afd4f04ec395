"""Validate, reuse or submit: the only place where credits are spent.

For each partition: find its image and prepare it (:mod:`.prepare`: validate it to the last pixel,
resolve its settings, hash it, compute the fingerprint of the generation). Then the journal decides, before anything is paid:

- an earlier request of the same fingerprint (this partition's, or a copy's) is reused, unless it
  failed for a reason a retry can help, or was cancelled or lost;
- a claim that another live run holds is waited for, then reused;
- a claim whose answer was lost is ambiguous: the partition fails until the user forces a submit;
- otherwise the next attempt is claimed (with its estimated cost, against the spend cap) and sent.

Submits run concurrently on the async client in a worker thread. Each answer is written to the
journal by the worker the moment it arrives, then yielded as an asset event by the step, so a kill
at any point leaves either a journal entry with the request id or a claim flagged ambiguous.

Each plan's outcome (answer, ambiguous, rejected, failure) is decided on its own: nothing one plan
raises leaves its task, so it can neither cancel another's submit nor hide an answer that arrived. An
answer the journal could not record is still yielded (the event log keeps the request id, and a later
run repairs the journal from it); an unexpected error is judged by how far its plan got (before the
POST: nothing billed; during it: ambiguous). If the worker itself dies, every plan it left without an
outcome is failed and the step raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dagster import AssetMaterialization, AssetObservation, Failure, MetadataValue

from dagster_runway import journal as jn
from dagster_runway._redact import redact_text, redact_url
from dagster_runway.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    ClientConfigurationError,
    InsufficientCreditsError,
    RequestNotFoundError,
    RunComfyError,
    is_internal_code,
)
from dagster_runway.media import (
    ImageSource,
    MediaError,
    service_image_url,
)
from dagster_runway.media.lookup import lookup
from dagster_runway.pipeline import catalog
from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline import metadata as md
from dagster_runway.pipeline import records as rec
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.prepare import Prepared, prepare, recorded_relpaths
from dagster_runway.pipeline.step import Step
from dagster_runway.resource import RunComfyResource
from dagster_runway.schema import RequestState, Submission

SCHEMA_RECHECK_S = (
    3600.0  # after a schema_drift refusal, the status sensor submits (and reads the catalog) again
)


@dataclass
class Plan:
    """One submit to make."""

    prepared: Prepared
    model_input: dict[str, Any]  # the body, checked against the model's schema
    image_url: str
    attempt: int


@dataclass
class Progress:
    """How far one plan's submit got: what an unexpected error, or a dead worker, is judged by."""

    claim: jn.Claim | None = None  # claimed in the journal
    sending: bool = False  # the POST may have been sent (a dead worker's plan is then ambiguous)
    request_id: str | None = None  # the answer arrived


@dataclass(frozen=True)
class Ready:
    """A partition whose request is known: submitted now, or reused."""

    prepared: Prepared
    claim: jn.Claim

    @property
    def request_id(self) -> str:
        assert self.claim.request_id is not None
        return self.claim.request_id


class SubmitBatch(Step):
    """The submit step for a set of partitions; ``run()`` yields its events as they happen."""

    def __init__(
        self,
        pipeline: RunwayPipelineConfig,
        resource: RunComfyResource,
        context: Any,
        keys: Sequence[str],
        *,
        force_after_ambiguous: bool = False,
        force_resubmit: bool = False,
        adopt_request_ids: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(pipeline, resource, context, keys)
        self.failure_key = pipeline.submit_key
        self.force_after_ambiguous = force_after_ambiguous
        self.force_resubmit = force_resubmit
        self.adopt_request_ids = dict(adopt_request_ids or {})
        self.journal = jn.Journal(pipeline.journal_url, pipeline.journal_options)
        self.owner = jn.Owner.current(self.run_id)
        self.ready: dict[str, Ready] = {}
        self.answered: dict[str, jn.Claim] = {}  # every request this run received an answer for, by id
        self._lock = threading.Lock()
        self._progress: dict[str, Progress] = {}  # by partition key, written by the worker
        self._stopped_by: fl.PartitionFailure | None = None  # the failure every submit would meet
        self._worker_error: BaseException | None = None
        self.price = catalog.Price(
            catalog.ESTIMATE, pipeline.estimated_usd_per_second, why_estimate="not read yet"
        )

    @property
    def cap(self) -> jn.SpendCap | None:
        pipeline = self.pipeline
        if pipeline.max_spend_usd is None:
            return None
        window = pipeline.spend_window_h * 3600 if pipeline.spend_window_h else None
        return jn.SpendCap(pipeline.max_spend_usd, window)

    @property
    def claim_timeout_s(self) -> float:
        """Longer than any submit can take: past this, a claim with no answer has no live sender."""
        resource = self.resource
        return resource.retry_deadline + resource.request_timeout + resource.connect_timeout + 30

    # The step

    def run(self) -> Iterator[AssetMaterialization | AssetObservation]:
        pipeline = self.pipeline
        source = pipeline.image_source(self.resource.model)
        # Each image as it is now, from its recorded path: a few metadata requests each, never a listing.
        relpaths = recorded_relpaths(pipeline, source, self.instance, self.keys)
        entries = lookup(source, relpaths.values())
        plans: list[Plan] = []
        for key in self.keys:
            relpath = relpaths.get(key)
            if relpath is None:
                yield from self._fail(fl.never_discovered(key, pipeline.images_key, pipeline.source), None)
                continue
            entry = entries.get(relpath)
            if entry is None:
                yield from self._fail(fl.image_gone(key, pipeline.source), None)
                continue
            try:
                prepared = prepare(pipeline, source, key, entry)
            except (MediaError, ValueError) as exc:
                version = rec.image_version(entry.change_token, entry.sidecar_token, entry.settings_token)
                yield from self._fail(fl.invalid_image(key, str(exc)), version)
                continue
            missing = self._missing_prompt(prepared)
            if isinstance(missing, fl.PartitionFailure):
                yield from self._fail(missing, prepared.source_version)
                continue
            if missing is not None:
                prepared = replace(prepared, prompt_warning=missing)
            yield from self._decide(prepared, source, plans)
        if plans:
            yield from self._submit(plans)

    def _missing_prompt(self, prepared: Prepared) -> fl.PartitionFailure | str | None:
        """What the missing_prompt policy says of a partition with no prompt: its failure ("fail"), a
        warning to log and record on the partition ("warn"), or None (a prompt is given, or the service's
        default is accepted)."""
        model = prepared.model
        if model.prompt_field is None or model.prompt_of(prepared.fields) is not None:
            return None  # a model that takes no prompt, or a prompt given
        if self.pipeline.missing_prompt == "service_default":
            return None
        default = model.default_prompt or ""
        if self.pipeline.missing_prompt == "warn":
            warning = (
                f"no prompt is given for {prepared.entry.url}; the service's default prompt applies: "
                f'"{default[:60]}..."'
            )
            self.log.warning(f"{prepared.key}: {warning}")
            return warning
        return fl.missing_prompt(prepared.key, prepared.entry.url, default)

    def _decide(self, prepared: Prepared, source: ImageSource, plans: list[Plan]) -> Iterator[Any]:
        """Reuse, wait, fail or plan a submit for one partition, from its fingerprint's journal entries."""
        key, fingerprint = prepared.key, prepared.fingerprint
        try:
            latest = self.journal.latest(fingerprint)
            if latest is not None and latest.state == jn.CLAIMED:
                latest = self._settle_open_claim(prepared, latest)
        except Exception as exc:  # noqa: BLE001 - storage errors: fail this partition, pay nothing
            yield from self._fail(self._journal_error(prepared, exc), prepared.source_version)
            return
        if key in self.adopt_request_ids:
            yield from self._adopt(prepared, latest)
            return
        next_attempt = 1
        if latest is not None:
            next_attempt = latest.attempt + 1
            if latest.state == jn.SUBMITTED:
                verdict = self._reuse_verdict(prepared, latest)
                if verdict is None:
                    yield self._record(Ready(prepared, latest), md.REUSED)
                    return
                if isinstance(verdict, fl.PartitionFailure):
                    yield from self._fail(verdict, prepared.source_version)
                    return
                self.log.info(
                    f"{key}: earlier request {latest.request_id} {verdict}; submitting attempt {next_attempt}"
                )
            elif latest.state in (jn.AMBIGUOUS, jn.CLAIMED) and not self.force_after_ambiguous:
                yield from self._fail(self._ambiguous(prepared, latest), prepared.source_version)
                return
        try:
            image_url = service_image_url(
                source.fs,
                prepared.entry.path,
                presign_expires_s=self.pipeline.presign_expires_s,
                public_base_url=self.pipeline.public_base_url,
                relpath=prepared.entry.relpath,
                pin=prepared.pin,  # the bytes that were hashed: their data URI, or the S3 version read
            )
            model_input = prepared.model.request(image_url, prepared.fields)
        except (MediaError, ValueError) as exc:
            yield from self._fail(fl.invalid_request(key, str(exc)), prepared.source_version)
            return
        plans.append(Plan(prepared, model_input, image_url, next_attempt))

    def _adopt(self, prepared: Prepared, claim: jn.Claim | None) -> Iterator[Any]:
        """The operator found this ambiguous attempt's request in their RunComfy history: attach it, once
        the service confirms it knows the id, then reuse it like any submitted request (collected, never
        paid again). An entry for a partition with nothing ambiguous fails it before paying."""
        request_id = self.adopt_request_ids[prepared.key]

        def refused(
            why: str, failure_class: str = fl.AMBIGUOUS, retryable: bool = False
        ) -> fl.PartitionFailure:
            return fl.not_adopted(prepared.key, request_id, why, failure_class, retryable)

        if claim is not None and claim.state == jn.SUBMITTED and claim.request_id == request_id:
            yield from self._reuse_adopted(prepared, claim)  # adopted already (a retried or re-executed run)
            return
        if claim is None or claim.state not in (jn.AMBIGUOUS, jn.CLAIMED):
            state = "never submitted" if claim is None else f"{claim.state} (attempt {claim.attempt})"
            yield from self._fail(
                refused(f"this partition's input is {state}, not ambiguous: there is nothing to adopt; remove it "
                        "from adopt_request_ids."),
                prepared.source_version,
            )  # fmt: skip
            return
        try:
            adopted = self.journal.adopt(
                claim.fingerprint,
                claim.attempt,
                request_id,
                note=f"op config adopt_request_ids of run {self.run_id}",
                verify=self._known_to_service,
            )
        except RequestNotFoundError:
            yield from self._fail(
                refused("the service does not know it (mistyped, another account's, or expired); the attempt stays "
                        "ambiguous."),
                prepared.source_version,
            )  # fmt: skip
            return
        except RunComfyError as exc:
            yield from self._fail(
                refused(f"it could not be checked with the service now ({exc}); the attempt stays ambiguous.",
                        fl.SERVICE_UNAVAILABLE, retryable=True),
                prepared.source_version,
            )  # fmt: skip
            return
        except jn.JournalError as exc:
            yield from self._fail(refused(f"{exc}."), prepared.source_version)
            return
        self.log.info(
            f"{prepared.key}: adopted request {request_id} for attempt {claim.attempt}; nothing billed"
        )
        yield from self._reuse_adopted(prepared, adopted)

    def _reuse_adopted(self, prepared: Prepared, adopted: jn.Claim) -> Iterator[Any]:
        request_id = adopted.request_id
        verdict = self._reuse_verdict(prepared, adopted)
        if verdict is None:
            yield self._record(Ready(prepared, adopted), md.REUSED)
        elif isinstance(verdict, fl.PartitionFailure):
            yield from self._fail(verdict, prepared.source_version)
        else:
            yield from self._fail(
                fl.adopted_failed(prepared.key, request_id, verdict), prepared.source_version
            )

    def _known_to_service(self, request_id: str) -> None:
        """Raises ``RequestNotFoundError`` if the service never issued ``request_id`` (or it expired)."""
        self.resource.get_client().status(request_id)

    def _settle_open_claim(self, prepared: Prepared, claim: jn.Claim) -> jn.Claim:
        """A claim with no answer yet: wait while its owner may still answer; else repair it from the
        event log if the answer was recorded there; else it stays open (ambiguous)."""
        remaining = max(0.0, self.claim_timeout_s - (time.time() - claim.claimed_at))
        if remaining > 0 and self._owner_alive(claim.owner):
            self.log.info(
                f"{prepared.key}: {claim.owner.describe()} is submitting this input now; waiting for its answer"
            )
        claim = jn.wait_for_answer(self.journal, claim, owner_alive=self._owner_alive, timeout_s=remaining)
        if claim.state != jn.CLAIMED:
            return claim
        recorded = rec.latest_request(self.instance, self.pipeline.submit_key, prepared.key)
        if (
            recorded is not None
            and recorded.fingerprint == claim.fingerprint
            and recorded.attempt == claim.attempt
        ):
            try:
                return self.journal.record_submitted(claim, recorded.request_id)
            except Exception as exc:  # noqa: BLE001 - the event log has the answer: reuse it all the same
                self.log.warning(
                    f"{prepared.key}: could not repair the journal's claim with request {recorded.request_id} "
                    f"from the event log ({type(exc).__name__}: {exc}); reusing it, and repairing it next time."
                )
                return replace(
                    claim, state=jn.SUBMITTED, request_id=recorded.request_id, answered_at=recorded.timestamp
                )
        return claim

    def _owner_alive(self, owner: jn.Owner) -> bool:
        """Whether a claim's owner may still be sending: its process runs, or its run is not finished."""
        if owner.process_alive() is False:
            return False
        if owner.run_id:
            run = self.instance.get_run_by_id(owner.run_id)
            if run is not None and run.is_finished:
                return False
        return True

    def _reuse_verdict(self, prepared: Prepared, claim: jn.Claim) -> None | str | fl.PartitionFailure:
        """``None`` to reuse the claim's request, a reason to submit a new attempt, or a failure."""
        request_id = claim.request_id
        assert request_id is not None
        video = rec.latest_video(self.instance, self.pipeline.videos_key, prepared.key)
        if video is not None and video.request_id == request_id:
            return None  # collected already: it succeeded
        client = self.resource.get_client()
        try:
            status = client.status(request_id).status
            if status.is_pending:
                return None
            if status is RequestState.CANCELLED:
                return "was cancelled (refunded)"
            result = client.result(request_id, include_cost=False)
        except RequestNotFoundError:
            return "has expired at the service"
        except RunComfyError as exc:
            return fl.earlier_unchecked(prepared.key, request_id, exc)
        if result.status in (RequestState.SUCCEEDED, RequestState.COMPLETED):
            return None
        if result.status is RequestState.CANCELLED:
            return "was cancelled (refunded)"
        if is_internal_code(result.failure_code) or self.force_resubmit:
            return f"failed ({result.failure_code or 'no code'})"
        return fl.earlier_failed(prepared.key, request_id, result.failure_code, result.failure_message)

    def _ambiguous(self, prepared: Prepared, claim: jn.Claim) -> fl.PartitionFailure:
        return fl.ambiguous(prepared.key, claim, prepared.model.seed_of(prepared.fields))

    def _journal_error(self, prepared: Prepared, exc: Exception) -> fl.PartitionFailure:
        if isinstance(exc, jn.SourceMismatch):
            return fl.output_mismatch(prepared.key, exc.reason, exc.fix)
        if isinstance(exc, jn.JournalStoreUnsafe):
            return fl.journal_unsafe(prepared.key, exc)
        if isinstance(exc, jn.JournalDamaged):
            return fl.journal_damaged(prepared.key, exc, exc.path)
        return fl.journal_unavailable(prepared.key, self.pipeline.journal_url, exc)

    # Submitting

    def _submit(self, plans: list[Plan]) -> Iterator[Any]:
        pipeline = self.pipeline
        try:
            self.journal.verify_store()  # once per journal root and process: its exclusive create holds
            before = self.journal.bind_output(pipeline.output, pipeline.source, adopt=pipeline.adopt_output)
        except Exception as exc:  # noqa: BLE001 - an unsafe or unreachable store, another source's output
            for plan in plans:
                yield from self._fail(self._journal_error(plan.prepared, exc), plan.prepared.source_version)
            return
        if before is not None:
            self.log.warning(
                f"{redact_url(pipeline.output)} held videos of {redact_url(before)}; adopted for "
                f"{redact_url(pipeline.source)} (adopt_output): the old source's videos stay in it unmanaged."
            )
        # Once per run: the price of every claim below, and the schema the inputs are checked against.
        view = catalog.read(self.resource, pipeline.estimated_usd_per_second, pipeline.accept_schema_changes)
        if (refused := view.refusal()) is not None:
            reason, fix = refused
            changes = [change.id for change in view.breaking]
            for plan in plans:
                failure = fl.schema_drift(
                    plan.prepared.key, reason, fix, changes, time.time() + SCHEMA_RECHECK_S
                )
                yield from self._fail(failure, plan.prepared.source_version)
            return
        self.price = view.price
        out: queue.Queue[tuple[str, Plan, Any] | None] = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(
            target=self._worker, args=(plans, out, stop), name="runway-submit", daemon=True
        )
        worker.start()
        decided: set[str] = set()
        try:
            while (item := out.get()) is not None:
                outcome, plan, value = item
                prepared = plan.prepared
                decided.add(prepared.key)
                if outcome == "submitted":
                    yield self._record(Ready(prepared, value), md.SUBMITTED, plan.image_url)
                elif outcome == "taken":
                    yield from self._taken(prepared, value)
                else:
                    yield from self._fail(value, prepared.source_version)
        finally:
            # On every exit (an interrupt included), let submits in flight finish: each answer is then in
            # the journal and in ``answered``, so that it can be cancelled or reused.
            stop.set()
            worker.join(timeout=self.claim_timeout_s)  # a submit's retries included
        undecided = [plan for plan in plans if plan.prepared.key not in decided]
        for plan in undecided:
            yield from self._undecided(plan)
        if self._worker_error is not None or undecided:
            error = self._worker_error
            raise Failure(
                description="The submit worker stopped"
                + (f" with {type(error).__name__}: {self._redact(str(error))}" if error is not None else "")
                + f"; {len(undecided)} of {len(plans)} submits got no outcome from it and were failed on their "
                "partitions (an answer that had arrived was recorded). Read the run's log; the next run "
                "decides them from the journal and never pays twice for one.",
                metadata={
                    "undecided_partitions": MetadataValue.json([plan.prepared.key for plan in undecided])
                },
            )

    def _undecided(self, plan: Plan) -> Iterator[Any]:
        """A plan the worker left without an outcome: record what its progress shows."""
        prepared = plan.prepared
        progress = self._progress.get(prepared.key, Progress())
        claim = progress.claim
        if claim is not None and progress.request_id is not None:
            submitted = replace(
                claim, state=jn.SUBMITTED, request_id=progress.request_id, answered_at=time.time()
            )
            with contextlib.suppress(
                Exception
            ):  # the event log gets it below; a later run repairs the journal
                submitted = self.journal.record_submitted(claim, progress.request_id)
            yield self._record(Ready(prepared, submitted), md.SUBMITTED, plan.image_url)
        elif claim is not None and progress.sending:
            yield from self._fail(self._ambiguous(prepared, claim), prepared.source_version)
        else:
            if claim is not None:
                with contextlib.suppress(
                    Exception
                ):  # left open, a later run reports it ambiguous: still safe
                    self.journal.record_rejected(claim, "not sent: the submit worker stopped")
            yield from self._fail(fl.worker_stopped(prepared.key), prepared.source_version)

    def _redact(self, text: str) -> str:
        return redact_text(text, [str(self.resource.api_token or "")])

    def _taken(self, prepared: Prepared, claim: jn.Claim) -> Iterator[Any]:
        """Another run claimed the same attempt first: reuse its answer, or report it ambiguous."""
        try:
            claim = self._settle_open_claim(prepared, claim) if claim.state == jn.CLAIMED else claim
        except Exception as exc:  # noqa: BLE001 - storage errors: fail this partition, pay nothing
            yield from self._fail(self._journal_error(prepared, exc), prepared.source_version)
            return
        if claim.state == jn.SUBMITTED:
            self.log.info(
                f"{prepared.key}: {claim.owner.describe()} submitted this input first; reusing its request"
            )
            yield self._record(Ready(prepared, claim), md.REUSED)
        elif claim.state == jn.REJECTED:
            yield from self._fail(fl.other_run_rejected(prepared.key, claim.reason), prepared.source_version)
        else:
            yield from self._fail(self._ambiguous(prepared, claim), prepared.source_version)

    def _worker(self, plans: list[Plan], out: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            asyncio.run(self._submit_all(plans, out, stop))
        except BaseException as exc:  # noqa: BLE001 - reported by the step, which raises
            self._worker_error = exc
        finally:
            out.put(None)

    async def _submit_all(self, plans: list[Plan], out: queue.Queue[Any], stop: threading.Event) -> None:
        slots = asyncio.Semaphore(self.resource.max_concurrency)
        async with self.resource.get_async_client() as client:

            async def one(plan: Plan) -> None:
                async with slots:
                    out.put(await self._isolated(client, plan, stop))

            # ``_isolated`` returns an outcome for every plan and raises nothing, so no plan's error can
            # cancel another's submit; the step fails every plan that got no outcome all the same.
            await asyncio.gather(*(one(plan) for plan in plans), return_exceptions=True)

    async def _isolated(self, client: Any, plan: Plan, stop: threading.Event) -> tuple[str, Plan, Any]:
        """The plan's outcome, whatever happens while it is claimed, sent and recorded."""
        progress = self._progress.setdefault(plan.prepared.key, Progress())
        try:
            return await self._claim_and_send(client, plan, stop, progress)
        except Exception as exc:  # noqa: BLE001 - judged by how far the plan got; it never leaves the task
            return await self._unexpected(plan, progress, exc)

    async def _unexpected(self, plan: Plan, progress: Progress, exc: Exception) -> tuple[str, Plan, Any]:
        """An error nobody planned for, judged by the plan's progress: before its claim nothing was sent;
        an answer that arrived is kept; in between, the POST may have been sent, so it is ambiguous."""
        prepared, claim = plan.prepared, progress.claim
        cause = f"{type(exc).__name__}: {self._redact(str(exc)) or 'no detail'}"
        self.log.error(f"{prepared.key}: unexpected error while submitting ({cause})")
        if claim is None:
            return "failed", plan, fl.failed_before_claim(prepared.key, cause)
        if progress.request_id is not None:
            return (
                "submitted",
                plan,
                replace(claim, state=jn.SUBMITTED, request_id=progress.request_id, answered_at=time.time()),
            )
        if not progress.sending:
            reason = f"not sent: the submit failed before its POST ({cause})"
            await self._answer(prepared, self.journal.record_rejected, claim, jn.REJECTED, reason)
            return "failed", plan, fl.failed_before_post(prepared.key, cause)
        reason = f"the submit failed unexpectedly after it may have been sent ({cause})"
        claim = await self._answer(prepared, self.journal.record_ambiguous, claim, jn.AMBIGUOUS, reason)
        return "failed", plan, self._ambiguous(prepared, claim)

    async def _answer(
        self, prepared: Prepared, write: Any, claim: jn.Claim, state: str, reason: str
    ) -> jn.Claim:
        """Record a submit's outcome on its claim. If the journal cannot, the claim stays open there, which
        a later run reports ambiguous: never paid again. Returns the claim as it now stands."""
        try:
            answered: jn.Claim = await asyncio.to_thread(write, claim, reason)
            return answered
        except Exception as exc:  # noqa: BLE001 - the outcome still reaches the event log
            self.log.error(
                f"{prepared.key}: the journal could not record that this submit was {state} ({type(exc).__name__}: "
                f"{exc}); its claim may stay open, and later runs report an open claim ambiguous rather than paying again."
            )
            return replace(claim, state=state, reason=reason, answered_at=time.time())

    def _not_sent(self, prepared: Prepared) -> fl.PartitionFailure:
        """Why a plan is not sent once the submits were stopped."""
        stopped_by = self._stopped_by
        if stopped_by is not None:
            return replace(
                stopped_by,
                key=prepared.key,
                reason=f"not sent: another submit of this run failed as every one would ({stopped_by.reason}); "
                "nothing was billed for this one.",
            )
        return fl.stopped_before_send(prepared.key)

    async def _claim_and_send(
        self, client: Any, plan: Plan, stop: threading.Event, progress: Progress
    ) -> tuple[str, Plan, Any]:
        """Claim the attempt, send it, and journal the answer the moment it arrives."""
        prepared, journal = plan.prepared, self.journal
        if stop.is_set():
            return "failed", plan, self._not_sent(prepared)
        estimate = self.price.estimate_usd(prepared.estimate_usd_seconds)
        try:
            claim = await asyncio.to_thread(
                journal.claim,
                prepared.fingerprint,
                plan.attempt,
                partition=prepared.key,
                owner=self.owner,
                estimate_usd=estimate,
                input=prepared.fields,
                cap=self.cap,
            )
        except jn.ClaimTaken as taken:
            current = taken.claim or await asyncio.to_thread(journal.read, prepared.fingerprint, plan.attempt)
            if current is None:
                vanished = RuntimeError(f"the claim {journal.where(journal.claim_path(prepared.fingerprint, plan.attempt))} "
                                        "was taken by another writer and then removed")  # fmt: skip
                return "failed", plan, self._journal_error(prepared, vanished)
            return "taken", plan, current
        except jn.SpendCapReached as exc:
            return "failed", plan, fl.spend_cap(prepared.key, exc)
        except Exception as exc:  # noqa: BLE001 - the claim could not be written: send nothing
            return "failed", plan, self._journal_error(prepared, exc)
        progress.claim = claim
        if stop.is_set():
            failure = self._not_sent(prepared)
            await self._answer(
                prepared, journal.record_rejected, claim, jn.REJECTED, f"not sent: {failure.reason}"
            )
            return "failed", plan, failure
        progress.sending = True
        try:
            submission: Submission = await client.submit(plan.model_input, fingerprint=prepared.fingerprint)
        except AmbiguousSubmitError as exc:
            claim = await self._answer(prepared, journal.record_ambiguous, claim, jn.AMBIGUOUS, exc.message)
            return "failed", plan, self._ambiguous(prepared, claim)
        except RunComfyError as exc:
            failure = fl.from_submit_error(prepared.key, exc, prepared.fingerprint)
            if isinstance(exc, AuthenticationError | InsufficientCreditsError | ClientConfigurationError):
                self._stopped_by = failure
                stop.set()  # every other submit would fail the same way
            await self._answer(prepared, journal.record_rejected, claim, jn.REJECTED, exc.message)
            return "failed", plan, failure
        progress.request_id = submission.request_id
        with self._lock:
            self.answered[submission.request_id] = claim
        try:
            claim = await asyncio.to_thread(journal.record_submitted, claim, submission.request_id)
        except Exception as exc:  # noqa: BLE001 - the event log still gets it; the journal is repaired from it
            self.log.error(
                f"{prepared.key}: request {submission.request_id} was submitted but the journal could not record "
                f"it ({type(exc).__name__}: {exc}); it is recorded in the event log, and the journal is repaired "
                "from there."
            )
            claim = replace(
                claim, state=jn.SUBMITTED, request_id=submission.request_id, answered_at=time.time()
            )
        return "submitted", plan, claim

    # Records

    def _record(
        self, ready: Ready, state: str, image_url: str | None = None
    ) -> AssetMaterialization | AssetObservation:
        """The request's record: a materialization of the requests asset (an observation of the videos
        asset in blocking mode) carrying the request id and the full input."""
        prepared, claim = ready.prepared, ready.claim
        self.ready[prepared.key] = ready
        if state == md.REUSED:
            self.log.info(
                f"{prepared.key}: reusing request {ready.request_id} (same fingerprint); nothing billed"
            )
        spend = None
        with contextlib.suppress(Exception):
            spend = self.journal.spent_usd(self.cap.window_s if self.cap else None)
        metadata = {
            **md.RunwayMetadata(
                state=state,
                request_id=ready.request_id,
                attempt=claim.attempt,
                submitted_at=MetadataValue.timestamp(claim.answered_at or claim.claimed_at),
                estimated_cost_usd=claim.estimate_usd,
                price_source=self.price.source
                if state == md.SUBMITTED
                else None,  # a reused claim's run priced it
                spend_usd=spend,
                spend_cap_usd=self.pipeline.max_spend_usd,
                prompt_image=redact_url(image_url) if image_url else None,
                journal_entry=self.journal.claim_path(claim.fingerprint, claim.attempt),
            ),
            **prepared.metadata(),
        }
        description = (
            f"Submitted request {ready.request_id}."
            if state == md.SUBMITTED
            else f"Reused request {ready.request_id} of the same input; nothing was billed."
        )
        if self.pipeline.mode == "blocking":
            return AssetObservation(
                asset_key=self.pipeline.videos_key,
                partition=prepared.key,
                description=description,
                metadata=metadata,
            )
        images_key = self.pipeline.images_key
        return AssetMaterialization(
            asset_key=self.pipeline.requests_key,
            partition=prepared.key,
            description=description,
            metadata=md.headline_first(metadata),
            tags=rec.provenance_tags(
                {
                    images_key: (
                        prepared.source_version,
                        rec.latest_image_storage_id(self.instance, images_key, prepared.key),
                    )
                },
                prepared.fingerprint[:16],
            ),
        )

    def cancel_submitted(self) -> list[str]:
        """Cancel every request this run received an answer for that is still queued (best effort),
        and count it as refunded in the journal. Returns the cancelled ids."""
        with self._lock:
            answered = dict(self.answered)
        cancelled = []
        client = self.resource.get_client()
        for request_id, claim in answered.items():
            try:
                if client.cancel(request_id).cancelled:
                    cancelled.append(request_id)
                    self.journal.settle(claim, 0.0)
            except RunComfyError as exc:
                self.log.warning(f"Could not cancel request {request_id}: {exc}")
        return cancelled
