"""Money and retries: what each client retries, what it never retries, and the three submit outcomes.

A submit is billed and not idempotent. It is retried only where it provably was not accepted (the
connection was never made, or a 429); anything else after the body was sent is an
``AmbiguousSubmitError``, never a silent second charge. GETs and cancel are retried on connection errors,
429 and 502/503/504, honouring Retry-After, within a total deadline. Other 4xx are never retried.
The emulator's ledger is the proof of what was billed; ``Api.sent`` counts what was sent.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dagster_runway.client import RetryPolicy, input_fingerprint
from dagster_runway.client._errors import parse_retry_after
from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    ClientConfigurationError,
    GatewayNotFoundError,
    InputValidationError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RequestNotFoundError,
    RunComfyError,
    ServerError,
    TransportError,
    UnexpectedResponseError,
)
from dagster_runway.schema import MODEL_ID, ImageToVideoInput, RequestState
from tests.test_client import FAST_RETRY, KINDS, Api, Connector, closed_port_url, image_input


@pytest.fixture(params=KINDS)
def connect(request: pytest.FixtureRequest) -> Iterator[Connector]:
    connector = Connector(request.param)
    yield connector
    connector.close()


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delays the client chose before each retry, from its log (not measured time)."""
    return [
        float(record.args[-1])  # type: ignore[index]
        for record in caplog.records
        if record.name == "dagster_runway.client" and "retry" in record.msg and record.args
    ]


class RefuseConnections:
    """A transport whose first ``refusals`` connection attempts are refused; then real loopback HTTP.

    A live server cannot refuse a connection and then accept the next one on the same port, so this
    is the one place a transport stands in for the network.
    """

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.sync = httpx.HTTPTransport()
        self.async_ = httpx.AsyncHTTPTransport()

    def _refuse(self, request: httpx.Request) -> None:
        if self.refusals > 0:
            self.refusals -= 1
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    def for_kind(self, kind: str) -> httpx.BaseTransport | httpx.AsyncBaseTransport:
        outer = self

        class Sync(httpx.BaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                outer._refuse(request)
                return outer.sync.handle_request(request)

            def close(self) -> None:
                outer.sync.close()

        class Async(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                outer._refuse(request)
                return await outer.async_.handle_async_request(request)

            async def aclose(self) -> None:
                await outer.async_.aclose()

        return Sync() if kind == "sync" else Async()


# -- submit: accepted, provably not accepted, ambiguous ----------------------------------------------


def test_submit_is_retried_after_429_and_billed_once(emulator: Emulator, connect: Connector) -> None:
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="submit", times=2, retry_after=0))
    api = connect(emulator)
    submission = api.submit(image_input())
    assert api.count("submit") == 3
    ledger = emulator.ledger()
    assert ledger.submissions == ledger.billed_submissions == 1
    assert ledger.entries[0].request_id == submission.request_id


def test_submit_gives_up_on_429_after_max_attempts_and_nothing_is_billed(
    emulator: Emulator, connect: Connector
) -> None:
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="submit", retry_after=0))
    api = connect(emulator, retry=RetryPolicy(max_attempts=3, backoff_initial=0.01, backoff_max=0.01))
    with pytest.raises(RateLimitedError) as info:
        api.submit(image_input())
    assert info.value.retry_after == 0.0
    assert info.value.status_code == 429
    assert info.value.retryable
    assert api.count("submit") == 3
    assert emulator.ledger().submissions == 0


def test_submit_is_retried_when_the_connection_was_never_made(connect: Connector) -> None:
    api = connect(closed_port_url())
    with pytest.raises(TransportError) as info:
        api.submit(image_input())
    assert not isinstance(info.value, AmbiguousSubmitError)
    assert "ConnectError" in str(info.value)
    assert api.count("submit") == FAST_RETRY.max_attempts


