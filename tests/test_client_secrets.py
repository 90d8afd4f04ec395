"""What the clients put on the wire, and what they never show: the API token.

The token must not appear in a client's repr, in any exception's text from any error path, or in any
log record of ``dagster_runway``, ``httpx`` or ``httpcore`` at DEBUG. Headers are checked on the wire
with a tiny echo server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dagster_runway.client import AsyncRunComfyClient, RetryPolicy, RunComfyClient
from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.errors import (
    AmbiguousSubmitError,
    AuthenticationError,
    GenerationFailedError,
    InputValidationError,
    InsufficientCreditsError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RequestCancelledError,
    RequestNotFoundError,
    RunComfyError,
    ServerError,
    TransportError,
    WaitTimeoutError,
)
from dagster_runway.version import __version__
from tests.test_client import FAST_RETRY, KINDS, Connector, closed_port_url, image_input

TOKEN = "rc_live_SECRET_7f3a9c1e5b2d"
OTHER = "rc_live_OTHER_2b8d4f6a0c1e"
WRONG = "rc_live_WRONG_9e1c3a5f7b3d"
SECRETS = (TOKEN, OTHER, WRONG)
SIGNATURE = "X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.fixture(params=KINDS)
def connect(request: pytest.FixtureRequest) -> Iterator[Connector]:
    connector = Connector(request.param)
    yield connector
    connector.close()


class EchoServer:
    """Answers each request with ``reply(method, path, headers)`` and records what it received."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []
        self.reply: Callable[[str, str, dict[str, str]], tuple[int, dict[str, Any]]] = lambda m, p, h: (
            200,
            {"request_id": "req-1", "status": "in_queue", "queue_position": 0},
        )
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                server.received.append((self.command, self.path, headers, body))
                status, payload = server.reply(self.command, self.path, headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def exception_texts(error: BaseException) -> str:
    """Every text an exception shows: str, repr, args and the formatted traceback with its chain."""
    return "\n".join([str(error), repr(error), repr(error.args), "".join(traceback.format_exception(error))])


def assert_no_secret(text: str, secrets: tuple[str, ...] = SECRETS) -> None:
    for secret in secrets:
        assert secret not in text


# -- on the wire ------------------------------------------------------------------------------------------


def test_user_agent_auth_and_accept_headers_on_the_wire(echo: EchoServer) -> None:
    with RunComfyClient(TOKEN, base_url=echo.base_url, retry=FAST_RETRY) as client:
        client.status("req-1")
        echo.reply = lambda m, p, h: (200, {"request_id": "req-2"})
        client.submit(image_input())

    async def run_async() -> None:
        async with AsyncRunComfyClient(TOKEN, base_url=echo.base_url, retry=FAST_RETRY) as client:
            echo.reply = lambda m, p, h: (200, {"request_id": "req-3", "status": "in_progress"})
            await client.status("req-3")
            echo.reply = lambda m, p, h: (200, {"request_id": "req-4"})
            await client.submit(image_input())

    asyncio.run(run_async())
    assert [(method, path.split("/")[-1]) for method, path, _, _ in echo.received] == [
        ("GET", "status"),
        ("POST", "image-to-video"),
        ("GET", "status"),
        ("POST", "image-to-video"),
    ]
    for method, _, headers, body in echo.received:
        assert headers["user-agent"] == f"dagster-runway/{__version__}"
        assert headers["authorization"] == f"Bearer {TOKEN}"
        assert headers["accept"] == "application/json"
        if method == "POST":
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == image_input()


def test_user_agent_through_an_event_hook(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    request_id = api.submit(image_input()).request_id
    api.wait(request_id, timeout=30)
    api.cancel(request_id)
    assert {request.headers["user-agent"] for request in api.sent} == {f"dagster-runway/{__version__}"}
    assert len(api.sent) >= 4


def test_an_echoed_token_and_presigned_url_are_redacted_from_errors(
    echo: EchoServer, connect: Connector
) -> None:
    def reply(method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        token = headers["authorization"].removeprefix("Bearer ")
        if path.endswith("/status"):
            return 401, {"error_code": 400004, "error_message": f"The token {token} was revoked"}
        return 422, {
            "error_code": 422001,
            "error_message": f"Could not fetch https://bucket.example.com/cat.png?{SIGNATURE} with {token}",
            "detail": [{"loc": ["body", "promptImage"], "msg": "fetch failed"}],
        }

    echo.reply = reply
    api = connect(echo.base_url, token=TOKEN)
    with pytest.raises(AuthenticationError) as auth:
        api.status("req-1")
    with pytest.raises(InputValidationError) as invalid:
        api.submit(image_input())
    assert invalid.value.field == "promptImage"
    for error in (auth.value, invalid.value):
        text = exception_texts(error)
        assert_no_secret(text, (TOKEN, SIGNATURE.split("=")[1]))
        assert "<redacted>" in str(error)


# -- never shown ----------------------------------------------------------------------------------------


def test_reprs_do_not_show_the_token() -> None:
    sync = RunComfyClient(TOKEN, base_url="http://127.0.0.1:9")
    async_ = AsyncRunComfyClient(TOKEN, base_url="http://127.0.0.1:9")
    try:
        for client in (sync, async_):
            assert_no_secret(repr(client))
            assert_no_secret(str(client))
            assert "127.0.0.1:9" in repr(client)
            assert_no_secret(repr(client._core))
    finally:
        sync.close()
        asyncio.run(async_.aclose())


def error_paths(
    emulator_factory: Callable[..., Emulator], connect: Connector
) -> list[tuple[type[RunComfyError], Callable[[], Any]]]:
    """One call per error path, each expected to raise the given error."""
    emu = emulator_factory(tokens=[TOKEN, OTHER])
    broke = emulator_factory(tokens=[TOKEN], balance_usd=0.0)
    api = connect(emu, token=TOKEN)
    other = connect(emu, token=OTHER)
    wrong = connect(emu, token=WRONG)
    unknown_model = connect(emu, token=TOKEN, model_id="runwayml/no-such-model")
    poor = connect(broke, token=TOKEN)
    down = connect(closed_port_url(), token=TOKEN)
    impatient = connect(emu, token=TOKEN, request_timeout=0.2)
    strict = connect(
        emu, token=TOKEN, retry=RetryPolicy(max_attempts=2, backoff_initial=0.01, retry_after_max=1)
    )

    mine = api.submit(image_input("mine")).request_id
    emu.add_fault(
        FaultRule(
            kind="generation_failed",
            endpoint="submit",
            failure_code="SAFETY.INPUT.IMAGE",
            match_prompt="unsafe",
        )
    )
    unsafe = api.submit(image_input("unsafe")).request_id

    def paused_request() -> str:
        emu.pause()
        return api.submit(image_input("queued")).request_id

    def cancelled_wait() -> Any:
        request_id = paused_request()
        api.cancel(request_id)
        return api.wait(request_id, timeout=10)

    def submit() -> Any:
        return api.submit(image_input())

    def impatient_submit() -> Any:
        return impatient.submit(image_input())

    def with_fault(call: Callable[[], Any], **rule: Any) -> Callable[[], Any]:
        def run() -> Any:
            emu.clear_faults()
            emu.resume()
            emu.add_fault(FaultRule(**rule))
            try:
                return call()
            finally:
                emu.clear_faults()

        return run

    return [
        (AuthenticationError, lambda: wrong.submit(image_input())),
        (AuthenticationError, lambda: wrong.status(mine)),
        (PermissionDeniedError, lambda: other.result(mine)),
        (InsufficientCreditsError, lambda: poor.submit(image_input())),
        (InputValidationError, lambda: api.submit({"promptImage": "http://example.com/a.png"})),
        (InputValidationError, lambda: api.status("not/a/valid/id")),
        (ModelNotFoundError, lambda: unknown_model.submit(image_input())),
        (RequestNotFoundError, lambda: api.cancel("unknown-request")),
        (TransportError, lambda: down.status("req-1")),
        (TransportError, lambda: down.submit(image_input())),
        (GenerationFailedError, lambda: api.wait(unsafe, timeout=30)),
        (RequestCancelledError, cancelled_wait),
        (WaitTimeoutError, lambda: api.wait(paused_request(), timeout=0.1, cancel_on_timeout=True)),
        (
            RateLimitedError,
            with_fault(lambda: strict.status(mine), kind="rate_limit", endpoint="status", retry_after=5),
        ),
        (
            ServerError,
            with_fault(lambda: strict.status(mine), kind="server_error", endpoint="status", status=503),
        ),
        (
            ServerError,
            with_fault(lambda: api.result(mine), kind="error_code_200", endpoint="result", status=500),
        ),
        (TransportError, with_fault(lambda: strict.status(mine), kind="reset", endpoint="status")),
        (AmbiguousSubmitError, with_fault(submit, kind="server_error", endpoint="submit", after_accept=True)),
        (AmbiguousSubmitError, with_fault(submit, kind="reset", endpoint="submit", after_accept=True)),
        (
            AmbiguousSubmitError,
            with_fault(impatient_submit, kind="slow", endpoint="submit", delay_seconds=1.0),
        ),
    ]


def test_no_error_path_shows_the_token_in_text_or_logs(
    emulator_factory: Callable[..., Emulator], connect: Connector, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("dagster_runway", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    raised = []
    for expected, call in error_paths(emulator_factory, connect):
        with pytest.raises(expected) as info:
            call()
        raised.append(info.value)
        assert_no_secret(exception_texts(info.value))
        # The attributes (detail, cause, fingerprint, ...) never carry a token either.
        assert_no_secret(repr(vars(info.value)))
    assert len({type(error) for error in raised}) == 13

    records = [
        record
        for record in caplog.records
        if record.name.split(".")[0] in ("dagster_runway", "httpx", "httpcore")
    ]
    # The capture saw the traffic: httpx request lines, httpcore wire events, the client's retries.
    assert any(record.name == "httpx" for record in records)
    assert any(record.name.startswith("httpcore") and record.levelno == logging.DEBUG for record in records)
    assert any(record.name == "dagster_runway.client" for record in records)
    for record in records:
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        assert_no_secret(text)
    assert_no_secret(caplog.text)
