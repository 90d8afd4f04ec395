"""Fault injection and the ledger, checked from what a plain httpx client actually sees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.responses import Response

from dagster_runway.emulator import Emulator, FaultRule, account_id
from dagster_runway.emulator.faults import KINDS, FaultKind, Hit
from dagster_runway.emulator.responses import error_response
from tests.fixtures.emulator import MODEL_PATH, Api, ImageServer, data_uri, make_png

Factory = Callable[..., Emulator]
Connect = Callable[..., Api]

IMAGE = data_uri(make_png())
# A connection reset reaches httpx as one of these, never as an HTTP answer.
CONNECTION_ERRORS = (httpx.ReadError, httpx.RemoteProtocolError)


def body_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert isinstance(body, dict)
    return body


# rate_limit


def test_rate_limit_is_429_with_retry_after_and_not_billed(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="submit", times=2, retry_after=3))
    api = http_api(emulator)
    for _ in range(2):
        response = api.submit({"promptImage": IMAGE})
        assert response.status_code == 429 and response.headers["retry-after"] == "3"
        body = body_of(response)
        assert body["error_code"] == 429001 and body["retry_after"] == 3 and body["error_message"]
    assert emulator.ledger().submissions == 0
    assert api.submit({"promptImage": IMAGE}).status_code == 200
    assert emulator.ledger().submissions == 1
    assert emulator.faults()[0]["remaining"] == 0


# server_error


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("endpoint", ["status", "result", "cancel"])
def test_server_errors_on_reads_and_cancel(
    emulator_factory: Factory, http_api: Connect, status: int, endpoint: str
) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    emulator.add_fault(FaultRule(kind="server_error", endpoint=endpoint, status=status, times=1))
    call = getattr(api, endpoint)
    response = call(request_id)
    assert response.status_code == status and body_of(response)["error_code"] == status * 1000 + 1
    assert call(request_id).status_code in (200, 202)
    assert emulator.request_state(request_id) == ("cancelled" if endpoint == "cancel" else "in_queue")


@pytest.mark.parametrize("after_accept", [False, True])
def test_a_server_error_on_submit_is_billed_only_after_accept(
    emulator: Emulator, http_api: Connect, after_accept: bool
) -> None:
    emulator.add_fault(
        FaultRule(kind="server_error", endpoint="submit", status=502, after_accept=after_accept)
    )
    response = http_api(emulator).submit({"promptImage": IMAGE})
    assert response.status_code == 502 and body_of(response)["error_code"] == 502001
    ledger = emulator.ledger()
    assert ledger.submissions == ledger.billed_submissions == int(after_accept)
    if after_accept:  # the request exists and runs, though the client never learnt its id
        request_id = ledger.entries[0].request_id
        assert emulator.request_state(request_id) in ("in_queue", "in_progress", "succeeded")


# reset


@pytest.mark.parametrize("after_accept", [False, True])
def test_a_reset_on_submit_is_a_connection_error(
    emulator: Emulator, http_api: Connect, after_accept: bool
) -> None:
    emulator.add_fault(FaultRule(kind="reset", endpoint="submit", after_accept=after_accept, times=1))
    api = http_api(emulator)
    with pytest.raises(CONNECTION_ERRORS) as info:
        api.submit({"promptImage": IMAGE})
    print(
        f"reset on submit (after_accept={after_accept}): httpx raised {type(info.value).__name__}: {info.value}"
    )
    assert emulator.ledger().billed_submissions == int(after_accept)
    assert api.submit({"promptImage": IMAGE}).status_code == 200  # the client reconnects


@pytest.mark.parametrize("endpoint", ["status", "result", "cancel", "files"])
def test_a_reset_on_other_endpoints_is_a_connection_error_for_async_clients_too(
    emulator: Emulator, http_api: Connect, endpoint: str
) -> None:
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    api.wait(request_id)
    url = {
        "status": f"/v1/requests/{request_id}/status",
        "result": f"/v1/requests/{request_id}/result",
        "cancel": f"/v1/requests/{request_id}/cancel",
        "files": f"/files/{request_id}.mp4",
    }[endpoint]
    method = "POST" if endpoint == "cancel" else "GET"
    emulator.add_fault(FaultRule(kind="reset", endpoint=endpoint, times=1))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(base_url=emulator.base_url, headers=api.http.headers) as client:
            return await client.request(method, url)

    with pytest.raises(CONNECTION_ERRORS):
        asyncio.run(call())
    assert asyncio.run(call()).status_code in (200, 202)


# slow


def test_slow_answers_make_client_timeouts(emulator: Emulator, http_api: Connect) -> None:
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    emulator.add_fault(FaultRule(kind="slow", endpoint="status", delay_seconds=1.0, times=1))
    with pytest.raises(httpx.ReadTimeout):
        api.http.get(f"/v1/requests/{request_id}/status", timeout=0.2)
    assert api.status(request_id).status_code == 200


def test_a_slow_submit_is_recorded_before_the_delay(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(FaultRule(kind="slow", endpoint="submit", delay_seconds=1.0, times=1))
    api = http_api(emulator)
    with pytest.raises(httpx.ReadTimeout):
        api.http.post(MODEL_PATH, json={"promptImage": IMAGE}, timeout=0.2)
    ledger = emulator.ledger()
    assert ledger.billed_submissions == 1
    assert api.finish(ledger.entries[0].request_id)["status"] == "succeeded"


def test_a_slow_submit_before_accept_answers_late_but_normally(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(
        FaultRule(kind="slow", endpoint="submit", delay_seconds=0.2, after_accept=False, times=1)
    )
    response = http_api(emulator).submit({"promptImage": IMAGE})
    assert response.status_code == 200 and emulator.ledger().submissions == 1


# error_code_200


@pytest.mark.parametrize("after_accept", [False, True])
def test_error_code_in_a_200_answer(emulator: Emulator, http_api: Connect, after_accept: bool) -> None:
    emulator.add_fault(
        FaultRule(kind="error_code_200", endpoint="submit", after_accept=after_accept, times=1)
    )
    api = http_api(emulator)
    response = api.submit({"promptImage": IMAGE})
    assert response.status_code == 200
    body = body_of(response)
    assert body["error_code"] == 503001 and body["error_message"] and "request_id" not in body
    assert emulator.ledger().submissions == int(after_accept)
    emulator.add_fault(FaultRule(kind="error_code_200", endpoint="result", status=500, times=1))
    request_id = api.submit_id({"promptImage": IMAGE})
    assert body_of(api.result(request_id))["error_code"] == 500001


@pytest.mark.parametrize("endpoint", ["status", "result", "cancel"])
def test_error_code_in_a_200_answer_on_reads_and_cancel(
    emulator_factory: Factory, http_api: Connect, endpoint: str
) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    emulator.add_fault(FaultRule(kind="error_code_200", endpoint=endpoint, times=1))
    call = getattr(api, endpoint)
    response = call(request_id)
    assert response.status_code == 200
    body = body_of(response)
    assert body["error_code"] == 503001 and body["error_message"]
    assert not {"request_id", "status", "output"} & set(body)
    assert call(request_id).json()["request_id"] == request_id  # the next answer is normal
    assert emulator.request_state(request_id) == ("cancelled" if endpoint == "cancel" else "in_queue")


# Answers that are not the API's: bad_gzip, html_200, wrong_shape_200, gateway_404


@pytest.mark.parametrize("after_accept", [False, True])
def test_bad_gzip_is_an_undecodable_answer_billed_only_after_accept(
    emulator: Emulator, http_api: Connect, after_accept: bool
) -> None:
    emulator.add_fault(FaultRule(kind="bad_gzip", endpoint="submit", after_accept=after_accept, times=1))
    api = http_api(emulator)
    with pytest.raises(httpx.DecodingError):
        api.submit({"promptImage": IMAGE})
    ledger = emulator.ledger()
    assert ledger.submissions == ledger.billed_submissions == int(after_accept)
    if after_accept:  # the request exists and runs, though no client can read its id
        assert api.finish(ledger.entries[0].request_id)["status"] == "succeeded"
    assert api.submit({"promptImage": IMAGE}).status_code == 200


@pytest.mark.parametrize(
    ("kind", "content_type"), [("html_200", "text/html"), ("wrong_shape_200", "application/json")]
)
@pytest.mark.parametrize("endpoint", ["submit", "status", "result", "cancel"])
def test_a_200_that_is_not_the_apis_answer(
    emulator_factory: Factory, http_api: Connect, kind: str, content_type: str, endpoint: str
) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    emulator.add_fault(FaultRule(kind=kind, endpoint=endpoint, times=1))
    response = (
        api.submit({"promptImage": IMAGE}) if endpoint == "submit" else getattr(api, endpoint)(request_id)
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith(content_type)
    assert "request_id" not in response.text and "error_code" not in response.text
    billed = 2 if endpoint == "submit" else 1  # a submit is accepted first by default
    assert emulator.ledger().billed_submissions == billed
    assert (
        emulator.request_state(request_id) == "in_queue"
    )  # answered in the API's place: a cancel did nothing


@pytest.mark.parametrize("endpoint", ["status", "result", "cancel"])
def test_gateway_404_is_an_html_page_about_a_request_that_exists(
    emulator_factory: Factory, http_api: Connect, endpoint: str
) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    emulator.add_fault(FaultRule(kind="gateway_404", endpoint=endpoint, times=1))
    call = getattr(api, endpoint)
    response = call(request_id)
    assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    assert "error_code" not in response.text
    assert emulator.request_state(request_id) == "in_queue"  # the request is there all along
    assert call(request_id).json()["request_id"] == request_id


def test_gateway_404_on_submit_is_never_billed(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(FaultRule(kind="gateway_404", endpoint="submit", times=1))
    assert http_api(emulator).submit({"promptImage": IMAGE}).status_code == 404
    assert emulator.ledger().submissions == 0
    with pytest.raises(ValidationError):
        FaultRule(kind="gateway_404", endpoint="submit", after_accept=True)


# generation_failed


@pytest.mark.parametrize(
    "code", ["INTERNAL.BAD_OUTPUT.CODE01", "SAFETY.INPUT.IMAGE", "SAFETY.INPUT.TEXT", "SAFETY.OUTPUT.VIDEO"]
)
def test_generation_failed_ends_the_request_failed_with_the_code(
    emulator: Emulator, http_api: Connect, code: str
) -> None:
    emulator.add_fault(FaultRule(kind="generation_failed", failure_code=code, times=1))
    api = http_api(emulator)
    failed = api.finish(api.submit_id({"promptImage": IMAGE}))
    assert (
        failed["status"] == "failed"
        and failed["error"]["code"] == code
        and code in failed["error"]["message"]
    )
    assert "output" not in failed and failed["cost"] == pytest.approx(
        0.25
    )  # stays billed, as the ledger says
    assert api.finish(api.submit_id({"promptImage": IMAGE}))["status"] == "succeeded"
    assert emulator.ledger().billed_submissions == 2  # a failed generation stays billed


def test_the_default_failure_code_and_a_custom_message(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(FaultRule(kind="generation_failed", failure_message="Overlaid text detected"))
    api = http_api(emulator)
    error = api.finish(api.submit_id({"promptImage": IMAGE}))["error"]
    assert error == {"code": "INTERNAL.BAD_OUTPUT.CODE01", "message": "Overlaid text detected"}


def test_faults_can_match_a_prompt_substring_or_a_seed(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(
        FaultRule(kind="generation_failed", failure_code="SAFETY.INPUT.TEXT", match_prompt="forbidden")
    )
    emulator.add_fault(
        FaultRule(kind="generation_failed", failure_code="SAFETY.OUTPUT.VIDEO", match_seed=666)
    )
    api = http_api(emulator)
    cases = {
        "SAFETY.INPUT.TEXT": {"promptText": "a forbidden scene"},
        "SAFETY.OUTPUT.VIDEO": {"seed": 666},
        None: {"promptText": "a fine scene", "seed": 665},
    }
    for code, fields in cases.items():
        result = api.finish(api.submit_id({"promptImage": IMAGE, **fields}))
        assert (result.get("error") or {}).get("code") == code


def test_a_matching_rule_applies_to_the_calls_about_that_request(
    emulator_factory: Factory, http_api: Connect
) -> None:
    emulator = emulator_factory(paused=True)
    emulator.add_fault(FaultRule(kind="server_error", endpoint="status", match_seed=13))
    api = http_api(emulator)
    unlucky, lucky = (api.submit_id({"promptImage": IMAGE, "seed": seed}) for seed in (13, 14))
    assert api.status(unlucky).status_code == 503
    assert api.status(lucky).status_code == 200
    assert api.status("unknown").status_code == 404  # no request, so no match


# truncate_video


def test_a_truncated_download_announces_the_full_length(
    emulator: Emulator, http_api: Connect, plain_http: httpx.Client
) -> None:
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    video_url = api.finish(request_id)["output"]["video"]
    size = emulator.ledger().entries[0].video_bytes
    assert size is not None
    emulator.add_fault(FaultRule(kind="truncate_video", truncate_fraction=0.25, times=1))
    received = 0
    with pytest.raises(httpx.RemoteProtocolError) as info, plain_http.stream("GET", video_url) as response:
        assert response.status_code == 200 and int(response.headers["content-length"]) == size
        for chunk in response.iter_raw():
            received += len(chunk)
    print(f"truncate_video: httpx raised {type(info.value).__name__}: {info.value}")
    assert received == int(size * 0.25)
    assert len(plain_http.get(video_url).content) == size  # the next download is whole


# Rules: rate, times, endpoints, validation, HTTP control


def test_rate_draws_are_deterministic_for_a_seed(emulator_factory: Factory, http_api: Connect) -> None:
    def pattern(seed: int) -> list[int]:
        emulator = emulator_factory(random_seed=seed, paused=True)
        api = http_api(emulator)
        request_id = api.submit_id({"promptImage": IMAGE})
        emulator.add_fault(FaultRule(kind="server_error", endpoint="status", rate=0.5))
        return [api.status(request_id).status_code for _ in range(30)]

    first = pattern(3)
    assert first == pattern(3) != pattern(4)
    assert set(first) == {200, 503}


def test_rate_zero_never_fires_and_any_endpoint_hits_every_call(
    emulator_factory: Factory, http_api: Connect
) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    emulator.add_fault(FaultRule(kind="rate_limit", rate=0.0))
    request_id = api.submit_id({"promptImage": IMAGE})
    emulator.clear_faults()
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="any", times=4))
    calls = [
        api.submit({"promptImage": IMAGE}),
        api.status(request_id),
        api.result(request_id),
        api.cancel(request_id),
    ]
    assert [response.status_code for response in calls] == [429] * 4
    assert api.cancel(request_id).json()["outcome"] == "cancelled"


def test_faults_from_the_config_are_active_from_the_start(
    emulator_factory: Factory, http_api: Connect
) -> None:
    emulator = emulator_factory(faults=[FaultRule(kind="rate_limit", endpoint="submit", times=1)])
    api = http_api(emulator)
    assert api.submit({"promptImage": IMAGE}).status_code == 429
    assert api.submit({"promptImage": IMAGE}).status_code == 200


@pytest.mark.parametrize(
    "rule",
    [
        {"kind": "truncate_video", "endpoint": "submit"},
        {"kind": "generation_failed", "endpoint": "status"},
        {"kind": "rate_limit", "after_accept": True},
        {"kind": "server_error", "status": 501},
        {"kind": "rate_limit", "rate": 1.5},
        {"kind": "explode"},
        {"kind": "slow", "delay": 1},
    ],
)
def test_invalid_rules_are_refused(rule: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FaultRule.model_validate(rule)


def test_each_kind_is_valid_exactly_on_the_endpoints_and_accept_sides_it_declares() -> None:
    for name, kind in KINDS.items():
        assert name in FaultRule.model_fields["kind"].description
        for endpoint in ["submit", "status", "result", "cancel", "files", "any"]:
            valid = endpoint == "any" or endpoint in kind.calls
            assert _is_valid({"kind": name, "endpoint": endpoint}) == valid, (name, endpoint)
        for after_accept in (False, True):
            valid = after_accept in kind.after_accept
            assert _is_valid({"kind": name, "after_accept": after_accept}) == valid, (name, after_accept)
        assert FaultRule(kind=name).accepts_first == kind.after_accept[0]


def _is_valid(rule: dict[str, Any]) -> bool:
    try:
        FaultRule.model_validate(rule)
    except ValidationError:
        return False
    return True


def test_a_new_kind_is_one_entry_in_the_registry(
    emulator: Emulator, http_api: Connect, plain_http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def teapot(rule: FaultRule, hit: Hit) -> Response:
        return error_response(418, 418001, f"I'm a teapot ({hit.call})")

    monkeypatch.setitem(KINDS, "teapot", FaultKind("418 on reads.", teapot, calls=("status", "result")))
    added = plain_http.post(f"{emulator.base_url}/_emulator/faults", json={"kind": "teapot", "times": 2})
    assert added.status_code == 200, added.text
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})  # submit is not one of its calls
    teapots = [api.status(request_id), api.result(request_id)]
    assert [(r.status_code, body_of(r)["error_code"]) for r in teapots] == [(418, 418001)] * 2
    assert api.status(request_id).status_code == 200
    with pytest.raises(ValidationError):
        FaultRule(kind="teapot", endpoint="submit")


def test_faults_over_http(emulator: Emulator, http_api: Connect, plain_http: httpx.Client) -> None:
    admin = f"{emulator.base_url}/_emulator/faults"
    one = plain_http.post(admin, json={"kind": "rate_limit", "endpoint": "submit", "times": 1})
    assert one.status_code == 200 and one.json()["faults"][0]["remaining"] == 1
    many = plain_http.post(admin, json=[{"kind": "server_error", "endpoint": "status"}, {"kind": "reset"}])
    assert [rule["kind"] for rule in many.json()["faults"]] == ["rate_limit", "server_error", "reset"]
    assert http_api(emulator).submit({"promptImage": IMAGE}).status_code == 429
    bad = plain_http.post(admin, json={"kind": "explode"})
    assert bad.status_code == 422 and bad.json()["error_code"] == 422001
    assert bad.json()["detail"][0]["loc"][-1] == "kind"
    assert plain_http.post(admin, content=b"{oops").status_code == 422
    assert plain_http.delete(admin).json() == {"faults": []}
    assert emulator.faults() == []


# The ledger


def test_the_ledger_counts_submissions_per_fingerprint(
    emulator_factory: Factory, http_api: Connect, image_server: ImageServer, plain_http: httpx.Client
) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    url = image_server.serve("/cat.png", make_png())
    presigned = [api.submit_id({"promptImage": f"{url}?X-Amz-Signature={sig}&X-Amz-Date=1"}) for sig in "ab"]
    plain = api.submit_id({"promptImage": url, "ratio": "1280:720", "duration": 5})  # the defaults, spelt out
    other_seed = api.submit_id({"promptImage": url, "seed": 1})
    other_image = api.submit_id({"promptImage": image_server.serve("/dog.png", make_png())})
    inline = [
        api.submit_id({"promptImage": data_uri(make_png(), mime)}) for mime in ("image/png", "image/x-png")
    ]

    ledger = emulator.ledger()
    fingerprint = {entry.request_id: entry.fingerprint for entry in ledger.entries}
    assert fingerprint[presigned[0]] == fingerprint[presigned[1]] == fingerprint[plain]
    assert fingerprint[other_seed] != fingerprint[plain] != fingerprint[other_image]
    assert fingerprint[inline[0]] == fingerprint[inline[1]]  # data URIs by the sha256 of their bytes
    same = ledger.by_fingerprint[fingerprint[plain]]
    assert same.submissions == 3 and same.cost_usd == pytest.approx(0.75)
    assert same.request_ids == [*presigned, plain]
    assert ledger.submissions == ledger.billed_submissions == 7
    assert ledger.total_cost_usd == pytest.approx(7 * 0.25)
    assert plain_http.get(f"{emulator.base_url}/_emulator/ledger").json() == ledger.model_dump(mode="json")


def test_a_cancelled_request_is_refunded_but_listed(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    kept, cancelled = (api.submit_id({"promptImage": IMAGE, "duration": 10}) for _ in range(2))
    api.cancel(cancelled)
    ledger = emulator.ledger()
    entries = {entry.request_id: entry for entry in ledger.entries}
    assert (entries[cancelled].state, entries[cancelled].cost_usd) == ("cancelled", 0.0)
    assert (entries[kept].state, entries[kept].cost_usd) == ("in_queue", 0.5)
    assert ledger.submissions == 2 and ledger.billed_submissions == 1 and ledger.total_cost_usd == 0.5
    total = ledger.by_fingerprint[entries[kept].fingerprint]
    assert (total.submissions, total.billed_submissions, total.cost_usd) == (2, 1, 0.5)


def test_the_ledger_names_accounts_by_a_hash_never_the_token(
    emulator_factory: Factory, http_api: Connect, plain_http: httpx.Client
) -> None:
    emulator = emulator_factory(tokens=["secret-token-1", "secret-token-2"])
    for token in emulator.config.tokens:
        http_api(emulator, token).submit_id({"promptImage": IMAGE})
    ledger = emulator.ledger()
    assert [entry.account for entry in ledger.entries] == [account_id(t) for t in emulator.config.tokens]
    assert "secret-token" not in plain_http.get(f"{emulator.base_url}/_emulator/ledger").text
    assert "secret-token" not in ledger.model_dump_json()