def test_submit_after_a_refused_connection_succeeds_and_bills_once(
    emulator: Emulator, connect: Connector
) -> None:
    refuse = RefuseConnections(refusals=2)
    api = connect(emulator, transport=refuse.for_kind(connect.kind))
    submission = api.submit(image_input())
    assert refuse.refusals == 0
    assert api.count("submit") == 3
    assert [entry.request_id for entry in emulator.ledger().entries] == [submission.request_id]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_5xx_after_the_submit_was_accepted_is_ambiguous_and_billed_once(
    emulator: Emulator, connect: Connector, status: int
) -> None:
    emulator.add_fault(
        FaultRule(kind="server_error", endpoint="submit", status=status, after_accept=True, times=1)
    )
    api = connect(emulator)
    fields = image_input()
    with pytest.raises(AmbiguousSubmitError) as info:
        api.submit(fields)
    error = info.value
    assert error.status_code == status
    body = ImageToVideoInput.model_validate(fields).to_request()
    assert error.fingerprint == input_fingerprint(MODEL_ID, body)
    assert error.fingerprint in str(error)
    assert "may have been accepted and billed" in str(error)
    assert api.count("submit") == 1
    ledger = emulator.ledger()
    assert ledger.submissions == ledger.billed_submissions == 1


def test_a_reset_after_the_submit_was_accepted_is_ambiguous_and_billed_once(
    emulator: Emulator, connect: Connector
) -> None:
    emulator.add_fault(FaultRule(kind="reset", endpoint="submit", after_accept=True, times=1))
    api = connect(emulator)
    with pytest.raises(AmbiguousSubmitError) as info:
        api.submit(image_input())
    assert info.value.cause and "Error" in info.value.cause
    assert api.count("submit") == 1
    assert emulator.ledger().billed_submissions == 1


@pytest.mark.parametrize("fault", ["reset", "server_error"])
def test_a_failure_before_acceptance_is_still_ambiguous_to_the_client(
    emulator: Emulator, connect: Connector, fault: str
) -> None:
    # The emulator did not record it, but the client cannot know that: it must not resubmit.
    emulator.add_fault(FaultRule(kind=fault, endpoint="submit", after_accept=False, times=1))
    api = connect(emulator)
    with pytest.raises(AmbiguousSubmitError):
        api.submit(image_input())
    assert api.count("submit") == 1
    assert emulator.ledger().submissions == 0


def test_a_submit_timeout_is_ambiguous_and_billed_once(emulator: Emulator, connect: Connector) -> None:
    emulator.add_fault(
        FaultRule(kind="slow", endpoint="submit", delay_seconds=1.0, after_accept=True, times=1)
    )
    api = connect(emulator, request_timeout=0.2)
    with pytest.raises(AmbiguousSubmitError) as info:
        api.submit(image_input())
    assert info.value.cause and "Timeout" in info.value.cause
    assert api.count("submit") == 1
    assert emulator.ledger().billed_submissions == 1


def test_an_error_code_in_a_200_submit_answer_is_ambiguous(emulator: Emulator, connect: Connector) -> None:
    emulator.add_fault(FaultRule(kind="error_code_200", endpoint="submit", after_accept=True, times=1))
    api = connect(emulator)
    with pytest.raises(AmbiguousSubmitError) as info:
        api.submit(image_input())
    assert (
        info.value.status_code == 200 and info.value.error_code == 503001
    )  # transient, yet a submit is never retried
    assert api.count("submit") == 1
    assert emulator.ledger().billed_submissions == 1


def test_an_unknown_model_is_not_retried(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator, model_id="runwayml/no-such-model")
    with pytest.raises(ModelNotFoundError) as info:
        api.submit(image_input())
    assert info.value.error_code == 400001
    assert "runwayml/no-such-model" in str(info.value)
    assert api.count("submit") == 1
    assert emulator.ledger().submissions == 0


# -- GET and cancel ---------------------------------------------------------------------------------


ENDPOINTS = ("status", "result", "cancel")


def transient_faults() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("reset", {"kind": "reset"}),
        ("429", {"kind": "rate_limit", "retry_after": 0}),
        ("502", {"kind": "server_error", "status": 502}),
        ("503", {"kind": "server_error", "status": 503}),
        ("504", {"kind": "server_error", "status": 504}),
    ]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    ("label", "fault"), transient_faults(), ids=[label for label, _ in transient_faults()]
)
def test_reads_and_cancel_are_retried_through_transient_failures(
    emulator_factory: Callable[..., Emulator],
    connect: Connector,
    endpoint: str,
    label: str,
    fault: dict[str, Any],
) -> None:
    emulator = emulator_factory(paused=True)
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(endpoint=endpoint, times=2, **fault))
    answer = getattr(api, endpoint)(request_id)
    assert answer.request_id == request_id
    assert api.count(endpoint) == 3
    if endpoint == "cancel":
        assert answer.cancelled
    assert emulator.ledger().submissions == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_reads_give_up_after_max_attempts(emulator: Emulator, connect: Connector, endpoint: str) -> None:
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="server_error", endpoint=endpoint, status=503))
    with pytest.raises(ServerError) as info:
        getattr(api, endpoint)(request_id)
    assert info.value.status_code == 503 and info.value.request_id == request_id
    assert api.count(endpoint) == FAST_RETRY.max_attempts


