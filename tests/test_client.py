"""The RunComfy clients against the emulator over loopback HTTP: each call, each state, each error.

Every test runs for both ``RunComfyClient`` and ``AsyncRunComfyClient`` through ``Api``, which gives the
two one blocking surface (the async client runs on a private event loop) and records every HTTP request
the client sends. The helpers here are shared by the other ``test_client_*`` modules.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from dagster_runway.client import AsyncRunComfyClient, RetryPolicy, RunComfyClient
from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.errors import (
    AuthenticationError,
    GenerationFailedError,
    InputValidationError,
    InsufficientCreditsError,
    PermissionDeniedError,
    RequestCancelledError,
    RequestNotFoundError,
    WaitTimeoutError,
)
from dagster_runway.schema import MODEL_ID, ImageToVideoInput, RequestResult, RequestState, RequestStatus

KINDS = ("sync", "async")

#: Small backoffs keep retry tests fast; the deadline is far away unless a test sets its own.
FAST_RETRY = RetryPolicy(
    max_attempts=4, backoff_initial=0.01, backoff_max=0.02, deadline=20.0, retry_after_max=5.0
)


def png_data_uri(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 80, 40)) -> str:
    """A small PNG as a ``data:`` URI, the way a pipeline sends a local image."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = png_data_uri()

# Loading the CA bundle costs ~60 ms per httpx client; the tests open many clients, so share one.
TLS = ssl.create_default_context()


