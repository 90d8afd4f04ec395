"""Why a partition failed, in classes the status sensor and the user can act on.

Every failure is recorded on its partition (an observation with ``runway/state: failed``, its class,
whether a retry can help, and the next step) and fails the run, so the UI shows it where the user
looks. The status sensor reads the class to decide what happens next: nothing (the user must act),
a new run later (a passing problem), or a paid retry when the user allowed it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dagster import AssetKey, AssetObservation, Failure, MetadataValue

from dagster_runway._redact import redact_url
from dagster_runway.errors import (
    AuthenticationError,
    ClientConfigurationError,
    GenerationFailedError,
    InputValidationError,
    InsufficientCreditsError,
    RateLimitedError,
    RequestCancelledError,
    RequestNotFoundError,
    RunComfyError,
    is_safety_code,
)
from dagster_runway.journal import AMBIGUOUS as CLAIM_AMBIGUOUS
from dagster_runway.journal import Claim, SpendCapReached
from dagster_runway.pipeline import metadata as md

# The classes. "Retried by the status sensor" means it launches a new run on its own.
INVALID_INPUT = "invalid_input"  # the image or its settings break the service's rules; fix the input
MISSING_PROMPT = "missing_prompt"  # no prompt anywhere, and missing_prompt="fail"
IMAGE_MISSING = "image_missing"  # the partition's image was moved or deleted
AMBIGUOUS = "ambiguous"  # a submit may have been billed but its answer was lost; check, then force
SPEND_CAP = "spend_cap"  # the spend cap would be passed; retried when the window frees or the cap is raised
ACCOUNT = "account"  # the token or the credits; fix the account
CONFIGURATION = (
    "configuration"  # base_url cannot be sent to (not a URL, a scheme httpx lacks, a redirect loop)
)
SERVICE_UNAVAILABLE = "service_unavailable"  # the submit provably did not reach the service; retried
GENERATION_SAFETY = "generation_safety"  # a content-safety rejection; change the image or prompt
GENERATION_INTERNAL = "generation_internal"  # the service's own failure; retried if retry_failed_generations
GENERATION_FAILED = "generation_failed"  # any other failed generation
CANCELLED = "cancelled"  # the request was cancelled and refunded (a terminated run); submitted again
EXPIRED = "expired"  # the request expired before its video was collected
NO_REQUEST = "no_request"  # a collect with nothing submitted for the partition
STILL_RUNNING = "still_running"  # a collect gave up waiting; the status sensor collects it later
DOWNLOAD = "download"  # the video could not be fetched or stored for now; retried
BAD_OUTPUT = "bad_output"  # what the service served is not a playable video; retried, then final
RUNS_EXHAUSTED = "runs_exhausted"  # the status sensor's runs for it ended without a result, too often
# Still queued or rendering past max_render_s: cancelled if it was queued; never resubmitted; one still
# rendering is checked every 10 min and collected if it finishes.
RENDER_TIMEOUT = "render_timeout"
JOURNAL_UNSAFE = "journal_unsafe"  # the journal's store cannot create exclusively; nothing is submitted
JOURNAL_DAMAGED = "journal_damaged"  # a journal file is unreadable; repair it as the message says, then run
OUTPUT_MISMATCH = "output_mismatch"  # the output holds another source's videos; nothing is submitted
SCHEMA_DRIFT = (
    "schema_drift"  # the live input schema changed in a way this package cannot send; nothing is submitted
)

# Every class once: what happened, and what happens next. The README's failure table is generated
# from this (``failure_table()``), and tests/test_readme.py keeps the two equal.
CATALOG: tuple[tuple[tuple[str, ...], str, str], ...] = (
    ((INVALID_INPUT, MISSING_PROMPT), "the image or its settings break a rule", "submitted again when the image, sidecar or manifest row changes"),
    ((IMAGE_MISSING,), "the image was moved or deleted", "restore it, or delete the partition"),
    ((AMBIGUOUS,), "a submit may have been billed, its answer lost", "find it in your RunComfy history and `dagster-runway journal adopt` it (or op config `adopt_request_ids`); if there is none, `force_after_ambiguous: true`"),
    ((SPEND_CAP,), "the cap would be passed; nothing sent", "submitted again when the window or the cap allows"),
    ((ACCOUNT,), "bad token, or no credits", "fix the account, run again"),
    ((CONFIGURATION,), "`base_url` cannot be sent to", "fix the resource, run again"),
    ((JOURNAL_UNSAFE,), "the journal's store does not refuse a second exclusive create", "move the journal (`journal`), run again"),
    ((JOURNAL_DAMAGED,), "a journal file is unreadable (truncated or garbled outside the pipeline)", "repair or remove the file the message names, run again"),
    ((OUTPUT_MISMATCH,), "the output's videos were made from another image source (its journal records which); nothing was sent", "give this source its own `output`, or set `adopt_output=True` (the demo: `--adopt-output`); the status sensor submits again then"),
    ((SCHEMA_DRIFT,), "the model's live input schema changed in a way that could make a paid submit fail or behave otherwise; nothing was sent", "upgrade dagster-runway, or accept the named changes (`accept_schema_changes`); the status sensor submits again then, and every hour"),
    ((SERVICE_UNAVAILABLE,), "the submit provably never reached the service, an earlier request could not be checked now (a gateway's 404), or the journal could not be read", "the status sensor submits it again"),
    ((CANCELLED,), "the request was cancelled (a terminated run) and refunded", "the status sensor submits it again"),
    ((GENERATION_SAFETY,), "a content-safety rejection", "change the image or prompt"),
    ((GENERATION_INTERNAL,), "the service's own failure", "resubmitted by the status sensor up to `retry_failed_generations` times (billed each time), else by hand"),
    ((GENERATION_FAILED, EXPIRED), "the request ended without a video", "materialize `runway/requests` for the partition"),
    ((NO_REQUEST,), "a collect ran for a partition with no request", "materialize `runway/requests` for it, or turn on the status sensor"),
    ((DOWNLOAD, BAD_OUTPUT, STILL_RUNNING), "the video could not be stored yet", "the status sensor collects it again"),
    ((RUNS_EXHAUSTED,), "`max_run_attempts` runs ended without a result", "read the last run's log, fix, materialize"),
    ((RENDER_TIMEOUT,), "still queued or rendering past `max_render_s` (cancelled and refunded if it was queued)", "not resubmitted: materialize `runway/requests` to pay for a new try; one still rendering is collected if it finishes"),
)  # fmt: skip


def failure_table() -> str:
    """The README's failure table (markdown), from :data:`CATALOG`."""
    lines = ["| class | what happened | what happens next |", "| --- | --- | --- |"]
    for classes, what, next_step in CATALOG:
        lines.append(f"| {', '.join(f'`{c}`' for c in classes)} | {what} | {next_step} |")
    return "\n".join(lines)