def test_a_500_on_a_read_is_not_retried(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="server_error", endpoint="status", status=500, times=1))
    with pytest.raises(ServerError) as info:
        api.status(request_id)
    assert info.value.status_code == 500
    assert api.count("status") == 1


def test_an_error_code_in_a_200_answer_is_an_error(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="error_code_200", endpoint="status", status=500, times=1))
    with pytest.raises(ServerError) as info:
        api.status(request_id)
    assert info.value.status_code == 200 and info.value.error_code == 500001
    assert api.count("status") == 1  # 500001 stands for a 500: not retried, like a 500
    assert api.status(request_id).request_id == request_id


def test_a_transient_error_code_in_a_200_answer_is_retried_like_its_status(
    emulator: Emulator, connect: Connector
) -> None:
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="error_code_200", endpoint="result", status=503, times=2))
    assert api.result(request_id).request_id == request_id
    assert api.count("result") == 3


def test_4xx_answers_are_never_retried(emulator_factory: Callable[..., Emulator], connect: Connector) -> None:
    emulator = emulator_factory(tokens=["owner-token", "other-token"])
    owner = connect(emulator, token="owner-token")
    request_id = owner.submit(image_input()).request_id
    cases: list[tuple[Api, str, Any, type[RunComfyError]]] = [
        (connect(emulator, token="wrong-token"), "status", request_id, AuthenticationError),  # 401
        (connect(emulator, token="other-token"), "result", request_id, PermissionDeniedError),  # 403
        (owner, "status", "unknown-request-id", RequestNotFoundError),  # 404
        (owner, "cancel", "unknown-request-id", RequestNotFoundError),  # 404
        (owner, "submit", {"promptImage": "http://example.com/a.png"}, InputValidationError),  # 422
    ]
    for api, call, arg, error in cases:
        before = api.count(call)
        with pytest.raises(error) as info:
            getattr(api, call)(arg)
        assert api.count(call) == before + 1
        assert not info.value.retryable
    assert emulator.ledger().submissions == 1


def test_retry_after_is_honoured(
    emulator: Emulator, connect: Connector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dagster_runway")
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="status", retry_after=1, times=1))
    assert api.status(request_id).request_id == request_id
    assert api.count("status") == 2
    # Backoff alone would wait at most backoff_max (0.02 s); the server asked for 1 s.
    assert retry_delays(caplog) == [pytest.approx(1.0, abs=FAST_RETRY.backoff_max)]
    assert retry_delays(caplog)[0] >= 1.0


def test_a_retry_after_longer_than_allowed_raises_at_once(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator, retry=RetryPolicy(max_attempts=5, backoff_initial=0.01, retry_after_max=2.0))
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="status", retry_after=30))
    with pytest.raises(RateLimitedError) as info:
        api.status(request_id)
    assert info.value.retry_after == 30.0
    assert "30s" in str(info.value)
    assert api.count("status") == 1


def test_a_retry_after_beyond_the_deadline_raises_at_once(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator, retry=RetryPolicy(max_attempts=5, backoff_initial=0.01, deadline=3.0))
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="status", retry_after=5))
    with pytest.raises(RateLimitedError):
        api.status(request_id)
    assert api.count("status") == 1


def test_the_total_deadline_bounds_the_retries(
    emulator: Emulator, connect: Connector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dagster_runway")
    policy = RetryPolicy(max_attempts=10_000, backoff_initial=0.05, backoff_max=0.05, deadline=0.3)
    api = connect(emulator, retry=policy)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="server_error", endpoint="status", status=503))
    with pytest.raises(ServerError):
        api.status(request_id)
    attempts = api.count("status")
    delays = retry_delays(caplog)
    assert 1 <= attempts < policy.max_attempts
    assert len(delays) == attempts - 1
    # No planned pause ran past the deadline.
    assert sum(delays) <= policy.deadline