def image_input(prompt: str = "A slow pan over a red square.", **fields: Any) -> dict[str, Any]:
    return {"promptImage": IMAGE, "promptText": prompt, **fields}


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Api:
    """One blocking surface over either client, recording every HTTP request it sends.

    ``transport`` replaces the HTTP transport (only for cases a server cannot produce); ``http`` gives
    more options of the httpx client (``follow_redirects``; ``response_hook``, a plain function, called
    after the body is read when ``read_before_hook`` is true); other keyword arguments go to the client.
    """

    def __init__(
        self,
        kind: str,
        *,
        base_url: str,
        token: str,
        transport: Any = None,
        request_timeout: float = 10.0,
        connect_timeout: float = 2.0,
        http: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.kind = kind
        options = dict(http or {})
        response_hook = options.pop("response_hook", None)
        read_first = options.pop("read_before_hook", False)
        self.sent: list[httpx.Request] = []
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("poll_interval", 0.01)
        timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self.client: RunComfyClient | AsyncRunComfyClient
        if kind == "sync":

            def on_sync_response(response: httpx.Response) -> None:
                if read_first:
                    response.read()
                response_hook(response)

            hooks: dict[str, list[Any]] = {"request": [self.sent.append]}
            if response_hook is not None:
                hooks["response"] = [on_sync_response]
            self.http: httpx.Client | httpx.AsyncClient = httpx.Client(
                timeout=timeout, transport=transport, verify=TLS, event_hooks=hooks, **options
            )
            self.client = RunComfyClient(token, base_url=base_url, http_client=self.http, **kwargs)
        else:

            async def record(request: httpx.Request) -> None:
                self.sent.append(request)

            async def on_response(response: httpx.Response) -> None:
                if read_first:
                    await response.aread()
                response_hook(response)

            async_hooks: dict[str, list[Any]] = {"request": [record]}
            if response_hook is not None:
                async_hooks["response"] = [on_response]
            self.http = httpx.AsyncClient(
                timeout=timeout, transport=transport, verify=TLS, event_hooks=async_hooks, **options
            )
            self.client = AsyncRunComfyClient(token, base_url=base_url, http_client=self.http, **kwargs)
            # One loop for the client's whole life: its connections belong to the loop that opened them.
            self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if self.kind == "async" and inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self.loop.run_until_complete(attr(*args, **kwargs))
        return attr

    def count(self, endpoint: str) -> int:
        """HTTP requests sent to one endpoint: submit, status, result or cancel."""
        if endpoint == "submit":
            return sum(request.url.path.startswith("/v1/models/") for request in self.sent)
        return sum(request.url.path.endswith(f"/{endpoint}") for request in self.sent)

    def close(self) -> None:
        if isinstance(self.http, httpx.Client):
            self.client.close()  # type: ignore[union-attr]
            self.http.close()
        else:
            self.loop.run_until_complete(self.http.aclose())
            self.loop.close()


class Connector:
    """``connect(emulator)`` opens an ``Api`` of one kind; every one is closed at the end of the test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._opened: list[Api] = []

    def __call__(self, target: Emulator | str, *, token: str | None = None, **kwargs: Any) -> Api:
        if isinstance(target, str):
            base_url, default_token = target, "not-a-real-token"
        else:
            base_url, default_token = target.base_url, target.token
        api = Api(self.kind, base_url=base_url, token=default_token if token is None else token, **kwargs)
        self._opened.append(api)
        return api

    def close(self) -> None:
        for api in self._opened:
            api.close()


@pytest.fixture(params=KINDS)
def connect(request: pytest.FixtureRequest) -> Iterator[Connector]:
    connector = Connector(request.param)
    yield connector
    connector.close()


def poll_until(
    api: Api, request_id: str, predicate: Callable[[RequestStatus], bool], tries: int = 500
) -> RequestStatus:
    """Poll status until ``predicate`` holds (the emulator moves on its own clock)."""
    for _ in range(tries):
        status = api.status(request_id)
        if predicate(status):
            return status
        time.sleep(0.01)
    raise AssertionError(f"request {request_id} never reached the expected state; last: {status!r}")


# -- submit and the happy path ---------------------------------------------------------------------


def test_submit_returns_the_request_and_bills_it_once(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    submission = api.submit(image_input())
    assert submission.request_id
    assert submission.status_url and submission.status_url.endswith(
        f"/v1/requests/{submission.request_id}/status"
    )
    assert submission.result_url and submission.result_url.endswith(
        f"/v1/requests/{submission.request_id}/result"
    )
    assert submission.cancel_url and submission.cancel_url.endswith(
        f"/v1/requests/{submission.request_id}/cancel"
    )
    ledger = emulator.ledger()
    assert ledger.billed_submissions == 1
    assert [entry.request_id for entry in ledger.entries] == [submission.request_id]
    assert api.count("submit") == 1
    # The model id goes into the path segment by segment, and the body is the input at top level.
    sent = api.sent[0]
    assert sent.method == "POST"
    assert sent.url.path == f"/v1/models/{MODEL_ID}"


def test_submit_accepts_a_model_python_names_or_api_names(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    first = api.submit(ImageToVideoInput(prompt_image=IMAGE, prompt_text="one", duration=10))
    second = api.submit({"prompt_image": IMAGE, "prompt_text": "two", "seed": 7})
    third = api.submit({"promptImage": IMAGE, "promptText": "three", "ratio": "960:960"})
    assert len({first.request_id, second.request_id, third.request_id}) == 3
    assert emulator.ledger().billed_submissions == 3
    bodies = [json.loads(request.content) for request in api.sent]
    assert bodies == [
        {"promptImage": IMAGE, "promptText": "one", "duration": 10},
        {"promptImage": IMAGE, "promptText": "two", "seed": 7},
        {"promptImage": IMAGE, "promptText": "three", "ratio": "960:960"},
    ]


def test_wait_returns_the_succeeded_result_with_video_cost_and_timestamps(
    emulator: Emulator, connect: Connector
) -> None:
    api = connect(emulator)
    submission = api.submit(image_input(duration=10))
    seen: list[RequestStatus] = []
    result = api.wait(submission.request_id, timeout=30, on_update=seen.append)
    assert isinstance(result, RequestResult)
    assert result.status is RequestState.SUCCEEDED
    assert result.request_id == submission.request_id
    assert result.video_url is not None and result.video_url.startswith(emulator.base_url)
    assert result.cost == pytest.approx(0.5)  # 10 s at $0.05/s
    assert result.created_at is not None and result.finished_at is not None
    assert result.finished_at >= result.created_at
    assert seen and seen[-1].status is RequestState.COMPLETED
    # Once finished, /status says completed (without a queue position) and /result says succeeded.
    status = api.status(submission.request_id)
    assert status.status is RequestState.COMPLETED and status.queue_position is None
    assert api.result(submission.request_id).status is RequestState.SUCCEEDED


def test_result_without_cost(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    submission = api.submit(image_input())
    api.wait(submission.request_id, timeout=30)
    assert api.result(submission.request_id).cost == pytest.approx(0.25)
    assert api.result(submission.request_id, include_cost=False).cost is None
    assert api.sent[-1].url.params.get("include_cost") is None


def test_a_queued_request_reports_its_queue_position_until_it_runs(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    emulator = emulator_factory(paused=True)
    api = connect(emulator)
    ids = [api.submit(image_input(f"queued {n}")).request_id for n in range(3)]
    statuses = [api.status(request_id) for request_id in ids]
    assert [status.status for status in statuses] == [RequestState.IN_QUEUE] * 3
    positions = [status.queue_position for status in statuses]
    assert all(isinstance(position, int) and position >= 0 for position in positions)
    assert positions == sorted(positions) and len(set(positions)) == 3
    result = api.result(ids[0])
    assert result.status is RequestState.IN_QUEUE and result.output is None and result.video_url is None

    emulator.resume()
    for request_id in ids:
        assert api.wait(request_id, timeout=30).status is RequestState.SUCCEEDED
        assert api.status(request_id).queue_position is None


def test_in_progress_requests_cannot_be_cancelled(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    # Requests start at once and then render for a very long time.
    emulator = emulator_factory(time_scale=1.0, queue_seconds=(0.0, 0.0), render_seconds=(3600.0, 3600.0))
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    status = poll_until(api, request_id, lambda s: s.status is not RequestState.IN_QUEUE)
    assert status.status is RequestState.IN_PROGRESS and status.queue_position is None
    assert api.result(request_id).status is RequestState.IN_PROGRESS

    cancel = api.cancel(request_id)
    assert cancel.request_id == request_id
    assert cancel.outcome == "not_cancellable" and not cancel.cancelled

    # cancel_on_timeout cancels only queued requests: this one runs on.
    with pytest.raises(WaitTimeoutError) as info:
        api.wait(request_id, timeout=0.2, poll_interval=0.02, cancel_on_timeout=True)
    assert info.value.last_state == "in_progress"
    assert info.value.request_id == request_id
    assert api.count("cancel") == 1
    assert api.status(request_id).status is RequestState.IN_PROGRESS
    assert emulator.ledger().billed_submissions == 1


# -- cancel ------------------------------------------------------------------------------------------


def test_cancel_a_queued_request(emulator_factory: Callable[..., Emulator], connect: Connector) -> None:
    emulator = emulator_factory(paused=True)
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    cancel = api.cancel(request_id)
    assert cancel.cancelled and cancel.outcome == "cancelled" and cancel.request_id == request_id
    assert api.status(request_id).status is RequestState.CANCELLED
    assert api.result(request_id).status is RequestState.CANCELLED
    with pytest.raises(RequestCancelledError) as info:
        api.wait(request_id, timeout=10)
    assert info.value.request_id == request_id
    # A cancelled request is not billed, and a second cancel is a harmless no-op.
    assert emulator.ledger().billed_submissions == 0
    again = api.cancel(request_id)
    assert again.request_id == request_id and again.cancelled
    emulator.resume()
    assert api.status(request_id).status is RequestState.CANCELLED


def test_cancel_a_finished_request_is_a_no_op(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    api.wait(request_id, timeout=30)
    cancel = api.cancel(request_id)
    assert cancel.outcome == "not_cancellable" and not cancel.cancelled
    assert api.result(request_id).status is RequestState.SUCCEEDED


# -- wait ----------------------------------------------------------------------------------------------


def test_wait_timeout_carries_the_request_id_and_last_state(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    emulator = emulator_factory(paused=True)
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    with pytest.raises(WaitTimeoutError) as info:
        api.wait(request_id, timeout=0.2, poll_interval=0.02)
    error = info.value
    assert error.request_id == request_id
    assert error.last_state == "in_queue"
    assert request_id in str(error) and "in_queue" in str(error)
    assert api.count("status") >= 1
    assert api.count("cancel") == 0
    # It may still finish: nothing was cancelled.
    assert api.status(request_id).status is RequestState.IN_QUEUE
    emulator.resume()
    assert api.wait(request_id, timeout=30).status is RequestState.SUCCEEDED


def test_wait_with_cancel_on_timeout_cancels_a_queued_request(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    emulator = emulator_factory(paused=True)
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    with pytest.raises(WaitTimeoutError) as info:
        api.wait(request_id, timeout=0.2, poll_interval=0.02, cancel_on_timeout=True)
    assert info.value.last_state == "cancelled"
    assert info.value.request_id == request_id
    assert api.count("cancel") == 1
    assert api.status(request_id).status is RequestState.CANCELLED
    assert emulator.ledger().billed_submissions == 0


@pytest.mark.parametrize(
    ("failure_code", "safety"),
    [("SAFETY.INPUT.IMAGE", True), ("SAFETY.INPUT.TEXT", True), ("INTERNAL.BAD_OUTPUT.CODE01", False)],
)
def test_a_failed_generation_raises_with_its_code_and_message(
    emulator: Emulator, connect: Connector, failure_code: str, safety: bool
) -> None:
    emulator.add_fault(
        FaultRule(
            kind="generation_failed", endpoint="submit", failure_code=failure_code, match_prompt="doomed"
        )
    )
    api = connect(emulator)
    ok = api.submit(image_input("a fine prompt")).request_id
    doomed = api.submit(image_input("a doomed prompt")).request_id

    with pytest.raises(GenerationFailedError) as info:
        api.wait(doomed, timeout=30)
    error = info.value
    assert error.request_id == doomed
    assert error.failure_code == failure_code
    assert error.failure_message
    assert error.is_safety is safety and error.is_internal is (not safety)
    assert failure_code in str(error) and doomed in str(error)
    assert ("do not retry" in str(error)) is safety
    # /status says completed; /result, asked directly, returns the failure without raising.
    assert api.status(doomed).status is RequestState.COMPLETED
    result = api.result(doomed)
    assert (
        result.status is RequestState.FAILED and result.failure_code == failure_code and result.output is None
    )
    # The fault matched only the doomed prompt.
    assert api.wait(ok, timeout=30).status is RequestState.SUCCEEDED


# -- errors ----------------------------------------------------------------------------------------------


def test_a_wrong_token_is_an_authentication_error(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator, token="wrong-token-123")
    with pytest.raises(AuthenticationError) as info:
        api.submit(image_input())
    assert info.value.status_code == 401 and info.value.error_code == 400004
    assert "RUNCOMFY_API_TOKEN" in str(info.value)
    with pytest.raises(AuthenticationError):
        api.status("0123456789abcdef")
    assert emulator.ledger().submissions == 0
    assert api.count("submit") == 1 and api.count("status") == 1  # never retried


def test_an_empty_token_is_refused_before_any_call(connect: Connector) -> None:
    with pytest.raises(AuthenticationError):
        connect(closed_port_url(), token="")


def test_another_accounts_request_is_permission_denied(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    emulator = emulator_factory(tokens=["owner-token", "other-token"])
    owner = connect(emulator, token="owner-token")
    other = connect(emulator, token="other-token")
    request_id = owner.submit(image_input()).request_id
    for call in (other.status, other.result, other.cancel):
        with pytest.raises(PermissionDeniedError) as info:
            call(request_id)
        assert info.value.status_code == 403 and info.value.error_code == 403001
        assert info.value.request_id == request_id
    assert other.count("status") == other.count("result") == other.count("cancel") == 1
    assert owner.status(request_id).request_id == request_id


def test_no_credit_is_insufficient_credits_and_nothing_is_billed(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    emulator = emulator_factory(balance_usd=0.0)
    api = connect(emulator)
    with pytest.raises(InsufficientCreditsError) as info:
        api.submit(image_input())
    assert info.value.error_code == 400002 and info.value.status_code == 402
    assert "Nothing was billed" in str(info.value)
    assert api.count("submit") == 1
    assert emulator.ledger().submissions == 0


def test_a_balance_covers_only_what_it_can_pay(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    emulator = emulator_factory(balance_usd=0.30)
    api = connect(emulator)
    api.submit(image_input(duration=5))  # $0.25
    with pytest.raises(InsufficientCreditsError):
        api.submit(image_input(duration=5))
    assert emulator.ledger().billed_submissions == 1
    assert emulator.ledger().total_cost_usd == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"promptImage": "http://example.com/cat.png"}, "promptImage"),
        ({"promptImage": "ftp://example.com/cat.png"}, "promptImage"),
        ({"promptImage": "data:text/plain;base64,aGVsbG8="}, "promptImage"),
        ({"promptImage": "data:image/png;base64,@@not-base64@@"}, "promptImage"),
    ],
)
def test_the_service_rejecting_an_input_names_the_field(
    emulator: Emulator, connect: Connector, fields: dict[str, Any], field: str
) -> None:
    api = connect(emulator)
    with pytest.raises(InputValidationError) as info:
        api.submit(fields)
    error = info.value
    assert error.field == field
    assert error.status_code == 422
    assert repr(field) in str(error)
    assert api.count("submit") == 1
    assert emulator.ledger().submissions == 0


PRESIGNED = "https://bucket.s3.amazonaws.com/cat.png?X-Amz-Signature=00ff00ff00ff"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"promptImage": PRESIGNED, "ratio": "16:9"}, "ratio"),
        ({"promptImage": PRESIGNED, "duration": 7}, "duration"),
        ({"promptImage": PRESIGNED, "seed": -1}, "seed"),
        ({"promptImage": PRESIGNED, "seed": "5"}, "seed"),
        ({"promptImage": PRESIGNED, "promptText": "x" * 1001}, "promptText"),
        ({"prompt_image": PRESIGNED, "prompt_text": None}, "promptText"),
        ({"promptText": "no image"}, "promptImage"),
        ({"promptImage": 42}, "promptImage"),
    ],
)
def test_an_input_the_schema_rejects_is_never_sent(
    emulator: Emulator, connect: Connector, fields: dict[str, Any], field: str
) -> None:
    api = connect(emulator)
    with pytest.raises(InputValidationError) as info:
        api.submit(fields)
    error = info.value
    assert error.field == field
    assert f"{field}:" in str(error) and "nothing was sent or billed" in str(error)
    assert "00ff00ff00ff" not in str(error)  # values are not echoed: an image URL may be presigned
    assert error.status_code is None
    assert api.sent == []
    assert emulator.ledger().submissions == 0


@pytest.mark.parametrize("call", ["status", "result", "cancel"])
def test_an_unknown_request_is_not_found(emulator: Emulator, connect: Connector, call: str) -> None:
    api = connect(emulator)
    with pytest.raises(RequestNotFoundError) as info:
        getattr(api, call)("0123456789abcdef0123456789abcdef")
    assert info.value.status_code == 404 and info.value.error_code == 404001
    assert info.value.request_id == "0123456789abcdef0123456789abcdef"
    assert api.count(call) == 1


@pytest.mark.parametrize("request_id", ["", "../../v1/models", "a b", "x" * 129])
def test_a_malformed_request_id_is_refused_before_any_call(connect: Connector, request_id: str) -> None:
    api = connect(closed_port_url())
    for call in (api.status, api.result, api.cancel, api.wait):
        with pytest.raises(InputValidationError) as info:
            call(request_id)
        assert info.value.field == "request_id"
    assert api.sent == []


def test_an_expired_request_is_not_found(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> None:
    emulator = emulator_factory(ttl_seconds=0.05, time_scale=1.0, queue_seconds=(0, 0), render_seconds=(0, 0))
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id

    def gone() -> bool:
        try:
            api.status(request_id)
        except RequestNotFoundError:
            return True
        return False

    for _ in range(300):
        if gone():
            break
        time.sleep(0.01)
    with pytest.raises(RequestNotFoundError):
        api.result(request_id)