# Classes after which the status sensor launches another run by itself (within max_run_attempts): a new
# submit (nothing was billed, or it was refunded), or a new collect (the video is paid for).
RESUBMITTED_BY_SENSOR = frozenset({SERVICE_UNAVAILABLE, CANCELLED})
RECOLLECTED_BY_SENSOR = frozenset({STILL_RUNNING, DOWNLOAD, BAD_OUTPUT})


@dataclass(frozen=True)
class PartitionFailure:
    """One partition that could not be done: what happened, and what to do."""

    key: str
    failure_class: str
    reason: str
    next_step: str
    retryable: bool = False  # whether trying again can help at all
    failure_code: str | None = None
    request_id: str | None = None
    retry_at: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> str:
        return f"{self.reason} Next step: {self.next_step}"

    def observation(self, asset_key: AssetKey, source_version: str | None) -> AssetObservation:
        values = md.RunwayMetadata(
            state=md.FAILED,
            failure_class=self.failure_class,
            failure_code=self.failure_code,
            retryable=self.retryable,
            next_step=self.next_step,
            request_id=self.request_id,
            source_version=source_version,
            retry_at=MetadataValue.timestamp(self.retry_at) if self.retry_at else None,
        )
        return AssetObservation(
            asset_key=asset_key,
            partition=self.key,
            description=f"Failed: {self.message}",
            metadata=md.headline_first({**values, **self.extra}),
        )


def run_failure(what: str, failures: list[PartitionFailure], total: int) -> Failure:
    """The step failure that lists every failed partition with its class and next step."""
    lines = "\n".join(f"- {f.key} [{f.failure_class}]: {f.message}" for f in failures)
    return Failure(
        description=f"{len(failures)} of {total} partitions could not {what}:\n{lines}",
        metadata={
            "failed_partitions": MetadataValue.json({f.key: f.message for f in failures}),
            "failure_classes": MetadataValue.json({f.key: f.failure_class for f in failures}),
        },
    )