def test_wait_polls_on_through_passing_errors(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator, retry=RetryPolicy(max_attempts=2, backoff_initial=0.01, backoff_max=0.01))
    request_id = api.submit(image_input()).request_id
    # Two status calls' worth of retries fail; wait goes on polling and still gets the result.
    emulator.add_fault(FaultRule(kind="server_error", endpoint="status", status=503, times=4))
    result = api.wait(request_id, timeout=30)
    assert result.status is RequestState.SUCCEEDED
    assert api.count("status") >= 5


def test_wait_does_not_poll_on_through_a_permanent_error(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    with pytest.raises(RequestNotFoundError):
        api.wait("unknown-request-id", timeout=30)
    assert api.count("status") == 1


# -- Retry-After forms a live server here does not send -----------------------------------------------


def rate_limited(headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(
        429, headers=headers, json={"error_code": 429001, "error_message": "slow down", **body}
    )


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"Retry-After": "7"}, {}, 7.0),
        ({"Retry-After": "2.5"}, {}, 2.5),
        ({}, {"retry_after": 4}, 4.0),
        ({}, {"retryAfter": 3.5}, 3.5),
        ({}, {"retry_after": True}, None),
        ({"Retry-After": "-3"}, {}, 0.0),
        ({}, {}, None),
        ({"Retry-After": "soon"}, {}, None),
        ({"Retry-After": "soon"}, {"retry_after": 6}, 6.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], body: dict[str, Any], expected: float | None) -> None:
    response = rate_limited(headers, body)
    assert parse_retry_after(response, response.json()) == expected


def test_retry_after_as_an_http_date() -> None:
    future = email.utils.formatdate(time.time() + 120, usegmt=True)
    response = rate_limited({"Retry-After": future}, {})
    assert 100 < (parse_retry_after(response, {}) or 0) <= 120
    past = email.utils.formatdate(time.time() - 120, usegmt=True)
    assert parse_retry_after(rate_limited({"Retry-After": past}, {}), {}) == 0.0


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"Retry-After": "http-date"}, {}, 90.0),
        ({}, {"retry_after": 45}, 45.0),
        ({"Retry-After": "not a number or a date"}, {}, None),
    ],
)
def test_a_rate_limit_hint_in_any_form_reaches_the_error(
    connect: Connector, headers: dict[str, str], body: dict[str, Any], expected: float | None
) -> None:
    if headers.get("Retry-After") == "http-date":
        headers = {"Retry-After": email.utils.formatdate(time.time() + 90.5, usegmt=True)}
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return rate_limited(headers, body)

    # retry_after_max below every hint: the client must raise at once with the hint it parsed.
    policy = RetryPolicy(max_attempts=2, backoff_initial=0.01, backoff_max=0.01, retry_after_max=10.0)
    api = connect("http://runcomfy.test", transport=httpx.MockTransport(handler), retry=policy)
    with pytest.raises(RateLimitedError) as info:
        api.status("req-1")
    if expected is None:
        assert info.value.retry_after is None
        assert len(calls) == 2  # no hint: ordinary backoff, then out of attempts
    else:
        assert info.value.retry_after == pytest.approx(expected, abs=1.0)
        assert len(calls) == 1


# -- every httpx error is typed -----------------------------------------------------------------------

NOT_THE_APIS_200 = ("bad_gzip", "html_200", "wrong_shape_200")


@pytest.mark.parametrize("kind", NOT_THE_APIS_200)
def test_an_unreadable_answer_to_an_accepted_submit_is_ambiguous_and_billed_once(
    emulator: Emulator, connect: Connector, kind: str
) -> None:
    emulator.add_fault(FaultRule(kind=kind, endpoint="submit", after_accept=True, times=1))
    api = connect(emulator)
    with pytest.raises(AmbiguousSubmitError) as info:
        api.submit(image_input())
    assert "may have been accepted and billed" in str(info.value) and info.value.fingerprint
    assert api.count("submit") == 1  # never resubmitted
    ledger = emulator.ledger()
    assert ledger.submissions == ledger.billed_submissions == 1


