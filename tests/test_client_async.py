"""What only the async client does: ``status_many`` under a concurrency bound and a deadline, and
many calls in flight at once. Plus each client's own connection lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dagster_runway.client import AsyncRunComfyClient, RunComfyClient
from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.errors import InputValidationError, RequestNotFoundError
from dagster_runway.schema import RequestState, RequestStatus
from tests.test_client import FAST_RETRY, TLS, image_input


class InFlight(httpx.AsyncBaseTransport):
    """Real loopback HTTP that also counts how many requests are in flight at once."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(verify=TLS)
        self.now = 0
        self.peak = 0
        self.total = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.total += 1
        self.peak = max(self.peak, self.now)
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.now -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def async_client(emulator: Emulator, **kwargs: Any) -> AsyncRunComfyClient:
    kwargs.setdefault("retry", FAST_RETRY)
    return AsyncRunComfyClient(emulator.token, base_url=emulator.base_url, **kwargs)


def test_status_many_answers_each_id_once_in_order_with_errors_in_place(
    emulator_factory: Callable[..., Emulator],
) -> None:
    emulator = emulator_factory(paused=True)

    async def run() -> tuple[list[str], dict[str, RequestStatus | Exception]]:
        async with async_client(emulator) as client:
            ids = [(await client.submit(image_input(f"n{n}"))).request_id for n in range(6)]
            asked = [ids[3], "unknown-id", *ids, ids[0], "not/valid"]
            return ids, await client.status_many(asked)

    ids, answers = asyncio.run(run())
    assert list(answers) == [ids[3], "unknown-id", *[i for i in ids if i != ids[3]], "not/valid"]
    assert isinstance(answers["unknown-id"], RequestNotFoundError)
    assert isinstance(answers["not/valid"], InputValidationError)
    for request_id in ids:
        status = answers[request_id]
        assert isinstance(status, RequestStatus)
        assert status.request_id == request_id and status.status is RequestState.IN_QUEUE


def test_status_many_of_nothing() -> None:
    async def run() -> dict[str, object]:
        async with AsyncRunComfyClient("token", base_url="http://127.0.0.1:9") as client:
            return await client.status_many([])

    assert asyncio.run(run()) == {}


def test_status_many_stays_within_max_concurrency(emulator_factory: Callable[..., Emulator]) -> None:
    emulator = emulator_factory(paused=True, latency_seconds=0.02)
    transport = InFlight()

    async def run() -> dict[str, object]:
        async with httpx.AsyncClient(transport=transport, timeout=10.0) as http:
            client = async_client(emulator, http_client=http, max_concurrency=3)
            ids = await asyncio.gather(*(client.submit(image_input(f"n{n}")) for n in range(12)))
            return await client.status_many([submission.request_id for submission in ids])

    answers = asyncio.run(run())
    assert len(answers) == 12 and all(isinstance(answer, RequestStatus) for answer in answers.values())
    assert transport.total == 24
    assert 1 < transport.peak <= 3
    assert emulator.ledger().billed_submissions == 12


