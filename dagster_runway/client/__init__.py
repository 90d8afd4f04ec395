"""Layer 2: the RunComfy Model API clients. Nothing here knows of Dagster.

``RunComfyClient`` and ``AsyncRunComfyClient`` have the same surface and share one request core
(``_core.RequestCore``), which applies the retry rule (``dagster_runway.retry``) and the error mapping
(``_errors``); they differ only in how they send and sleep.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self, TypeVar, cast

import httpx

from dagster_runway.client._catalog import ModelInfo, ModelPage
from dagster_runway.client._core import (
    DEFAULT_BASE_URL,
    USER_AGENT,
    Call,
    RequestCore,
    Sleep,
    answer_of,
    input_fingerprint,
    run_sync,
    wait_call,
)
from dagster_runway.client._defaults import (
    CONNECT_TIMEOUT_S,
    MAX_CONCURRENCY,
    POLL_INTERVAL_S,
    REQUEST_TIMEOUT_S,
    WAIT_TIMEOUT_S,
)
from dagster_runway.client._errors import failure_error
from dagster_runway.errors import RunComfyError
from dagster_runway.retry import RetryPolicy
from dagster_runway.schema import (
    MODEL_ID,
    CancelResult,
    ImageToVideoInput,
    RequestResult,
    RequestStatus,
    Submission,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "USER_AGENT",
    "AsyncRunComfyClient",
    "ModelInfo",
    "ModelPage",
    "RetryPolicy",
    "RunComfyClient",
    "failure_error",
    "input_fingerprint",
]

T = TypeVar("T")
InputLike = ImageToVideoInput | Mapping[str, Any]


def _timeout(request_timeout: float, connect_timeout: float) -> httpx.Timeout:
    return httpx.Timeout(request_timeout, connect=connect_timeout)


class _ClientBase:
    """What both clients share: the request core, the poll interval, and how a wait is built."""

    def __init__(
        self, api_token: str, base_url: str, model_id: str, retry: RetryPolicy | None, poll_interval: float
    ) -> None:
        self._core = RequestCore(api_token=api_token, base_url=base_url, model_id=model_id, retry=retry)
        self.poll_interval = poll_interval
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._core.base_url!r}, model_id={self._core.model_id!r})"

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def model_id(self) -> str:
        return self._core.model_id

    def _wait_call(
        self,
        request_id: str,
        timeout: float,
        poll_interval: float | None,
        on_update: Callable[[RequestStatus], None] | None,
        cancel_on_timeout: bool,
    ) -> Call[RequestResult]:
        return wait_call(
            self._core,
            request_id,
            timeout=timeout,
            poll_interval=self.poll_interval if poll_interval is None else poll_interval,
            on_update=on_update,
            cancel_on_timeout=cancel_on_timeout,
            rng=self._rng,
        )


class RunComfyClient(_ClientBase):
    """Blocking client for one model on RunComfy's Model API.

    >>> with RunComfyClient(api_token=token) as client:
    ...     sub = client.submit({"promptImage": "https://example.com/cat.png", "duration": 5})
    ...     result = client.wait(sub.request_id, timeout=600)
    ...     result.video_url
    """

    def __init__(
        self,
        api_token: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        model_id: str = MODEL_ID,
        request_timeout: float = REQUEST_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        poll_interval: float = POLL_INTERVAL_S,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(api_token, base_url, model_id, retry, poll_interval)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(
            timeout=_timeout(request_timeout, connect_timeout), follow_redirects=False
        )

    def _run(self, call: Call[T]) -> T:
        return run_sync(call, lambda request: self._http.send(request))

    def submit(self, input: InputLike, *, fingerprint: str | None = None) -> Submission:
        """Submit one generation; billed. Never resubmitted after the body was sent (see ``AmbiguousSubmitError``).

        ``fingerprint`` is the caller's identity of this input (the pipeline's generation fingerprint),
        named in an ``AmbiguousSubmitError``; by default, ``input_fingerprint`` of the body."""
        return self._run(self._core.submit(input, fingerprint))

    def model(self, model_id: str | None = None) -> ModelInfo:
        """The catalog's entry of ``model_id`` (by default this client's model): price, unit, input schema."""
        return self._run(self._core.model(model_id))

    def models(
        self,
        *,
        limit: int | None = None,
        offset: int | None = None,
        search: str | None = None,
        category: str | None = None,
    ) -> ModelPage:
        """One page of the catalog, filtered by ``search`` (in the id or name) and ``category``."""
        return self._run(self._core.models(limit=limit, offset=offset, search=search, category=category))

    def status(self, request_id: str) -> RequestStatus:
        return self._run(self._core.status(request_id))

    def result(self, request_id: str, *, include_cost: bool = True) -> RequestResult:
        return self._run(self._core.result(request_id, include_cost=include_cost))

    def cancel(self, request_id: str) -> CancelResult:
        """Cancel a queued request. Best effort: a running or finished one answers ``not_cancellable``."""
        return self._run(self._core.cancel(request_id))

    def wait(
        self,
        request_id: str,
        *,
        timeout: float = WAIT_TIMEOUT_S,
        poll_interval: float | None = None,
        on_update: Callable[[RequestStatus], None] | None = None,
        cancel_on_timeout: bool = False,
    ) -> RequestResult:
        """Poll until the request finishes. Returns the result on success; raises
        ``GenerationFailedError``, ``RequestCancelledError`` or ``WaitTimeoutError`` otherwise."""
        return self._run(self._wait_call(request_id, timeout, poll_interval, on_update, cancel_on_timeout))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRunComfyClient(_ClientBase):
    """Asyncio client with the same surface as ``RunComfyClient``.

    ``max_concurrency`` bounds the calls in flight at once (and the connections), so that
    ``asyncio.gather`` over thousands of requests stays polite to the service. Its own connections are
    spread over pools of at most ``POOL_SIZE``: httpcore's pool spends CPU per call in proportion to
    its connections and reassigns them in bursts (encode/httpx#3215), which collapses throughput
    above ~32 connections in one pool.
    """

    POOL_SIZE = 16

    def __init__(
        self,
        api_token: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        model_id: str = MODEL_ID,
        request_timeout: float = REQUEST_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        poll_interval: float = POLL_INTERVAL_S,
        max_concurrency: int = MAX_CONCURRENCY,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        super().__init__(api_token, base_url, model_id, retry, poll_interval)
        self.max_concurrency = max_concurrency
        self._owns_http = http_client is None
        if http_client is not None:
            self._pools = [http_client]
        else:
            count = -(-max_concurrency // self.POOL_SIZE)
            size = -(-max_concurrency // count)
            self._pools = [
                httpx.AsyncClient(
                    timeout=_timeout(request_timeout, connect_timeout),
                    follow_redirects=False,
                    limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                )
                for _ in range(count)
            ]
        # One token per call allowed in flight, naming the pool it uses; created in the running loop.
        self._slots: asyncio.Queue[int] | None = None

    async def _send(self, request: httpx.Request) -> httpx.Response:
        if self._slots is None:
            self._slots = asyncio.Queue()
            for n in range(self.max_concurrency):
                self._slots.put_nowait(n % len(self._pools))
        pool = await self._slots.get()
        try:
            try:
                response = await self._pools[pool].send(request)
            except httpx.HTTPStatusError as exc:
                response = answer_of(exc)
            await response.aread()
            return response
        finally:
            self._slots.put_nowait(pool)

    async def _run(self, call: Call[T]) -> T:
        outcome: Any = None
        try:
            while True:
                action = call.send(outcome)
                if isinstance(action, Sleep):
                    await asyncio.sleep(action.seconds)
                    outcome = None
                    continue
                try:
                    outcome = await self._send(action.request)
                except httpx.HTTPError as exc:  # every kind: the core decides what it means
                    outcome = exc
        except StopIteration as done:
            return cast(T, done.value)

    async def submit(self, input: InputLike, *, fingerprint: str | None = None) -> Submission:
        """As ``RunComfyClient.submit``."""
        return await self._run(self._core.submit(input, fingerprint))

    async def model(self, model_id: str | None = None) -> ModelInfo:
        """As ``RunComfyClient.model``."""
        return await self._run(self._core.model(model_id))

    async def models(
        self,
        *,
        limit: int | None = None,
        offset: int | None = None,
        search: str | None = None,
        category: str | None = None,
    ) -> ModelPage:
        """As ``RunComfyClient.models``."""
        return await self._run(
            self._core.models(limit=limit, offset=offset, search=search, category=category)
        )

    async def status(self, request_id: str) -> RequestStatus:
        return await self._run(self._core.status(request_id))

    async def result(self, request_id: str, *, include_cost: bool = True) -> RequestResult:
        return await self._run(self._core.result(request_id, include_cost=include_cost))

    async def cancel(self, request_id: str) -> CancelResult:
        return await self._run(self._core.cancel(request_id))

    async def wait(
        self,
        request_id: str,
        *,
        timeout: float = WAIT_TIMEOUT_S,
        poll_interval: float | None = None,
        on_update: Callable[[RequestStatus], None] | None = None,
        cancel_on_timeout: bool = False,
    ) -> RequestResult:
        return await self._run(
            self._wait_call(request_id, timeout, poll_interval, on_update, cancel_on_timeout)
        )

    async def status_many(
        self, request_ids: Iterable[str], *, deadline: float | None = None
    ) -> dict[str, RequestStatus | RunComfyError]:
        """Poll many requests concurrently (bounded by ``max_concurrency``).

        Returns each id's status, or the error its poll ended with. With ``deadline`` (seconds), polls
        still unfinished then are left out of the answer, so a caller with a time budget can go on.
        """
        ids = list(dict.fromkeys(request_ids))

        async def one(request_id: str) -> RequestStatus | RunComfyError:
            try:
                return await self.status(request_id)
            except RunComfyError as exc:
                return exc

        tasks = {asyncio.ensure_future(one(rid)): rid for rid in ids}
        if not tasks:
            return {}
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        answers = {tasks[task]: task.result() for task in done}
        return {rid: answers[rid] for rid in ids if rid in answers}

    async def aclose(self) -> None:
        if self._owns_http:
            for pool in self._pools:
                await pool.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