def test_an_undecodable_answer_before_acceptance_is_still_ambiguous_to_the_client(
    emulator: Emulator, connect: Connector
) -> None:
    emulator.add_fault(FaultRule(kind="bad_gzip", endpoint="submit", after_accept=False, times=1))
    api = connect(emulator)
    with pytest.raises(AmbiguousSubmitError) as info:
        api.submit(image_input())
    assert info.value.cause and "DecodingError" in info.value.cause and "cannot be decoded" in str(info.value)
    assert api.count("submit") == 1 and emulator.ledger().submissions == 0


@pytest.mark.parametrize("kind", NOT_THE_APIS_200)
@pytest.mark.parametrize("endpoint", ["status", "result", "cancel"])
def test_an_unreadable_answer_to_a_read_is_retried_then_typed(
    emulator_factory: Callable[..., Emulator], connect: Connector, kind: str, endpoint: str
) -> None:
    emulator = emulator_factory(paused=True)
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind=kind, endpoint=endpoint, times=1))
    assert getattr(api, endpoint)(request_id).request_id == request_id  # retried past the one bad answer
    assert api.count(endpoint) == 2
    emulator.add_fault(FaultRule(kind=kind, endpoint="status"))
    with pytest.raises(UnexpectedResponseError) as info:
        api.status(request_id)
    assert info.value.retryable and info.value.request_id == request_id
    assert "gateway" in str(info.value) or "proxy" in str(info.value)
    assert api.count("status") == FAST_RETRY.max_attempts + (2 if endpoint == "status" else 0)


