"""The emulator's protocol over loopback HTTP: endpoints, states, auth, validation, expiry, control.

Each expectation comes from reference/runcomfy-api.md (sections 1-6, 12) and the seed's schema.
"""

from __future__ import annotations

import ast
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import dagster_runway.emulator
from dagster_runway.emulator import Emulator, EmulatorConfig, account_id
from dagster_runway.schema import MODEL_ID, SEED_MAX
from tests.fixtures.emulator import MODEL_PATH, Api, data_uri, make_png

IMAGE = data_uri(make_png())
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d$")
# Requests stay in progress for 0.3 s, with no queue wait.
STEADY: dict[str, Any] = {"time_scale": 0.01, "queue_seconds": (0, 0), "render_seconds": (30, 30)}

Factory = Callable[..., Emulator]
Connect = Callable[..., Api]


def error_of(response: httpx.Response) -> tuple[int, int]:
    body = response.json()
    assert set(body) >= {"error_code", "error_message", "detail"}
    assert isinstance(body["error_message"], str) and body["error_message"]
    return response.status_code, body["error_code"]


# Submit


def test_submit_answers_the_request_id_and_absolute_urls(
    emulator: Emulator, http_api: Connect, plain_http: httpx.Client
) -> None:
    api = http_api(emulator)
    response = api.submit({"promptImage": IMAGE})
    assert response.status_code == 200
    body = response.json()
    request_id = body["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    prefix = f"{emulator.base_url}/v1/requests/{request_id}"
    assert body == {
        "request_id": request_id,
        "status_url": f"{prefix}/status",
        "result_url": f"{prefix}/result",
        "cancel_url": f"{prefix}/cancel",
    }
    assert plain_http.get(body["status_url"], headers=api.http.headers).json()["request_id"] == request_id


def test_an_unknown_model_is_404_with_400001_and_not_billed(emulator: Emulator, http_api: Connect) -> None:
    api = http_api(emulator)
    response = api.submit({"promptImage": IMAGE}, model_path="/v1/models/runwayml/no-such-model")
    assert error_of(response) == (404, 400001)
    assert emulator.ledger().submissions == 0


def test_unknown_routes_and_methods_answer_the_error_body(emulator: Emulator, http_api: Connect) -> None:
    api = http_api(emulator)
    assert error_of(api.http.get("/v2/nothing")) == (404, 404001)
    assert error_of(api.http.put(MODEL_PATH)) == (405, 405001)  # GET is the catalog entry now


# States, one by one (the table of reference section 12)


def test_a_queued_request(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    status = api.status(request_id).json()
    assert status["status"] == "in_queue" and status["queue_position"] == 1
    assert status["status_url"].endswith(f"/v1/requests/{request_id}/status")
    assert status["result_url"].endswith(f"/v1/requests/{request_id}/result")
    result = api.result(request_id, include_cost=True).json()
    assert result["status"] == "in_queue" and result["model_id"] == MODEL_ID
    assert TIMESTAMP.match(result["created_at"])
    assert not {"started_at", "finished_at", "output", "error", "cost"} & set(result)
    assert emulator.request_state(request_id) == "in_queue"


def test_an_in_progress_request_cannot_be_cancelled(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(**STEADY | {"render_seconds": (1000, 1000)})
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    status = api.status(request_id).json()
    assert status["status"] == "in_progress" and "queue_position" not in status
    result = api.result(request_id, include_cost=True).json()
    assert result["status"] == "in_progress"
    assert TIMESTAMP.match(result["started_at"]) and "finished_at" not in result and "cost" not in result
    cancel = api.cancel(request_id)
    assert cancel.status_code == 202
    assert cancel.json() == {"request_id": request_id, "status": "in_progress", "outcome": "not_cancellable"}
    assert emulator.request_state(request_id) == "in_progress"


def test_a_succeeded_request(emulator: Emulator, http_api: Connect, plain_http: httpx.Client) -> None:
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE, "duration": 10})
    assert api.wait(request_id)["status"] == "completed"
    result = api.result(request_id).json()
    assert result["status"] == "succeeded" and result["model_id"] == MODEL_ID
    assert result["output"] == {"video": f"{emulator.base_url}/files/{request_id}.mp4"}
    assert "cost" not in result and "error" not in result
    created, started, finished = (
        datetime.fromisoformat(result[key]) for key in ("created_at", "started_at", "finished_at")
    )
    assert all(TIMESTAMP.match(result[key]) for key in ("created_at", "started_at", "finished_at"))
    assert created <= started <= finished and created.utcoffset() is not None
    assert api.result(request_id, include_cost=True).json()["cost"] == pytest.approx(0.5)
    cancel = api.cancel(request_id).json()
    assert (cancel["status"], cancel["outcome"]) == ("completed", "not_cancellable")
    assert emulator.request_state(request_id) == "succeeded"
    video = plain_http.get(result["output"]["video"])
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"


def test_a_failed_request_is_completed_on_status_and_failed_on_result(
    emulator: Emulator, http_api: Connect
) -> None:
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": data_uri(b"not an image")})
    assert api.wait(request_id)["status"] == "completed"
    result = api.result(request_id, include_cost=True).json()
    assert result["status"] == "failed"
    assert (
        result["error"]["code"] == "ASSET.INVALID" and "not a decodable image" in result["error"]["message"]
    )
    assert "output" not in result and result["cost"] == pytest.approx(0.25)  # bill_failed: the ledger's cost
    assert TIMESTAMP.match(result["finished_at"])
    cancel = api.cancel(request_id).json()
    assert (cancel["status"], cancel["outcome"]) == ("completed", "not_cancellable")
    assert emulator.request_state(request_id) == "failed"


def test_a_queued_request_can_be_cancelled_once(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    cancel = api.cancel(request_id)
    assert cancel.status_code == 202
    assert cancel.json() == {"request_id": request_id, "status": "cancelled", "outcome": "cancelled"}
    status = api.status(request_id).json()
    assert status["status"] == "cancelled" and "queue_position" not in status
    result = api.result(request_id, include_cost=True).json()
    assert result["status"] == "cancelled" and TIMESTAMP.match(result["finished_at"])
    assert not {"output", "error", "cost", "started_at"} & set(result)
    again = api.cancel(request_id)
    assert again.status_code == 202 and again.json()["outcome"] == "not_cancellable"
    assert again.json()["status"] == "cancelled"
    emulator.resume()
    assert api.status(request_id).json()["status"] == "cancelled"
    assert emulator.request_state(request_id) == "cancelled"


def test_queue_positions_fall_as_slots_free(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(max_concurrency=1, **STEADY)
    api = http_api(emulator)
    first, second, third = (api.submit_id({"promptImage": IMAGE, "seed": n}) for n in range(3))
    assert api.status(first).json()["status"] == "in_progress"
    assert api.status(second).json()["queue_position"] == 1
    assert api.status(third).json()["queue_position"] == 2
    api.wait(third, until=lambda status: status.get("queue_position") == 1)
    assert api.status(second).json()["status"] == "in_progress"
    assert api.status(first).json()["status"] == "completed"
    api.wait(third, until=lambda status: status["status"] == "in_progress")
    assert api.wait(third)["status"] == "completed"
    results = [api.result(request_id).json() for request_id in (first, second, third)]
    # One at a time: each starts when the one before it has finished.
    for before, after in zip(results, results[1:], strict=False):
        assert datetime.fromisoformat(after["started_at"]) >= datetime.fromisoformat(before["finished_at"])


def test_the_concurrency_limit_is_per_account(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(
        tokens=["a", "b"], max_concurrency=2, **STEADY | {"render_seconds": (1000, 1000)}
    )
    alice, bob = http_api(emulator, "a"), http_api(emulator, "b")
    alices = [alice.submit_id({"promptImage": IMAGE}) for _ in range(3)]
    bobs = [bob.submit_id({"promptImage": IMAGE}) for _ in range(2)]
    assert [emulator.request_state(r) for r in alices] == ["in_progress", "in_progress", "in_queue"]
    assert [emulator.request_state(r) for r in bobs] == ["in_progress", "in_progress"]
    assert alice.status(alices[2]).json()["queue_position"] == 1


def test_concurrent_polling_keeps_the_limit_and_the_order(
    emulator_factory: Factory, http_api: Connect
) -> None:
    emulator = emulator_factory(tokens=["a", "b"], max_concurrency=3, **STEADY | {"render_seconds": (5, 5)})
    apis = {token: http_api(emulator, token) for token in ("a", "b")}
    submitted: dict[str, list[str]] = {"a": [], "b": []}
    seen_positions: list[int] = []
    errors: list[BaseException] = []

    def poll(token: str) -> None:
        # Each thread submits and polls through its own client, while the others do the same.
        api = Api(emulator, token)
        try:
            for n in range(6):
                submitted[token].append(api.submit_id({"promptImage": IMAGE, "seed": n}))
            for request_id in list(submitted[token]):
                status = api.wait(
                    request_id, until=lambda s: s["status"] == "completed" or "queue_position" in s
                )
                seen_positions.extend([status["queue_position"]] if "queue_position" in status else [])
                api.wait(request_id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            api.close()

    threads = [threading.Thread(target=poll, args=(token,)) for token in ("a", "a", "b", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(position >= 1 for position in seen_positions)
    for token, api in apis.items():
        results = [api.result(request_id).json() for request_id in submitted[token]]
        assert {r["status"] for r in results} == {"succeeded"} and len(results) == 12
        # At no moment of the emulator clock are more than 3 of one account's requests in progress.
        events = sorted(
            [(datetime.fromisoformat(r["started_at"]), 1) for r in results]
            + [(datetime.fromisoformat(r["finished_at"]), -1) for r in results]
        )
        running = peak = 0
        for _, change in events:
            running += change
            peak = max(peak, running)
        assert peak == 3
        # With no queue wait, the oldest waiting request starts first.
        order = [e.request_id for e in emulator.ledger().entries if e.account == account_id(token)]
        starts = [api.result(request_id).json()["started_at"] for request_id in order]
        assert starts == sorted(starts)


def test_a_ten_second_video_renders_longer(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(time_scale=0.01, queue_seconds=(0, 0), render_seconds=(20, 20))
    api = http_api(emulator)
    short = api.finish(api.submit_id({"promptImage": IMAGE, "duration": 5}))
    long = api.finish(api.submit_id({"promptImage": IMAGE, "duration": 10}))

    def rendering(result: dict[str, Any]) -> float:
        return (
            datetime.fromisoformat(result["finished_at"]) - datetime.fromisoformat(result["started_at"])
        ).total_seconds()

    # Rendering ends at started + drawn time (0.2 s and 0.32 s here) unless the real work takes longer.
    assert rendering(short) >= 0.2 - 1e-5 and rendering(long) >= 0.32 - 1e-5


# Auth and accounts


def test_a_missing_or_wrong_token_is_401_with_400004(
    emulator: Emulator, http_api: Connect, plain_http: httpx.Client
) -> None:
    request_id = http_api(emulator).submit_id({"promptImage": IMAGE})
    anonymous, wrong = http_api(emulator, anonymous=True), http_api(emulator, "wrong-token")
    basic = {"Authorization": f"Basic {emulator.token}"}
    for api_call in (
        lambda: anonymous.submit({"promptImage": IMAGE}),
        lambda: anonymous.status(request_id),
        lambda: wrong.result(request_id),
        lambda: wrong.cancel(request_id),
        lambda: plain_http.get(f"{emulator.base_url}/v1/requests/{request_id}/status", headers=basic),
    ):
        response = api_call()
        assert error_of(response) == (401, 400004)
        assert emulator.token not in response.text and "wrong-token" not in response.text
    assert emulator.ledger().submissions == 1


def test_the_auth_error_status_is_configurable(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(auth_error_status=400)
    assert error_of(http_api(emulator, "nope").status("x")) == (400, 400004)


def test_another_accounts_request_is_403_with_403001(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(tokens=["owner", "other"])
    owner, other = http_api(emulator, "owner"), http_api(emulator, "other")
    request_id = owner.submit_id({"promptImage": IMAGE})
    for response in (other.status(request_id), other.result(request_id), other.cancel(request_id)):
        assert error_of(response) == (403, 403001)
    assert owner.status(request_id).status_code == 200
    assert emulator.ledger().entries[0].account == account_id("owner")


def test_an_unknown_request_id_is_404_with_404001(
    emulator: Emulator, http_api: Connect, plain_http: httpx.Client
) -> None:
    api = http_api(emulator)
    for response in (api.status("nope"), api.result("nope"), api.cancel("nope")):
        assert error_of(response) == (404, 404001)
    assert plain_http.get(f"{emulator.base_url}/files/nope.mp4").status_code == 404
    with pytest.raises(KeyError):
        emulator.request_state("nope")


# Validation (422 + 422001, with the field named)

VALID: dict[str, Any] = {
    "promptImage": IMAGE,
    "promptText": "a slow pan",
    "ratio": "960:960",
    "duration": 5,
    "seed": 7,
}

MISSING = object()

INVALID_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing image", {"promptImage": MISSING}, "promptImage"),
    ("image not a string", {"promptImage": 5}, "promptImage"),
    ("image ftp", {"promptImage": "ftp://example.com/a.png"}, "promptImage"),
    (
        "image http on a public host",
        {"promptImage": "http://example.com/a.png?X-Amz-Signature=s3cr3t"},
        "promptImage",
    ),
    ("image relative", {"promptImage": "/tmp/a.png"}, "promptImage"),
    ("data uri not an image", {"promptImage": "data:text/plain;base64,aGVsbG8="}, "promptImage"),
    ("data uri not base64", {"promptImage": "data:image/png,rawbytes"}, "promptImage"),
    ("data uri bad base64", {"promptImage": "data:image/png;base64,@@@"}, "promptImage"),
    ("prompt too long", {"promptText": "x" * 1001}, "promptText"),
    ("prompt not a string", {"promptText": ["x"]}, "promptText"),
    ("ratio not in enum", {"ratio": "1920:1080"}, "ratio"),
    ("ratio not a string", {"ratio": 1.5}, "ratio"),
    ("duration 7", {"duration": 7}, "duration"),
    ("duration string", {"duration": "5"}, "duration"),
    ("duration boolean", {"duration": True}, "duration"),
    ("seed negative", {"seed": -1}, "seed"),
    ("seed too big", {"seed": SEED_MAX + 1}, "seed"),
    ("seed string", {"seed": "1"}, "seed"),
    ("seed fraction", {"seed": 1.5}, "seed"),
    ("seed boolean", {"seed": True}, "seed"),
    ("seed null", {"seed": None}, "seed"),
]


@pytest.mark.parametrize(
    ("change", "field"), [case[1:] for case in INVALID_CASES], ids=[c[0] for c in INVALID_CASES]
)
def test_schema_violations_are_422_naming_the_field(
    emulator: Emulator, http_api: Connect, change: dict[str, Any], field: str
) -> None:
    body = {key: value for key, value in (VALID | change).items() if value is not MISSING}
    response = http_api(emulator).submit(body)
    assert error_of(response) == (422, 422001)
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert [item["loc"] for item in detail] == [["body", field]]
    assert all(isinstance(item["msg"], str) and isinstance(item["type"], str) for item in detail)
    assert field in response.json()["error_message"]
    assert "s3cr3t" not in response.text
    assert emulator.ledger().submissions == 0


def test_every_violation_is_listed(emulator: Emulator, http_api: Connect) -> None:
    response = http_api(emulator).submit({"ratio": "1:1", "duration": 6, "seed": -5})
    assert error_of(response) == (422, 422001)
    fields = [item["loc"][1] for item in response.json()["detail"]]
    assert fields == ["promptImage", "ratio", "duration", "seed"]


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"{not json", b""])
def test_a_body_that_is_not_a_json_object_is_422(emulator: Emulator, http_api: Connect, raw: bytes) -> None:
    response = http_api(emulator).http.post(
        MODEL_PATH, content=raw, headers={"Content-Type": "application/json"}
    )
    assert error_of(response) == (422, 422001)
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_a_data_uri_over_5_mb_is_422(emulator: Emulator, http_api: Connect) -> None:
    big = "data:image/png;base64," + "A" * (5 * 1024 * 1024)
    response = http_api(emulator).submit({"promptImage": big})
    assert error_of(response) == (422, 422001)
    assert response.json()["detail"][0]["loc"] == ["body", "promptImage"]
    assert "5 MB" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 0},
        {"seed": SEED_MAX},
        {"seed": 12.0},
        {"duration": 10},
        {"promptText": "x" * 1000},
        {"promptText": ""},
        {"ratio": "720:1280"},
        {"promptImage": "https://images.example.com/a.png?X-Amz-Signature=abc"},
        {"promptImage": "http://localhost:9/a.png"},
        {"promptImage": "http://127.0.0.2:9/a.png"},
        {"promptImage": "http://[::1]:9/a.png"},
        {"promptImage": "data:image/jpeg;name=a.jpg;base64,/9j/4AAQ"},
        {"extra": "ignored"},
    ],
    ids=lambda change: ",".join(f"{k}={str(v)[:24]}" for k, v in change.items()),
)
def test_edge_values_are_accepted(
    emulator_factory: Factory, http_api: Connect, change: dict[str, Any]
) -> None:
    emulator = emulator_factory(paused=True)  # nothing is fetched
    assert http_api(emulator).submit(VALID | change).status_code == 200


def test_http_on_any_host_can_be_allowed(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(paused=True, allow_any_http=True)
    assert http_api(emulator).submit({"promptImage": "http://example.com/a.png"}).status_code == 200


# Expiry, cost, balance


def test_requests_expire_after_the_ttl(
    emulator_factory: Factory, http_api: Connect, plain_http: httpx.Client
) -> None:
    emulator = emulator_factory(ttl_seconds=0.5)
    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    video_url = api.finish(request_id)["output"]["video"]
    assert plain_http.get(video_url).status_code == 200
    deadline = time.monotonic() + 10
    while emulator.request_state(request_id) != "expired":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for response in (api.status(request_id), api.result(request_id), api.cancel(request_id)):
        assert error_of(response) == (404, 404001)
    assert plain_http.get(video_url).status_code == 404
    entry = emulator.ledger().entries[0]
    assert entry.expired and entry.cost_usd == 0.25


def test_cost_is_price_per_second_times_duration(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(price_per_second=0.07)
    api = http_api(emulator)
    five, ten = (api.submit_id({"promptImage": IMAGE, "duration": d}) for d in (5, 10))
    assert api.finish(five)["cost"] == pytest.approx(0.35)
    assert api.finish(ten)["cost"] == pytest.approx(0.7)
    assert emulator.ledger().total_cost_usd == pytest.approx(1.05)


def test_a_submit_past_the_balance_is_402_with_400002(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(tokens=["a", "b"], balance_usd=0.5, paused=True)
    alice, bob = http_api(emulator, "a"), http_api(emulator, "b")
    first = alice.submit_id({"promptImage": IMAGE})
    alice.submit_id({"promptImage": IMAGE})
    response = alice.submit({"promptImage": IMAGE})
    assert error_of(response) == (402, 400002)
    assert "$0.25" in response.json()["error_message"]
    assert error_of(alice.submit({"promptImage": IMAGE, "duration": 10})) == (402, 400002)
    assert bob.submit({"promptImage": IMAGE}).status_code == 200  # another account, its own balance
    assert alice.cancel(first).json()["outcome"] == "cancelled"  # the refund frees credit
    assert alice.submit({"promptImage": IMAGE}).status_code == 200
    ledger = emulator.ledger()
    assert ledger.submissions == 4 and ledger.billed_submissions == 3


def test_the_balance_status_is_configurable(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(balance_usd=0.0, insufficient_balance_status=400)
    assert error_of(http_api(emulator).submit({"promptImage": IMAGE})) == (400, 400002)


# Control: pause, resume, reset, latency


def test_pause_freezes_queued_and_running_requests(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(**STEADY)
    api = http_api(emulator)
    running = api.submit_id({"promptImage": IMAGE})
    emulator.pause()
    queued = api.submit_id({"promptImage": IMAGE})
    time.sleep(0.4)  # longer than the render time
    assert api.status(running).json()["status"] == "in_progress"
    assert api.status(queued).json()["queue_position"] == 1
    emulator.resume()
    assert api.wait(running)["status"] == "completed"
    assert api.wait(queued)["status"] == "completed"


def test_admin_endpoints_pause_resume_and_reset(
    emulator: Emulator, http_api: Connect, plain_http: httpx.Client
) -> None:
    api = http_api(emulator)
    admin = f"{emulator.base_url}/_emulator"
    assert plain_http.post(f"{admin}/pause").json() == {"paused": True}
    request_id = api.submit_id({"promptImage": IMAGE})
    assert emulator.request_state(request_id) == "in_queue"
    assert plain_http.post(f"{admin}/resume").json() == {"paused": False}
    api.wait(request_id)
    assert plain_http.get(f"{admin}/ledger").json()["submissions"] == 1
    assert plain_http.post(f"{admin}/reset").json() == {"reset": True}
    assert error_of(api.status(request_id)) == (404, 404001)
    assert plain_http.get(f"{admin}/ledger").json() == emulator.ledger().model_dump(mode="json")
    assert emulator.ledger().submissions == 0


def test_reset_wipes_requests_videos_ledger_and_faults(
    emulator: Emulator, http_api: Connect, plain_http: httpx.Client
) -> None:
    from dagster_runway.emulator import FaultRule

    api = http_api(emulator)
    request_id = api.submit_id({"promptImage": IMAGE})
    video_url = api.finish(request_id)["output"]["video"]
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="result"))
    emulator.pause()
    emulator.reset()
    assert emulator.faults() == [] and emulator.ledger().submissions == 0
    assert plain_http.get(video_url).status_code == 404
    with pytest.raises(KeyError):
        emulator.request_state(request_id)
    # Reset also resumes: a new request runs to the end.
    assert api.finish(api.submit_id({"promptImage": IMAGE}))["status"] == "succeeded"


def test_latency_delays_answers_without_blocking_others(
    emulator_factory: Factory, http_api: Connect, plain_http: httpx.Client
) -> None:
    emulator = emulator_factory(latency_seconds=0.5)
    api = http_api(emulator)
    slow_call = threading.Thread(target=api.status, args=("any-id",))
    started = time.monotonic()
    slow_call.start()
    # The admin endpoints have no latency; they answer while the API call is still being delayed.
    assert plain_http.get(f"{emulator.base_url}/_emulator/ledger").status_code == 200
    assert slow_call.is_alive()
    slow_call.join()
    assert time.monotonic() - started >= 0.5


def test_the_same_seed_gives_the_same_queue_waits(emulator_factory: Factory, http_api: Connect) -> None:
    def drawn_times(seed: int) -> list[tuple[float, float]]:
        # The draws themselves, not the measured waits: those include the scheduler's lag on a loaded machine.
        emulator = emulator_factory(
            random_seed=seed, paused=True, time_scale=1.0, queue_seconds=(0, 10), render_seconds=(1, 30)
        )
        api = http_api(emulator)
        return [emulator.request_times(api.submit_id({"promptImage": IMAGE})) for _ in range(5)]

    first, again, other = drawn_times(7), drawn_times(7), drawn_times(8)
    assert first == again
    assert first != other
    assert all(0 <= wait <= 10 and 1 <= render <= 30 for wait, render in first)


# Lifecycle and layering


def test_start_and_stop_are_quick_and_clean(plain_http: httpx.Client) -> None:
    started = time.perf_counter()
    emulator = Emulator(EmulatorConfig(time_scale=0)).start()
    startup = time.perf_counter() - started
    response = plain_http.get(f"{emulator.base_url}/_emulator/ledger")
    stopping = time.perf_counter()
    emulator.stop()
    print(f"emulator start {startup * 1000:.1f} ms, stop {(time.perf_counter() - stopping) * 1000:.1f} ms")
    assert response.status_code == 200
    with pytest.raises(httpx.ConnectError):
        plain_http.get(f"{emulator.base_url}/_emulator/ledger")
    with pytest.raises(RuntimeError):
        emulator.start()


def test_every_config_field_has_a_description() -> None:
    from dagster_runway.emulator import FaultRule

    for model in (EmulatorConfig, FaultRule):
        assert all(field.description for field in model.model_fields.values()), model.__name__


def test_the_emulator_imports_neither_the_client_nor_dagster() -> None:
    package = Path(dagster_runway.emulator.__file__).parent
    imported: set[str] = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.startswith("dagster_runway.")}
    assert ours - {"dagster_runway.schema", "dagster_runway._redact"} == {
        name for name in ours if name.startswith("dagster_runway.emulator.")
    }
    assert not {name for name in imported if name == "dagster" or name.startswith("dagster.")}