def test_its_own_connection_pools_together_stay_within_max_concurrency(
    emulator_factory: Callable[..., Emulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over 16 calls in flight, the client spreads its connections over several httpx pools;
    # the bound holds across all of them. Count the calls inside httpx.AsyncClient.send.
    emulator = emulator_factory(paused=True, latency_seconds=0.05)
    counts = {"now": 0, "peak": 0, "total": 0}
    send = httpx.AsyncClient.send

    async def counting_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        counts["now"] += 1
        counts["total"] += 1
        counts["peak"] = max(counts["peak"], counts["now"])
        try:
            return await send(self, request, **kwargs)
        finally:
            counts["now"] -= 1

    async def run() -> dict[str, object]:
        async with async_client(emulator, max_concurrency=40) as client:
            ids = [(await client.submit(image_input(f"n{n}"))).request_id for n in range(8)]
            monkeypatch.setattr(httpx.AsyncClient, "send", counting_send)
            return await client.status_many([*ids, *(f"missing-{n}" for n in range(112))])

    answers = asyncio.run(run())
    assert len(answers) == 120
    assert sum(isinstance(answer, RequestStatus) for answer in answers.values()) == 8
    assert sum(isinstance(answer, RequestNotFoundError) for answer in answers.values()) == 112
    assert counts["total"] == 120
    assert 16 < counts["peak"] <= 40


def test_status_many_leaves_out_what_the_deadline_cut_off(emulator_factory: Callable[..., Emulator]) -> None:
    emulator = emulator_factory(paused=True)

    async def run() -> tuple[list[str], dict[str, object]]:
        async with async_client(emulator, max_concurrency=8) as client:
            ids = [(await client.submit(image_input(f"n{n}"))).request_id for n in range(5)]
            # The answer about one request hangs far longer than the caller's budget.
            emulator.add_fault(
                FaultRule(kind="slow", endpoint="status", delay_seconds=3.0, match_prompt="n2")
            )
            return ids, await client.status_many(ids, deadline=0.5)

    ids, answers = asyncio.run(run())
    assert list(answers) == [ids[0], ids[1], ids[3], ids[4]]
    assert all(isinstance(answer, RequestStatus) for answer in answers.values())


def test_many_concurrent_submits_are_each_billed_once(emulator: Emulator) -> None:
    async def run() -> list[str]:
        async with async_client(emulator, max_concurrency=8) as client:
            submissions = await asyncio.gather(*(client.submit(image_input(f"p{n}")) for n in range(20)))
            results = await asyncio.gather(
                *(client.wait(s.request_id, timeout=30, poll_interval=0.01) for s in submissions)
            )
            assert all(result.status is RequestState.SUCCEEDED for result in results)
            return [s.request_id for s in submissions]

    ids = asyncio.run(run())
    ledger = emulator.ledger()
    assert len(set(ids)) == 20
    assert ledger.billed_submissions == 20 and len(ledger.by_fingerprint) == 20
    assert sorted(entry.request_id for entry in ledger.entries) == sorted(ids)


def test_max_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        AsyncRunComfyClient("token", max_concurrency=0)


# -- connection lifetime ---------------------------------------------------------------------------------


def test_sync_client_with_its_own_connection_pool(emulator: Emulator) -> None:
    with RunComfyClient(
        emulator.token, base_url=emulator.base_url, retry=FAST_RETRY, poll_interval=0.01
    ) as client:
        request_id = client.submit(image_input()).request_id
        assert client.wait(request_id, timeout=30).status is RequestState.SUCCEEDED
        assert client.base_url == emulator.base_url
    with pytest.raises(RuntimeError):  # closed with the with-block
        client.status(request_id)


def test_async_client_with_its_own_connection_pool(emulator: Emulator) -> None:
    async def run() -> AsyncRunComfyClient:
        async with AsyncRunComfyClient(
            emulator.token, base_url=emulator.base_url, retry=FAST_RETRY, poll_interval=0.01
        ) as client:
            request_id = (await client.submit(image_input())).request_id
            assert (await client.wait(request_id, timeout=30)).status is RequestState.SUCCEEDED
        with pytest.raises(RuntimeError):
            await client.status(request_id)
        return client

    asyncio.run(run())


def test_a_borrowed_http_client_is_left_open(emulator: Emulator) -> None:
    http = httpx.Client(verify=TLS)
    with RunComfyClient(emulator.token, base_url=emulator.base_url, http_client=http) as client:
        client.submit(image_input())
    assert not http.is_closed
    http.close()

    async def run() -> None:
        ahttp = httpx.AsyncClient(verify=TLS)
        async with AsyncRunComfyClient(
            emulator.token, base_url=emulator.base_url, http_client=ahttp
        ) as client:
            await client.submit(image_input())
        assert not ahttp.is_closed
        await ahttp.aclose()

    asyncio.run(run())
    assert emulator.ledger().billed_submissions == 2