def from_submit_error(key: str, exc: RunComfyError, fingerprint: str) -> PartitionFailure:
    """A submit the service refused, or that never reached it: nothing was billed."""
    if isinstance(exc, AuthenticationError | InsufficientCreditsError):
        return PartitionFailure(
            key, ACCOUNT, str(exc), "fix the account as the message says, then run again."
        )
    if isinstance(exc, ClientConfigurationError):
        return PartitionFailure(
            key, CONFIGURATION, str(exc), "fix the resource's base_url as the message says, then run again."
        )
    if isinstance(exc, InputValidationError):
        return PartitionFailure(
            key,
            INVALID_INPUT,
            str(exc),
            "fix the field the service named (in the image's sidecar, the manifest or the pipeline's "
            "defaults); the partition is submitted again when its image or settings change.",
        )
    if isinstance(exc, RateLimitedError) or exc.retryable:
        return PartitionFailure(
            key,
            SERVICE_UNAVAILABLE,
            f"{exc} It was not accepted (input fingerprint {fingerprint}).",
            "nothing to do: the status sensor submits it again in a later run.",
            retryable=True,
        )
    return PartitionFailure(
        key, SERVICE_UNAVAILABLE, str(exc), "run the partition again later.", retryable=True
    )


def from_result_error(
    key: str, exc: RunComfyError, *, attempt: int, retries_allowed: int
) -> PartitionFailure:
    """A request that ended without a video: failed, cancelled or expired."""
    request_id = exc.request_id
    if isinstance(exc, GenerationFailedError):
        code = exc.failure_code or ""
        if exc.is_safety:
            return PartitionFailure(
                key,
                GENERATION_SAFETY,
                str(exc),
                "change the image or its prompt: the same input would be rejected again. The partition is "
                "submitted again when its image or settings change.",
                failure_code=code,
                request_id=request_id,
            )
        if exc.is_internal:
            left = retries_allowed - (attempt - 1)
            step = (
                f"nothing to do: the status sensor resubmits it (attempt {attempt + 1} of {retries_allowed + 1}; "
                "each attempt is billed)."
                if left > 0
                else "materialize runway/requests for this partition to try again (billed again), or set "
                "retry_failed_generations to let the status sensor retry such failures."
            )
            return PartitionFailure(
                key,
                GENERATION_INTERNAL,
                str(exc),
                step,
                retryable=True,
                failure_code=code,
                request_id=request_id,
            )
        return PartitionFailure(
            key,
            GENERATION_FAILED,
            str(exc),
            "read the message; to try again, materialize runway/requests for this partition (billed again).",
            failure_code=code or None,
            request_id=request_id,
        )
    if isinstance(exc, RequestCancelledError):
        return PartitionFailure(
            key,
            CANCELLED,
            str(exc),
            "it was refunded: the status sensor submits it again (to stop for good, turn the sensor off).",
            retryable=True,
            request_id=request_id,
        )
    if isinstance(exc, RequestNotFoundError):
        return PartitionFailure(
            key,
            EXPIRED,
            f"request {request_id} has expired or is unknown to the service ({exc.message}); its video can no "
            "longer be fetched.",
            "materialize runway/requests for this partition to submit it again (billed again).",
            request_id=request_id,
        )
    return PartitionFailure(
        key,
        DOWNLOAD,
        str(exc),
        "nothing to do: the status sensor collects it again in a later run.",
        retryable=True,
        request_id=request_id,
    )


# -- Named failures: every one a step records, its words in one place -----------------------------------
# Before paying (the submit step).


def never_discovered(key: str, images: AssetKey, source: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        IMAGE_MISSING,
        f"partition {key!r} has no image record in {images.to_user_string()}, so which "
        f"image of {redact_url(source)} it stands for is not known (it was never discovered).",
        "turn on the discovery sensor (it records each image), or delete the partition.",
    )


def image_gone(key: str, source: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        IMAGE_MISSING,
        f"no image in {redact_url(source)} maps to partition {key!r}; it was moved or deleted.",
        "restore the image, or delete the partition.",
    )


def invalid_image(key: str, reason: str) -> PartitionFailure:
    """The image or its settings break the model's rules (found before anything is sent)."""
    return PartitionFailure(
        key,
        INVALID_INPUT,
        reason,
        "fix the image or its settings as the message says; the partition is submitted again when they change.",
    )