@pytest.mark.parametrize(
    ("error", "never_sent"),
    [
        (httpx.ConnectTimeout("timed out connecting"), True),
        (httpx.PoolTimeout("no connection free in the pool"), True),
        (httpx.ProxyError("407 Proxy Authentication Required"), True),
        (httpx.WriteTimeout("timed out writing"), False),
        (httpx.WriteError("[Errno 32] Broken pipe"), False),
        (httpx.CloseError("close failed"), False),
        (httpx.LocalProtocolError("Too much data for declared Content-Length"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_network_errors_no_server_can_make_on_demand(
    connect: Connector, error: httpx.HTTPError, never_sent: bool
) -> None:
    # Mock transports: a real server cannot time out a connect or a pool, or refuse a proxy tunnel, on demand.
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    api = connect("http://runcomfy.test", transport=httpx.MockTransport(handler))
    if never_sent:  # provably not accepted: retried, then a plain TransportError
        with pytest.raises(TransportError) as info:
            api.submit(image_input())
        assert api.count("submit") == FAST_RETRY.max_attempts
    else:
        with pytest.raises(AmbiguousSubmitError) as ambiguous:
            api.submit(image_input())
        assert api.count("submit") == 1 and type(error).__name__ in str(ambiguous.value)
    with pytest.raises(TransportError) as info:
        api.status("req-1")
    assert info.value.retryable and type(error).__name__ in str(info.value)
    assert api.count("status") == FAST_RETRY.max_attempts


@pytest.mark.parametrize(
    "body",
    [b"", b"[1, 2, 3]", b'"a string"', b"\xff\xfe not utf-8", b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "a list", "a string", "not utf-8", "nested too deep"],
)
def test_a_2xx_body_that_is_not_a_json_object_is_typed(connect: Connector, body: bytes) -> None:
    # Mock transport: the emulator's faults cover the common shapes; these are the odd ones.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": "application/json"})

    api = connect("http://runcomfy.test", transport=httpx.MockTransport(handler))
    with pytest.raises(AmbiguousSubmitError):
        api.submit(image_input())
    with pytest.raises(UnexpectedResponseError) as info:
        api.result("req-1")
    assert "not a JSON object" in str(info.value) and len(str(info.value)) < 1000


def test_an_unsupported_scheme_is_a_configuration_error_and_not_retried(connect: Connector) -> None:
    api = connect("ftp://127.0.0.1:1")
    for call in (lambda: api.submit(image_input()), lambda: api.status("req-1")):
        with pytest.raises(ClientConfigurationError) as info:
            call()
        assert "ftp://127.0.0.1:1" in str(info.value) and "nothing was sent" in str(info.value)


def test_an_invalid_base_url_is_a_configuration_error(connect: Connector) -> None:
    api = connect("http://[::1")
    for call in (lambda: api.submit(image_input()), lambda: api.status("req-1")):
        with pytest.raises(ClientConfigurationError) as info:
            call()
        assert "base_url 'http://[::1'" in str(info.value)


def test_a_redirect_loop_is_a_configuration_error(connect: Connector, image_server: Any) -> None:
    path = "/v1/requests/req-1/status"
    image_server.serve(path, b"", status=302, headers={"Location": path})
    api = connect(image_server.base_url, http={"follow_redirects": True})
    with pytest.raises(ClientConfigurationError) as info:
        api.status("req-1")
    assert "TooManyRedirects" in str(info.value) and "check base_url" in str(info.value)


def test_an_http_status_error_from_a_hook_is_typed_like_its_answer(
    emulator: Emulator, connect: Connector
) -> None:
    def raise_for_status(response: httpx.Response) -> None:
        response.raise_for_status()

    api = connect(emulator, http={"response_hook": raise_for_status, "read_before_hook": True})
    with pytest.raises(RequestNotFoundError):
        api.status("unknown-request-id")
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="submit", times=1, retry_after=0))
    assert api.submit(image_input()).request_id  # a 429 raised by the hook is still retried
    assert emulator.ledger().billed_submissions == 1


def test_a_404_whose_body_a_hook_threw_away_is_not_taken_for_expired(
    emulator: Emulator, connect: Connector
) -> None:
    def raise_for_status(response: httpx.Response) -> None:  # httpx closes the unread body when this raises
        response.raise_for_status()

    api = connect(emulator, http={"response_hook": raise_for_status})
    with pytest.raises(GatewayNotFoundError):
        api.status("unknown-request-id")


def test_a_token_with_a_control_character_is_refused_before_any_call(connect: Connector) -> None:
    with pytest.raises(AuthenticationError) as info:
        connect("http://runcomfy.test", token="secret-token\n")
    assert "control character" in str(info.value) and "secret-token" not in str(info.value)


# -- only the API's own 404 means "unknown or expired" -------------------------------------------------


@pytest.mark.parametrize("endpoint", ["status", "result", "cancel"])
def test_a_gateway_404_is_retried_and_never_taken_for_expired(
    emulator_factory: Callable[..., Emulator], connect: Connector, endpoint: str
) -> None:
    emulator = emulator_factory(paused=True)
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    emulator.add_fault(FaultRule(kind="gateway_404", endpoint=endpoint, times=1))
    assert getattr(api, endpoint)(request_id).request_id == request_id
    emulator.add_fault(FaultRule(kind="gateway_404", endpoint=endpoint))
    with pytest.raises(GatewayNotFoundError) as info:
        getattr(api, endpoint)(request_id)
    error = info.value
    assert not isinstance(error, RequestNotFoundError) and error.retryable and error.status_code == 404
    assert "without the API's error" in str(error) and "never a reason to submit again" in str(error)
    assert "text/html" in str(error) and "404 Not Found" in str(error) and "<" not in str(error)
    assert emulator.request_state(request_id) == ("cancelled" if endpoint == "cancel" else "in_queue")
    assert emulator.ledger().submissions == 1  # nothing submitted again


def test_a_gateway_404_on_submit_is_ambiguous(emulator: Emulator, connect: Connector) -> None:
    emulator.add_fault(FaultRule(kind="gateway_404", endpoint="submit", times=1))
    api = connect(emulator)
    with pytest.raises(AmbiguousSubmitError) as info:
        api.submit(image_input())
    assert info.value.status_code == 404 and api.count("submit") == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error_code": 404001, "error_message": "Request not found"}, RequestNotFoundError),
        ({"error_message": "Request not found"}, RequestNotFoundError),  # the API's shape, its code left out
        ({"detail": "Not Found"}, GatewayNotFoundError),  # a framework's default 404
        ({"message": "no Route matched with those values"}, GatewayNotFoundError),  # an API gateway's
    ],
)
def test_a_json_404_is_not_found_only_in_the_apis_shape(
    connect: Connector, body: dict[str, Any], expected: type[RunComfyError]
) -> None:
    # Mock transport: the emulator only ever answers 404 in the API's shape, or with a gateway's page.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json=body)

    api = connect("http://runcomfy.test", transport=httpx.MockTransport(handler))
    with pytest.raises(expected):
        api.status("req-1")
    assert api.count("status") == (1 if expected is RequestNotFoundError else FAST_RETRY.max_attempts)
