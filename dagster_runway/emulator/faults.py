"""Fault injection: rules that make the emulator misbehave on purpose, by rate or by rule.

Each kind of fault is declared once, in ``KINDS``: what it does, the calls it can hit, whether it
can hit a submit after the request was recorded and billed, and how it answers. A rule fires on a
call to its endpoint when the call's request matches (``match_prompt`` / ``match_seed``), a draw
from the emulator's seeded random generator falls under ``rate``, and the rule has firings left
(``times``). The first rule in order that fires wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import Response

from dagster_runway.emulator.holds import Holds
from dagster_runway.emulator.render import Video
from dagster_runway.emulator.responses import (
    GATEWAY_404_PAGE,
    PORTAL_PAGE,
    DropConnection,
    TruncatedFile,
    error_response,
)
from dagster_runway.schema import DEFAULT_PROMPT_TEXT, DEFAULT_SEED

ApiCall = Literal["submit", "status", "result", "cancel", "files", "models"]
Endpoint = Literal["submit", "status", "result", "cancel", "files", "models", "any"]
# Where a call is when a rule may fire: on arrival, after a submit was recorded and billed, or
# (for kinds that fail the generation) when a submitted request's outcome is drawn.
FaultStage = Literal["call", "accepted", "generation"]

# "models" is every catalog read: /v1/models, /v1/models/{model_id} and /v1/models/categories.
CALLS: tuple[ApiCall, ...] = ("submit", "status", "result", "cancel", "files", "models")
API_CALLS: tuple[ApiCall, ...] = ("submit", "status", "result", "cancel", "models")
SERVER_ERROR_STATUSES = (500, 502, 503, 504)


@dataclass(frozen=True)
class Hit:
    """The call a rule fired on, with what an answer may need."""

    call: ApiCall
    request: Request
    transport: Callable[[], asyncio.Transport]  # the call's connection, to drop or cut it
    holds: Holds
    request_id: str | None = None  # on submit after accept: the request just recorded
    video: Video | None = None  # on files: the video asked for, if there is one


Answer = Callable[["FaultRule", Hit], Awaitable[Response | None]]


@dataclass(frozen=True)
class FaultKind:
    """One kind of fault: adding a kind is adding one of these to ``KINDS``."""

    description: str
    # The answer given instead of the normal one; an answer of None lets the normal one follow.
    answer: Answer | None
    calls: tuple[ApiCall, ...] = CALLS
    # On submit, the values after_accept may take; the first is the default.
    after_accept: tuple[bool, ...] = (False,)
    # The kind fails the request's generation (with failure_code) instead of changing an answer.
    generation: bool = False


async def _rate_limit(rule: FaultRule, hit: Hit) -> Response:
    return error_response(
        429,
        429001,
        f"Rate limit reached; retry after {rule.retry_after} s",
        headers={"Retry-After": str(rule.retry_after)},
        retry_after=rule.retry_after,
    )


async def _server_error(rule: FaultRule, hit: Hit) -> Response:
    return error_response(
        rule.status, rule.status * 1000 + 1, f"Internal error (HTTP {rule.status}, injected)"
    )


async def _reset(rule: FaultRule, hit: Hit) -> Response:
    return DropConnection(hit.transport())


async def _slow(rule: FaultRule, hit: Hit) -> None:
    await asyncio.sleep(rule.delay_seconds)


async def _error_code_200(rule: FaultRule, hit: Hit) -> Response:
    return error_response(
        200, rule.status * 1000 + 1, f"Error {rule.status * 1000 + 1} reported with HTTP 200 (injected)"
    )


async def _bad_gzip(rule: FaultRule, hit: Hit) -> Response:
    return Response(
        b'{"request_id": "this is not gzip"}',
        200,
        headers={"Content-Encoding": "gzip"},
        media_type="application/json",
    )


async def _html_200(rule: FaultRule, hit: Hit) -> Response:
    return Response(PORTAL_PAGE, 200, media_type="text/html")


async def _wrong_shape_200(rule: FaultRule, hit: Hit) -> Response:
    return Response(b'{"ok": true, "data": null}', 200, media_type="application/json")


async def _gateway_404(rule: FaultRule, hit: Hit) -> Response:
    return Response(GATEWAY_404_PAGE, 404, media_type="text/html")


async def _truncate_video(rule: FaultRule, hit: Hit) -> Response | None:
    if hit.video is None or hit.request.method != "GET":
        return None  # nothing to cut short: the normal answer (a 404, or the headers of a HEAD)
    return TruncatedFile(hit.video, rule.truncate_fraction, hit.transport())


async def _hold(rule: FaultRule, hit: Hit) -> Response | None:
    assert hit.request_id is not None
    outcome = await hit.holds.hold(hit.request_id, hit.request.receive)
    if outcome == "dropped":
        with contextlib.suppress(RuntimeError):  # no connection to drop: the client left meanwhile
            return DropConnection(hit.transport())
    return None  # released: the normal answer; or the client has gone, and it goes nowhere


KINDS: dict[str, FaultKind] = {
    "rate_limit": FaultKind("429 with Retry-After.", _rate_limit),
    "server_error": FaultKind("a 5xx answer.", _server_error, after_accept=(False, True)),
    "reset": FaultKind(
        "the TCP connection is reset with no HTTP answer.", _reset, after_accept=(False, True)
    ),
    "slow": FaultKind("the answer is delayed by delay_seconds.", _slow, after_accept=(True, False)),
    "error_code_200": FaultKind(
        "HTTP 200 whose body is an error_code (status * 1000 + 1, e.g. 503001).",
        _error_code_200,
        after_accept=(False, True),
    ),
    "bad_gzip": FaultKind(
        "HTTP 200 marked Content-Encoding: gzip whose body is not gzip (a proxy's mangling).",
        _bad_gzip,
        calls=API_CALLS,
        after_accept=(True, False),
    ),
    "html_200": FaultKind(
        "HTTP 200 with an HTML page instead of JSON (a captive portal or a proxy's login page).",
        _html_200,
        calls=API_CALLS,
        after_accept=(True, False),
    ),
    "wrong_shape_200": FaultKind(
        "HTTP 200 with a JSON object that has none of the API's fields.",
        _wrong_shape_200,
        calls=API_CALLS,
        after_accept=(True, False),
    ),
    "gateway_404": FaultKind(
        "a gateway's HTML 404 page (no error_code): the API never saw the call, the request may well exist.",
        _gateway_404,
        calls=API_CALLS,
    ),
    "generation_failed": FaultKind(
        "the request ends failed with failure_code.", None, calls=("submit",), generation=True
    ),
    "truncate_video": FaultKind(
        "a /files download stops after truncate_fraction of its announced length.",
        _truncate_video,
        calls=("files",),
    ),
    "hold": FaultKind(
        "the submit is recorded and billed, then its answer waits until released (Emulator.release() or "
        "POST /_emulator/release); a client that leaves meanwhile stays billed; a stop drops the answer.",
        _hold,
        calls=("submit",),
        after_accept=(True,),
    ),
}


def _names(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


class FaultRule(BaseModel):
    """One way for the emulator to fail, and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(
        description=" ".join(f"{name}: {kind.description}" for name, kind in KINDS.items()),
        json_schema_extra={"enum": list(KINDS)},
    )
    endpoint: Endpoint = Field(
        default="any",
        description="The call the rule applies to; 'any' is every call the kind can apply to.",
    )
    rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Probability that a matching call fires the rule."
    )
    times: int | None = Field(
        default=None, ge=0, description="How many times the rule may fire in all; None is unlimited."
    )
    match_prompt: str | None = Field(
        default=None, description="Fire only for requests whose promptText contains this substring."
    )
    match_seed: int | None = Field(default=None, description="Fire only for requests with this seed.")
    after_accept: bool | None = Field(
        default=None,
        description="On submit, whether the request is recorded and billed before the fault hits (the "
        "ambiguous-submit case). Applies to "
        + _names([name for name, kind in KINDS.items() if len(kind.after_accept) > 1])
        + "; None means the kind's default: true for "
        + _names([name for name, kind in KINDS.items() if kind.after_accept[0]])
        + ", false for the others.",
    )
    retry_after: int = Field(default=1, ge=0, description="rate_limit: seconds in Retry-After and the body.")
    status: int = Field(
        default=503,
        description="server_error: the HTTP status: 500, 502, 503 or 504. error_code_200: the status its "
        "error_code stands for (503 gives 503001).",
    )
    delay_seconds: float = Field(default=5.0, ge=0.0, description="slow: how long the answer is delayed.")
    failure_code: str = Field(
        default="INTERNAL.BAD_OUTPUT.CODE01",
        description="generation_failed: the failure code, e.g. SAFETY.INPUT.IMAGE, SAFETY.INPUT.TEXT, "
        "SAFETY.OUTPUT.VIDEO or INTERNAL.BAD_OUTPUT.CODE01.",
    )
    failure_message: str | None = Field(
        default=None, description="generation_failed: the failure message; None gives one naming the code."
    )
    truncate_fraction: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="truncate_video: the fraction of the file sent before closing.",
    )

    @field_validator("status")
    @classmethod
    def _check_status(cls, value: int) -> int:
        if value not in SERVER_ERROR_STATUSES:
            raise ValueError(f"status must be one of {', '.join(map(str, SERVER_ERROR_STATUSES))}")
        return value

    @field_validator("kind")
    @classmethod
    def _check_kind_name(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown fault kind {value!r}: use one of {', '.join(KINDS)}")
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> FaultRule:
        kind = KINDS[self.kind]
        if self.endpoint != "any" and self.endpoint not in kind.calls:
            raise ValueError(
                f"{self.kind} applies to the {_names(list(kind.calls))} endpoint only: use endpoint "
                + " or ".join(f"'{call}'" for call in (*kind.calls, "any"))
            )
        if self.after_accept is not None and self.after_accept not in kind.after_accept:
            when = "after" if self.after_accept else "before"
            raise ValueError(f"{self.kind} cannot hit a submit {when} it is accepted (after_accept)")
        return self

    @property
    def accepts_first(self) -> bool:
        """Whether, on submit, the request is recorded before this fault hits."""
        if self.after_accept is None:
            return KINDS[self.kind].after_accept[0]
        return self.after_accept

    async def answer(self, hit: Hit) -> Response | None:
        """This rule's answer to the call it fired on; None lets the normal answer follow."""
        answer = KINDS[self.kind].answer
        return await answer(self, hit) if answer is not None else None

    @property
    def message(self) -> str:
        """The failure message of a generation_failed rule."""
        return (
            self.failure_message or f"Generation failed with {self.failure_code} (injected by the emulator)"
        )


@dataclass
class _Armed:
    rule: FaultRule
    remaining: int | None


class FaultBook:
    """The active fault rules, with their remaining firings and a seeded random generator."""

    def __init__(self, rules: list[FaultRule], seed: int | None) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)
        self._armed = [_Armed(rule, rule.times) for rule in rules]

    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self._armed.append(_Armed(rule, rule.times))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def reset(self) -> None:
        """Drop every rule and restart the random generator from the seed."""
        with self._lock:
            self._armed.clear()
            self._rng = random.Random(self._seed)

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [armed.rule.model_dump() | {"remaining": armed.remaining} for armed in self._armed]

    def pick(self, call: ApiCall, stage: FaultStage, fields: Mapping[str, Any] | None) -> FaultRule | None:
        """The rule that fires on this call at this stage, if any, counting its firing.

        ``fields`` is the request's input (or the submitted body), or None when the call names no
        known request; rules with a match condition never fire then.
        """
        with self._lock:
            for armed in self._armed:
                rule = armed.rule
                if not _applies(rule, call, stage) or not _matches(rule, fields):
                    continue
                if armed.remaining == 0 or self._rng.random() >= rule.rate:
                    continue
                if armed.remaining is not None:
                    armed.remaining -= 1
                return rule
        return None


def _applies(rule: FaultRule, call: ApiCall, stage: FaultStage) -> bool:
    kind = KINDS[rule.kind]
    if call not in kind.calls or rule.endpoint not in (call, "any"):
        return False
    if kind.generation:
        return stage == "generation"
    if call == "submit":
        return stage != "generation" and (stage == "accepted") == rule.accepts_first
    return stage == "call"


def _matches(rule: FaultRule, fields: Mapping[str, Any] | None) -> bool:
    if rule.match_prompt is None and rule.match_seed is None:
        return True
    if fields is None:
        return False
    if rule.match_prompt is not None:
        prompt = fields.get("promptText", DEFAULT_PROMPT_TEXT)
        if not isinstance(prompt, str) or rule.match_prompt not in prompt:
            return False
    if rule.match_seed is not None:
        seed = fields.get("seed", DEFAULT_SEED)
        if isinstance(seed, bool) or seed != rule.match_seed:
            return False
    return True