def invalid_request(key: str, reason: str) -> PartitionFailure:
    """The image's URL, or the request built from it, breaks the model's schema."""
    return PartitionFailure(key, INVALID_INPUT, reason, "fix the image or settings as the message says.")


def missing_prompt(key: str, url: str, default_prompt: str) -> PartitionFailure:
    stem = url.rsplit(".", 1)[0]
    return PartitionFailure(
        key,
        MISSING_PROMPT,
        f"{url}: no prompt is given, and the service's default prompt is a specific scene "
        f'("{default_prompt[:70]}..."); nothing was submitted.',
        f"give a prompt in a sidecar ({stem}.txt), a manifest row (promptText), or the pipeline's "
        'defaults (GenerationSettings(prompt_text=...)); or set missing_prompt="service_default" to accept '
        'the default, or "warn".',
    )


def not_adopted(
    key: str, request_id: str, why: str, failure_class: str = AMBIGUOUS, retryable: bool = False
) -> PartitionFailure:
    return PartitionFailure(
        key,
        failure_class,
        f"could not adopt request {request_id[:40]!r}: {why}",
        "correct adopt_request_ids as the message says (see `dagster-runway journal list`); nothing was "
        "submitted for this partition.",
        retryable=retryable,
    )


def adopted_failed(key: str, request_id: str | None, verdict: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        GENERATION_FAILED,
        f"adopted request {request_id} {verdict}.",
        "materialize the partition again to submit a new attempt (billed).",
        request_id=request_id,
    )


def earlier_unchecked(key: str, request_id: str, exc: Exception) -> PartitionFailure:
    return PartitionFailure(
        key,
        SERVICE_UNAVAILABLE,
        f"could not check earlier request {request_id} of this input: {exc}",
        "nothing to do: it is checked again in a later run.",
        retryable=True,
        request_id=request_id,
    )


def earlier_failed(key: str, request_id: str, code: str | None, message: str | None) -> PartitionFailure:
    """An earlier request of this exact input failed in a way a resubmit would repeat (and pay for)."""
    return PartitionFailure(
        key,
        GENERATION_SAFETY if is_safety_code(code) else GENERATION_FAILED,
        f"earlier request {request_id} of this exact input failed ({code or 'no code'}: "
        f"{message or 'no message'}); submitting it again would most likely fail again and be billed.",
        "change the image or its prompt, or run with config force_resubmit: true to pay for another try.",
        failure_code=code,
        request_id=request_id,
    )


def ambiguous(key: str, claim: Claim, seed: int | None) -> PartitionFailure:
    """A submit of this input may have been accepted and billed, and its answer is not known."""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(claim.claimed_at))
    lost = (
        "its answer was lost"
        if claim.state == CLAIM_AMBIGUOUS
        else "its sender stopped before an answer arrived"
    )
    made = f"a request made around {when}" + (f" with seed {seed}" if seed is not None else "")
    return PartitionFailure(
        key,
        AMBIGUOUS,
        f"a submit of this exact input (fingerprint {claim.fingerprint}, attempt {claim.attempt}) was sent by "
        f"{claim.owner.describe()} at {when}, and {lost}: it may have been accepted and billed. "
        + (f"({claim.reason}) " if claim.reason else ""),
        f"look in your RunComfy generations for {made}; if there is none, or you accept paying twice, run "
        "this partition with config force_after_ambiguous: true.",
        extra={md.key("fingerprint"): claim.fingerprint, md.key("attempt"): claim.attempt},
    )


def output_mismatch(key: str, reason: str, fix: str) -> PartitionFailure:
    return PartitionFailure(key, OUTPUT_MISMATCH, f"{reason} Nothing was sent.", fix)


def journal_unsafe(key: str, exc: Exception) -> PartitionFailure:
    return PartitionFailure(
        key, JOURNAL_UNSAFE, str(exc), "move the journal as the message says, then run again."
    )


def journal_damaged(key: str, exc: Exception, path: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        JOURNAL_DAMAGED,
        f"{exc}; nothing was sent.",
        f"repair or remove {path} as the message says, then run the partition again.",
    )


def journal_unavailable(key: str, journal_url: str, exc: Exception) -> PartitionFailure:
    return PartitionFailure(
        key,
        SERVICE_UNAVAILABLE,
        f"the submission journal at {redact_url(journal_url)} could not be read or written "
        f"({type(exc).__name__}: {exc}); nothing was sent.",
        "check access to the journal's storage; the partition is tried again in a later run.",
        retryable=True,
    )


