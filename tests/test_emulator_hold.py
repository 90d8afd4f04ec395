"""The hold hook: a submit accepted and billed whose answer waits until released."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.emulator.cli import parse_fault
from tests.fixtures.emulator import MODEL_PATH, TLS, Api, data_uri, make_png

Factory = Callable[..., Emulator]
Connect = Callable[..., Api]

IMAGE = data_uri(make_png())
CONNECTION_ERRORS = (httpx.ReadError, httpx.RemoteProtocolError)


class Submitter(threading.Thread):
    """Submits in the background and keeps what came back: a response or an exception."""

    def __init__(self, emulator: Emulator, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.emulator, self.body = emulator, body
        self.outcome: httpx.Response | Exception | None = None
        self.start()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.emulator.token}"}
        try:
            with httpx.Client(
                base_url=self.emulator.base_url, headers=headers, timeout=30, verify=TLS
            ) as http:
                self.outcome = http.post(MODEL_PATH, json=self.body)
        except Exception as exc:
            self.outcome = exc

    def response(self) -> httpx.Response:
        self.join(30)
        assert isinstance(self.outcome, httpx.Response), self.outcome
        return self.outcome


def test_a_held_submit_is_billed_before_the_client_gets_its_answer(emulator: Emulator) -> None:
    emulator.add_fault(FaultRule(kind="hold", times=1))
    client = Submitter(emulator, {"promptImage": IMAGE})
    [request_id] = emulator.wait_for_held(1)
    assert emulator.held() == [request_id]
    assert client.is_alive() and client.outcome is None  # the client is still waiting
    ledger = emulator.ledger()
    assert [entry.request_id for entry in ledger.entries] == [request_id]
    assert ledger.billed_submissions == 1 and ledger.total_cost_usd == pytest.approx(0.25)
    assert emulator.release() == [request_id]
    response = client.response()
    assert response.status_code == 200 and response.json()["request_id"] == request_id
    assert emulator.held() == []
    # times=1: the next submit is answered at once.
    assert Api(emulator, emulator.token).submit({"promptImage": IMAGE}).status_code == 200


def test_held_answers_over_http_oldest_first(emulator: Emulator, plain_http: httpx.Client) -> None:
    admin = f"{emulator.base_url}/_emulator"
    assert plain_http.post(f"{admin}/faults", json={"kind": "hold", "endpoint": "submit"}).status_code == 200
    first = Submitter(emulator, {"promptImage": IMAGE, "seed": 1})
    [first_id] = emulator.wait_for_held(1)
    second = Submitter(emulator, {"promptImage": IMAGE, "seed": 2})
    both = emulator.wait_for_held(2)
    assert plain_http.get(f"{admin}/held").json() == {"held": 2, "request_ids": both}
    assert both[0] == first_id
    released = plain_http.post(f"{admin}/release", json={"count": 1}).json()
    assert released == {"released": [first_id], "held": 1}
    assert first.response().json()["request_id"] == first_id
    assert second.is_alive()
    bad = plain_http.post(f"{admin}/release", json={"count": -1})
    assert bad.status_code == 422 and bad.json()["error_code"] == 422001
    assert plain_http.post(f"{admin}/release").json() == {"released": [both[1]], "held": 0}
    assert second.response().json()["request_id"] == both[1]
    assert plain_http.get(f"{admin}/held").json() == {"held": 0, "request_ids": []}


def test_hold_matches_like_any_rule(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(FaultRule(kind="hold", match_seed=7))
    emulator.add_fault(FaultRule(kind="hold", match_prompt="wait for me"))
    api = http_api(emulator)
    assert api.submit({"promptImage": IMAGE, "seed": 8, "promptText": "go"}).status_code == 200
    by_seed = Submitter(emulator, {"promptImage": IMAGE, "seed": 7})
    by_prompt = Submitter(emulator, {"promptImage": IMAGE, "promptText": "please wait for me"})
    held = emulator.wait_for_held(2)
    assert len(emulator.release()) == 2
    assert sorted(held) == sorted(c.response().json()["request_id"] for c in (by_seed, by_prompt))
    assert emulator.ledger().billed_submissions == 3


def test_a_client_killed_while_held_stays_billed_and_its_request_runs(
    emulator: Emulator, http_api: Connect
) -> None:
    emulator.add_fault(FaultRule(kind="hold"))
    script = (
        "import httpx, sys\n"
        f"httpx.post({emulator.base_url + MODEL_PATH!r}, json={{'promptImage': sys.argv[1]}},\n"
        f"           headers={{'Authorization': 'Bearer {emulator.token}'}}, timeout=60)\n"
        "print('answered')\n"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", script, IMAGE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        [request_id] = emulator.wait_for_held(1, timeout=30)
        client.kill()  # between "accepted and billed" and "the client has the answer"
        out, _ = client.communicate(timeout=10)
    finally:
        client.kill()
    assert "answered" not in out
    emulator.wait_for_held(0)  # the emulator saw the client go
    ledger = emulator.ledger()
    assert [entry.request_id for entry in ledger.entries] == [request_id]
    assert ledger.billed_submissions == 1
    assert http_api(emulator).finish(request_id)["status"] == "succeeded"


def test_stop_drops_held_answers(emulator_factory: Factory) -> None:
    emulator = emulator_factory(faults=[FaultRule(kind="hold")])
    clients = [Submitter(emulator, {"promptImage": IMAGE, "seed": n}) for n in range(2)]
    emulator.wait_for_held(2)
    emulator.stop()
    for client in clients:
        client.join(30)
        assert isinstance(client.outcome, CONNECTION_ERRORS), client.outcome


def test_wait_for_held_times_out_with_a_clear_error(emulator: Emulator) -> None:
    with pytest.raises(TimeoutError, match="0 answers are held, not 1"):
        emulator.wait_for_held(1, timeout=0.05)


def test_hold_is_a_submit_fault_that_always_comes_after_accept() -> None:
    assert parse_fault("hold:times=2") == FaultRule(kind="hold", times=2)
    assert FaultRule(kind="hold").accepts_first
    for rule in ({"kind": "hold", "endpoint": "status"}, {"kind": "hold", "after_accept": False}):
        with pytest.raises(ValueError, match="hold"):
            FaultRule.model_validate(rule)
