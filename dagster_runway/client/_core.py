"""The request core shared by the sync and async clients.

Each API call is a generator that yields actions (``Send`` a request, ``Sleep`` a while) and is sent
back their outcomes. It applies every rule: what to send, what is safe to retry, how long to wait
(``dagster_runway.retry``), and which error an answer maps to (``_errors``). The two clients only
carry the actions out, with ``httpx.Client`` or ``httpx.AsyncClient``, ``time.sleep`` or
``asyncio.sleep``. So both behave the same by construction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from dagster_runway._redact import redact_text
from dagster_runway.client._errors import effective_status, error_for, failure_error
from dagster_runway.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    InputValidationError,
    RateLimitedError,
    RunComfyError,
    ServerError,
    TransportError,
    WaitTimeoutError,
)
from dagster_runway.retry import RETRYABLE_STATUS, RetryPolicy
from dagster_runway.schema import (
    MODEL_ID,
    CancelResult,
    ImageToVideoInput,
    RequestResult,
    RequestState,
    RequestStatus,
    Submission,
)
from dagster_runway.version import __version__

logger = logging.getLogger("dagster_runway.client")

DEFAULT_BASE_URL = "https://model-api.runcomfy.net"
USER_AGENT = f"dagster-runway/{__version__}"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True)
class Sleep:
    seconds: float


Action = Send | Sleep
Outcome = httpx.Response | httpx.TransportError | None
Call = Generator[Action, Outcome, T]


def input_fingerprint(model_id: str, body: Mapping[str, Any]) -> str:
    """sha256 over the model id and the canonical JSON of the input body."""
    canonical = json.dumps({"model_id": model_id, "input": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class RequestCore:
    """Builds requests and turns answers into models or typed errors. Holds no connection."""

    def __init__(
        self,
        *,
        api_token: str,
        base_url: str = DEFAULT_BASE_URL,
        model_id: str = MODEL_ID,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not api_token:
            raise AuthenticationError(
                "No RunComfy API token was given; set RUNCOMFY_API_TOKEN or pass api_token "
                "(get a key from your RunComfy profile)."
            )
        self._token = api_token
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id.strip("/")
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"RequestCore(base_url={self.base_url!r}, model_id={self.model_id!r})"

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._token}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }

    def redact(self, text: str) -> str:
        return redact_text(text, [self._token])

    # -- the four calls ------------------------------------------------------------------------

    def submit(
        self, input: ImageToVideoInput | Mapping[str, Any], fingerprint: str | None = None
    ) -> Call[Submission]:
        model = input if isinstance(input, ImageToVideoInput) else self._validate_input(input)
        body = model.to_request()
        path = "/v1/models/" + "/".join(quote(part, safe="") for part in self.model_id.split("/"))
        request = httpx.Request("POST", self.base_url + path, json=body)
        fingerprint = fingerprint or input_fingerprint(self.model_id, body)
        return self._call(request, Submission, idempotent=False, what="submit", fingerprint=fingerprint)

    def status(self, request_id: str) -> Call[RequestStatus]:
        request = httpx.Request("GET", self._request_url(request_id, "status"))
        return self._call(request, RequestStatus, idempotent=True, what="status", request_id=request_id)

    def result(self, request_id: str, *, include_cost: bool = True) -> Call[RequestResult]:
        url = self._request_url(request_id, "result")
        request = httpx.Request("GET", url, params={"include_cost": "true"} if include_cost else None)
        return self._call(request, RequestResult, idempotent=True, what="result", request_id=request_id)

    def cancel(self, request_id: str) -> Call[CancelResult]:
        # Cancel is safe to repeat: a second cancel of the same request is a no-op.
        request = httpx.Request("POST", self._request_url(request_id, "cancel"))
        return self._call(request, CancelResult, idempotent=True, what="cancel", request_id=request_id)

    def _validate_input(self, input: Mapping[str, Any]) -> ImageToVideoInput:
        """The input as the model, or an ``InputValidationError`` naming the field; nothing is sent."""
        try:
            return ImageToVideoInput.model_validate(input)
        except ValidationError as exc:
            aliases = {name: field.alias or name for name, field in ImageToVideoInput.model_fields.items()}
            errors = []
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else None
                errors.append((aliases.get(name, name) if name else None, error))
            # Only pydantic's messages, never the values: a promptImage may be a presigned URL.
            problems = "; ".join(f"{field or 'input'}: {e['msg']}" for field, e in errors[:3])
            raise InputValidationError(
                f"The input for {self.model_id} breaks its schema ({problems}). Fix the input; nothing was "
                "sent or billed.",
                field=errors[0][0] if errors else None,
                detail=[{"loc": [field], "msg": e["msg"], "type": e["type"]} for field, e in errors],
            ) from None

    def _request_url(self, request_id: str, action: str) -> str:
        if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
            raise InputValidationError(
                f"request_id {str(request_id)[:40]!r} is not 1-128 characters of letters, digits, '_' or '-'; "
                "pass the request_id that submit returned.",
                field="request_id",
            )
        return f"{self.base_url}/v1/requests/{request_id}/{action}"

    # -- the retry loop ------------------------------------------------------------------------

    def _call(
        self,
        request: httpx.Request,
        model: type[BaseModel],
        *,
        idempotent: bool,
        what: str,
        request_id: str | None = None,
        fingerprint: str | None = None,
    ) -> Call[Any]:
        request.headers.update(self.headers)
        policy = self.retry
        started = time.monotonic()
        target = f"request {request_id}" if request_id else f"model {self.model_id}"
        attempt = 0
        while True:
            attempt += 1
            outcome = yield Send(request)
            assert outcome is not None
            retry_after: float | None = None
            if isinstance(outcome, httpx.TransportError):
                never_connected = isinstance(
                    outcome, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                )
                cause = f"{type(outcome).__name__}: {self.redact(str(outcome)) or 'no detail'}"
                if not idempotent and not never_connected:
                    raise AmbiguousSubmitError(
                        f"The submit to {self.model_id} may have been accepted and billed: the connection failed "
                        f"after the request was sent ({cause}). It was not resubmitted. Look for a request with "
                        f"input fingerprint {fingerprint} before submitting again.",
                        fingerprint=fingerprint,
                        cause=cause,
                    )
                error: RunComfyError = TransportError(
                    f"Could not complete {what} for {target} at {self.base_url}: {cause}. Check the network "
                    "and base_url; the call is safe to repeat.",
                    request_id=request_id,
                )
            else:
                try:
                    return self._parse(outcome, model, what=what, target=target, request_id=request_id)
                except RateLimitedError as exc:
                    error, retry_after = exc, exc.retry_after
                except ServerError as exc:
                    if not idempotent:
                        raise AmbiguousSubmitError(
                            f"The submit to {self.model_id} may have been accepted and billed: {exc.message} "
                            f"It was not resubmitted. Look for a request with input fingerprint {fingerprint} "
                            "before submitting again.",
                            fingerprint=fingerprint,
                            cause=exc.message,
                            status_code=exc.status_code,
                            error_code=exc.error_code,
                        ) from None
                    if effective_status(outcome.status_code, exc.error_code) not in RETRYABLE_STATUS:
                        raise
                    error = exc

            delay = policy.next_delay(attempt, time.monotonic() - started, retry_after, self._rng)
            if delay is None:
                raise error
            logger.info(
                "RunComfy %s for %s failed (%s); retry %d of %d in %.2fs",
                what,
                target,
                type(error).__name__,
                attempt,
                policy.max_attempts - 1,
                delay,
            )
            yield Sleep(delay)

    def _parse(
        self,
        response: httpx.Response,
        model: type[BaseModel],
        *,
        what: str,
        target: str,
        request_id: str | None,
    ) -> Any:
        status = response.status_code
        try:
            body: Any = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if 200 <= status < 300 and isinstance(body, dict) and body.get("error_code") is None:
            try:
                return model.model_validate(body)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
                raise ServerError(
                    f"RunComfy answered {what} for {target} with an unexpected body ({problems}). The API may "
                    "have changed: upgrade dagster-runway, or report this message.",
                    status_code=status,
                    request_id=request_id,
                ) from None
        raise error_for(
            response, body, what=what, target=target, request_id=request_id, model_id=self.model_id, redact=self.redact
        )


def run_sync(call: Call[T], send: Callable[[httpx.Request], httpx.Response]) -> T:
    """Drive a call with a blocking transport."""
    outcome: Outcome = None
    try:
        while True:
            action = call.send(outcome)
            if isinstance(action, Sleep):
                time.sleep(action.seconds)
                outcome = None
                continue
            try:
                outcome = send(action.request)
                outcome.read()
            except httpx.TransportError as exc:
                outcome = exc
    except StopIteration as done:
        return done.value


def wait_call(
    core: RequestCore,
    request_id: str,
    *,
    timeout: float,
    poll_interval: float,
    on_update: Callable[[RequestStatus], None] | None = None,
    cancel_on_timeout: bool = False,
    rng: random.Random | None = None,
) -> Call[RequestResult]:
    """Poll until the request finishes; return its result if it succeeded, else raise its error.

    The deadline is on the monotonic clock. Each pause is ``poll_interval`` with +/-20% jitter, so
    many waiters do not poll in lock step. Passing errors (connection, 429, 5xx) after their own
    retries do not end the wait while time remains.
    """
    rng = rng or random.Random()
    started = time.monotonic()
    deadline = started + timeout
    last_state: str | None = None
    while True:
        try:
            status = yield from core.status(request_id)
            last_state = status.status.value
            if on_update is not None:
                on_update(status)
            if status.status.is_terminal:
                result = yield from core.result(request_id)
                last_state = result.status.value
                if not result.status.is_pending:
                    error = failure_error(result)
                    if error is not None:
                        raise error
                    return result
        except RunComfyError as exc:
            if not exc.retryable or time.monotonic() >= deadline:
                raise
            logger.warning(
                "Polling request %s failed for now (%s); polling on", request_id, type(exc).__name__
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if cancel_on_timeout and last_state == RequestState.IN_QUEUE.value:
                cancelled = yield from core.cancel(request_id)
                last_state = "cancelled" if cancelled.cancelled else last_state
            waited = time.monotonic() - started
            raise WaitTimeoutError(
                f"Request {request_id} did not finish within {timeout:.0f}s (last state: {last_state}). It may "
                "still finish: wait on it again with the same request_id rather than submitting again.",
                request_id=request_id,
                last_state=last_state,
                waited_s=waited,
            )
        yield Sleep(min(remaining, poll_interval * rng.uniform(0.8, 1.2)))