def schema_drift(key: str, reason: str, fix: str, changes: list[str], retry_at: float) -> PartitionFailure:
    return PartitionFailure(
        key,
        SCHEMA_DRIFT,
        reason,
        fix + " The status sensor looks again every hour.",
        retryable=True,
        retry_at=retry_at,
        extra={md.key("schema_changes"): MetadataValue.json(changes)},
    )


def spend_cap(key: str, exc: SpendCapReached) -> PartitionFailure:
    waits = " or wait; the status sensor submits it again when the window allows." if exc.retry_at else "."
    return PartitionFailure(
        key,
        SPEND_CAP,
        str(exc).split(" Raise ")[0],
        "raise max_spend_usd" + waits,
        retryable=True,
        retry_at=exc.retry_at,
        extra={md.key("spend_cap_usd"): exc.cap_usd, md.key("spend_usd"): round(exc.spent_usd, 4)},
    )


_TRIED_AGAIN = "nothing to do: it is tried again in a later run."
_REPORT = "nothing to do: it is tried again in a later run; if it persists, report this message."


def worker_stopped(key: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        SERVICE_UNAVAILABLE,
        "the submit worker stopped before this submit was sent; nothing was billed.",
        _TRIED_AGAIN,
        retryable=True,
    )


def other_run_rejected(key: str, reason: str | None) -> PartitionFailure:
    return PartitionFailure(
        key,
        SERVICE_UNAVAILABLE,
        f"another run's submit of this input was not accepted ({reason}).",
        _TRIED_AGAIN,
        retryable=True,
    )


def failed_before_claim(key: str, cause: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        SERVICE_UNAVAILABLE,
        f"the submit failed before it was claimed ({cause}); nothing was sent or billed.",
        _REPORT,
        retryable=True,
    )


def failed_before_post(key: str, cause: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        SERVICE_UNAVAILABLE,
        f"the submit failed before it was sent ({cause}); nothing was billed.",
        _REPORT,
        retryable=True,
    )


def stopped_before_send(key: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        CANCELLED,
        "the run was stopped before this submit was sent; nothing was billed.",
        "run the partition again.",
        retryable=True,
    )


# Collecting (the videos step).


def no_request(key: str) -> PartitionFailure:
    return PartitionFailure(
        key,
        NO_REQUEST,
        "no request has been submitted for this partition yet.",
        "materialize runway/requests for it (or turn on the status sensor, which submits it).",
    )


def still_running(key: str, request_id: str, waited_s: float) -> PartitionFailure:
    return PartitionFailure(
        key,
        STILL_RUNNING,
        f"request {request_id} was still rendering after {waited_s:.0f}s.",
        "nothing to do: the status sensor collects it when it finishes (or materialize this partition again "
        "later).",
        retryable=True,
        request_id=request_id,
    )


def bad_output(key: str, request_id: str, exc: Exception) -> PartitionFailure:
    return PartitionFailure(
        key,
        BAD_OUTPUT,
        f"request {request_id}: {exc}",
        "nothing to do: the status sensor collects it again; if it keeps failing, report the request id to "
        "RunComfy.",
        retryable=True,
        request_id=request_id,
    )


def download_failed(key: str, request_id: str, exc: Exception, next_step: str) -> PartitionFailure:
    return PartitionFailure(
        key, DOWNLOAD, f"request {request_id}: {exc}", next_step, retryable=True, request_id=request_id
    )


# The status sensor.


def render_timeout(
    key: str, request_id: str, reason: str, next_step: str, submitted_at: float, estimate: Any
) -> PartitionFailure:
    return PartitionFailure(
        key,
        RENDER_TIMEOUT,
        reason,
        next_step,
        request_id=request_id,
        extra={
            md.key("submitted_at"): MetadataValue.timestamp(submitted_at),
            **({md.key("estimated_cost_usd"): float(estimate)} if isinstance(estimate, int | float) else {}),
        },
    )


def runs_exhausted(key: str, where: str, launched: int, request_id: str | None) -> PartitionFailure:
    asset = "runway/requests" if where == "submit" else "runway/videos"
    return PartitionFailure(
        key,
        RUNS_EXHAUSTED,
        f"{launched} {where} runs launched for this partition ended without recording a result.",
        f"look at the last {where} run of this partition in the Runs tab for the cause; fix it, then "
        f"materialize {asset} for this partition.",
        request_id=request_id,
    )
