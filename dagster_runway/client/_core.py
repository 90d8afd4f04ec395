"""The request core shared by the sync and async clients.

Each API call is a generator that yields actions (``Send`` a request, ``Sleep`` a while) and is sent
back their outcomes: an answer, or the ``httpx.HTTPError`` the send raised (every kind of it). It
applies every rule: what to send, what is safe to retry, how long to wait (``dagster_runway.retry``),
and which typed error an answer or an ``httpx`` error maps to (``_errors``); no ``httpx`` exception
leaves a call. The two clients only carry the actions out, with ``httpx.Client`` or
``httpx.AsyncClient``, ``time.sleep`` or ``asyncio.sleep``. So both behave the same by construction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from dagster_runway._redact import redact_text
from dagster_runway.client._catalog import ModelInfo, ModelPage
from dagster_runway.client._errors import describe_body, effective_status, error_for, failure_error
from dagster_runway.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    ClientConfigurationError,
    InputValidationError,
    RateLimitedError,
    RunComfyError,
    ServerError,
    TransportError,
    UnexpectedResponseError,
    WaitTimeoutError,
)
from dagster_runway.models import find_model
from dagster_runway.retry import RETRYABLE_STATUS, RetryPolicy
from dagster_runway.schema import (
    MODEL_ID,
    REQUEST_ID_PATTERN,
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

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True)
class Sleep:
    seconds: float


Action = Send | Sleep
Outcome = httpx.Response | httpx.HTTPError | None
Call = Generator[Action, Outcome, T]

# Errors raised before any byte of the request was written: a submit that met one was not accepted.
# httpcore raises ProxyError when the proxy refuses the tunnel, before the request is sent through it.
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)


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
        if any(ord(char) < 32 or ord(char) == 127 for char in api_token):
            raise AuthenticationError(
                "The RunComfy API token contains a control character (a newline or tab pasted with it?); it "
                "cannot be sent in a header. Set RUNCOMFY_API_TOKEN to the key alone."
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

    # -- the calls -----------------------------------------------------------------------------

    def submit(
        self, input: ImageToVideoInput | Mapping[str, Any], fingerprint: str | None = None
    ) -> Call[Submission]:
        body = input.to_request() if isinstance(input, ImageToVideoInput) else self._checked_body(input)
        request = self._request("POST", self._model_url(self.model_id), json=body)
        fingerprint = fingerprint or input_fingerprint(self.model_id, body)
        return self._call(request, Submission, idempotent=False, what="submit", fingerprint=fingerprint)

    def model(self, model_id: str | None = None) -> Call[ModelInfo]:
        """The catalog's entry of ``model_id`` (by default the client's model): its price and input schema."""
        model_id = self.model_id if model_id is None else _check_model_id(model_id)
        request = self._request("GET", self._model_url(model_id))
        return self._call(request, ModelInfo, idempotent=True, what="model lookup", model_id=model_id)

    def models(
        self,
        *,
        limit: int | None = None,
        offset: int | None = None,
        search: str | None = None,
        category: str | None = None,
    ) -> Call[ModelPage]:
        """One page of the catalog; only the parameters given are sent (the service has its defaults)."""
        for name, value, low in (("limit", limit, 1), ("offset", offset, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputValidationError(
                    f"{name}={value!r} must be a whole number of {low} or more; nothing was sent.", field=name
                )
        given = {"limit": limit, "offset": offset, "search": search, "category": category}
        params = {name: str(value) for name, value in given.items() if value is not None}
        request = self._request("GET", self.base_url + "/v1/models", params=params)
        return self._call(request, ModelPage, idempotent=True, what="model listing", target="the catalog")

    def status(self, request_id: str) -> Call[RequestStatus]:
        request = self._request("GET", self._request_url(request_id, "status"))
        return self._call(request, RequestStatus, idempotent=True, what="status", request_id=request_id)

    def result(self, request_id: str, *, include_cost: bool = True) -> Call[RequestResult]:
        url = self._request_url(request_id, "result")
        request = self._request("GET", url, params={"include_cost": "true"} if include_cost else None)
        return self._call(request, RequestResult, idempotent=True, what="result", request_id=request_id)

    def cancel(self, request_id: str) -> Call[CancelResult]:
        # Cancel is safe to repeat: a second cancel of the same request is a no-op.
        request = self._request("POST", self._request_url(request_id, "cancel"))
        return self._call(request, CancelResult, idempotent=True, what="cancel", request_id=request_id)

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Request:
        try:
            return httpx.Request(method, url, **kwargs)
        except httpx.InvalidURL as exc:
            raise ClientConfigurationError(
                f"base_url {self.base_url!r} does not make a valid URL ({exc}); nothing was sent. Set base_url "
                f"to the Model API's address, e.g. {DEFAULT_BASE_URL}."
            ) from None

    def _checked_body(self, input: Mapping[str, Any]) -> dict[str, Any]:
        """The body to send, checked against the model's schema when this package knows the model (its
        ``ModelSpec``), else sent as given for the service to judge; an ``InputValidationError`` naming
        the field, and nothing sent, when it breaks the schema."""
        if not isinstance(input, Mapping):
            raise InputValidationError(
                f"The input for {self.model_id} must be a mapping of field names to values, got "
                f"{type(input).__name__}. Nothing was sent or billed.",
                field=None,
                detail=[],
            )
        spec = find_model(self.model_id)
        if spec is None:
            return dict(input)
        errors = spec.problems(input)
        if errors:
            # Only the schema's messages, never the values: an image URL may be a presigned URL.
            problems = "; ".join(f"{field or 'input'}: {message}" for field, message, _ in errors[:3])
            raise InputValidationError(
                f"The input for {self.model_id} breaks its schema ({problems}). Fix the input; nothing was "
                "sent or billed.",
                field=errors[0][0],
                detail=[{"loc": [field], "msg": message, "type": kind} for field, message, kind in errors],
            )
        if spec.input_model is not None:
            return spec.input_model.model_validate(input).model_dump(
                by_alias=True, exclude_unset=True, mode="json"
            )
        return dict(input)

    def _model_url(self, model_id: str) -> str:
        # The id's slashes stay separators; each segment is escaped (as RunComfy's own code does).
        return self.base_url + "/v1/models/" + "/".join(quote(part, safe="") for part in model_id.split("/"))

    def _request_url(self, request_id: str, action: str) -> str:
        if not isinstance(request_id, str) or not REQUEST_ID_PATTERN.match(request_id):
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
        model_id: str | None = None,
        target: str | None = None,
    ) -> Call[Any]:
        request.headers.update(self.headers)
        policy = self.retry
        started = time.monotonic()
        model_id = model_id or self.model_id
        target = target or (f"request {request_id}" if request_id else f"model {model_id}")
        attempt = 0
        while True:
            attempt += 1
            outcome = yield Send(request)
            assert outcome is not None
            retry_after: float | None = None
            if isinstance(outcome, httpx.HTTPError):
                error = self._http_error(
                    outcome,
                    idempotent=idempotent,
                    what=what,
                    target=target,
                    request_id=request_id,
                    fingerprint=fingerprint,
                )
            else:
                try:
                    return self._parse(
                        outcome, model, what=what, target=target, request_id=request_id, model_id=model_id
                    )
                except RateLimitedError as exc:
                    error, retry_after = exc, exc.retry_after
                except ServerError as exc:
                    if not idempotent:
                        raise self._ambiguous(fingerprint, exc.message, exc) from None
                    # An answer that is not the API's (a gateway's page, a garbled body) is retried like a 502.
                    retryable = isinstance(exc, UnexpectedResponseError) or (
                        effective_status(outcome.status_code, exc.error_code) in RETRYABLE_STATUS
                    )
                    if not retryable:
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

    def _http_error(
        self,
        exc: httpx.HTTPError,
        *,
        idempotent: bool,
        what: str,
        target: str,
        request_id: str | None,
        fingerprint: str | None,
    ) -> RunComfyError:
        """The typed error of an ``httpx`` error, to retry; raised at once when it must not be retried."""
        cause = f"{type(exc).__name__}: {self.redact(str(exc)) or 'no detail'}"
        if isinstance(exc, httpx.UnsupportedProtocol):
            raise ClientConfigurationError(
                f"Could not {what} for {target}: base_url {self.base_url!r} uses a scheme httpx does not speak "
                f"({cause}); nothing was sent. Use an http:// or https:// base_url."
            ) from None
        if not idempotent and not isinstance(exc, NEVER_SENT):
            happened = (
                "its answer arrived but cannot be decoded"
                if isinstance(exc, httpx.DecodingError)
                else "the connection failed after the request was sent"
            )
            raise self._ambiguous(fingerprint, f"{happened} ({cause}).", None) from None
        if isinstance(exc, httpx.DecodingError):
            return UnexpectedResponseError(
                f"RunComfy answered {what} for {target} with a body that cannot be decoded ({cause}): a proxy "
                "or gateway mangled it. The call was retried; run again later, and check any proxy in between "
                "if it persists.",
                request_id=request_id,
            )
        if isinstance(exc, httpx.TooManyRedirects):
            raise ClientConfigurationError(
                f"RunComfy {what} for {target} was redirected in a loop ({cause}). The Model API does not "
                "redirect; check base_url and any proxy in between.",
                request_id=request_id,
            ) from None
        return TransportError(
            f"Could not complete {what} for {target} at {self.base_url}: {cause}. Check the network "
            "and base_url; the call is safe to repeat.",
            request_id=request_id,
        )

    def _ambiguous(
        self, fingerprint: str | None, what_happened: str, exc: RunComfyError | None
    ) -> AmbiguousSubmitError:
        return AmbiguousSubmitError(
            f"The submit to {self.model_id} may have been accepted and billed: {what_happened} It was not "
            f"resubmitted. Look for a request with input fingerprint {fingerprint} before submitting again.",
            fingerprint=fingerprint,
            cause=exc.message if exc is not None else what_happened,
            status_code=exc.status_code if exc is not None else None,
            error_code=exc.error_code if exc is not None else None,
        )

    def _parse(
        self,
        response: httpx.Response,
        model: type[BaseModel],
        *,
        what: str,
        target: str,
        request_id: str | None,
        model_id: str,
    ) -> Any:
        status = response.status_code
        try:
            body: Any = response.json()
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond reason
            body = None
        if 200 <= status < 300 and not (isinstance(body, dict) and body.get("error_code") is not None):
            where = f"RunComfy answered {what} for {target} with HTTP {status}"
            advice = (
                "A proxy or gateway may have answered instead of the API, or the API changed: check base_url "
                "and any proxy in between, or upgrade dagster-runway."
            )
            if not isinstance(body, dict):
                raise UnexpectedResponseError(
                    f"{where} but a body that is not a JSON object ({self.redact(describe_body(response))}). "
                    + advice,
                    status_code=status,
                    request_id=request_id,
                )
            try:
                return model.model_validate(body)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
                raise UnexpectedResponseError(
                    f"{where} but an unexpected body ({self.redact(problems)}). " + advice,
                    status_code=status,
                    request_id=request_id,
                ) from None
        raise error_for(
            response,
            body,
            what=what,
            target=target,
            request_id=request_id,
            model_id=model_id,
            redact=self.redact,
        )


def _check_model_id(model_id: str) -> str:
    """A model id as the catalog names it (``owner/model/variant``), or an ``InputValidationError``."""
    parts = model_id.strip("/").split("/") if isinstance(model_id, str) else []
    if not parts or any(part in ("", ".", "..") or not part.isprintable() or " " in part for part in parts):
        raise InputValidationError(
            f"model_id {str(model_id)[:80]!r} is not a model id: give one such as {MODEL_ID!r} (slash-separated "
            "segments, no spaces); nothing was sent.",
            field="model_id",
        )
    return "/".join(parts)


def answer_of(exc: httpx.HTTPStatusError) -> httpx.Response:
    """The answer inside an ``HTTPStatusError`` (a response hook's ``raise_for_status()``): still an answer.
    httpx closes it when the hook raises, so a body the hook did not read is lost: then only its status and
    headers are left (a 404 without its body is then not proof that a request is gone)."""
    response = exc.response
    try:
        response.read()
        return response
    except (httpx.StreamError, RuntimeError):
        dropped = ("content-encoding", "content-length", "transfer-encoding")
        headers = [(name, value) for name, value in response.headers.items() if name.lower() not in dropped]
        return httpx.Response(response.status_code, headers=headers, request=exc.request)


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
                try:
                    outcome = send(action.request)
                except httpx.HTTPStatusError as exc:
                    outcome = answer_of(exc)
                outcome.read()
            except httpx.HTTPError as exc:  # every kind: the core decides what it means
                outcome = exc
    except StopIteration as done:
        return cast(T, done.value)


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
