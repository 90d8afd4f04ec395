"""Fault injection: rules that make the emulator misbehave on purpose, by rate or by rule.

A rule fires on a call to its endpoint when the call's request matches (``match_prompt`` /
``match_seed``), a draw from the emulator's seeded random generator falls under ``rate``, and the
rule has firings left (``times``). The first rule in order that fires wins.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dagster_runway.schema import DEFAULT_PROMPT_TEXT, DEFAULT_SEED

FaultKind = Literal[
    "rate_limit", "server_error", "reset", "slow", "error_code_200", "generation_failed", "truncate_video"
]
Endpoint = Literal["submit", "status", "result", "cancel", "files", "any"]
Call = Literal["submit", "status", "result", "cancel", "files"]

# The kinds that can hit a submit after the request was recorded and billed.
AFTER_ACCEPT_KINDS = ("server_error", "reset", "slow", "error_code_200")
SERVER_ERROR_STATUSES = (500, 502, 503, 504)


class FaultRule(BaseModel):
    """One way for the emulator to fail, and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind = Field(
        description="rate_limit: 429 with Retry-After. server_error: a 5xx answer. reset: the TCP connection is "
        "reset with no HTTP answer. slow: the answer is delayed by delay_seconds. error_code_200: HTTP 200 "
        "whose body is an error_code. generation_failed: the request ends failed with failure_code. "
        "truncate_video: a /files download stops after truncate_fraction of its announced length."
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
        "ambiguous-submit case). Applies to server_error, reset, slow and error_code_200; None means true "
        "for slow and false for the others.",
    )
    retry_after: int = Field(default=1, ge=0, description="rate_limit: seconds in Retry-After and the body.")
    status: int = Field(default=503, description="server_error: the HTTP status: 500, 502, 503 or 504.")
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

    @model_validator(mode="after")
    def _check_kind(self) -> FaultRule:
        if self.kind == "truncate_video" and self.endpoint not in ("files", "any"):
            raise ValueError("truncate_video applies to the files endpoint only")
        if self.kind == "generation_failed" and self.endpoint not in ("submit", "any"):
            raise ValueError(
                "generation_failed applies to submitted requests: use endpoint 'submit' or 'any'"
            )
        if self.after_accept and self.kind not in AFTER_ACCEPT_KINDS:
            raise ValueError(f"after_accept applies only to {', '.join(AFTER_ACCEPT_KINDS)}")
        return self

    @property
    def accepts_first(self) -> bool:
        """Whether, on submit, the request is recorded before this fault hits."""
        if self.after_accept is None:
            return self.kind == "slow"
        return self.after_accept

    @property
    def message(self) -> str:
        """The failure message of a generation_failed rule."""
        return (
            self.failure_message or f"Generation failed with {self.failure_code} (injected by the emulator)"
        )


Stage = Literal["call", "accepted", "generation"]


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

    def pick(self, call: Call, stage: Stage, fields: Mapping[str, Any] | None) -> FaultRule | None:
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


def _applies(rule: FaultRule, call: Call, stage: Stage) -> bool:
    if rule.endpoint not in (call, "any"):
        return False
    if rule.kind == "generation_failed":
        return stage == "generation"
    if rule.kind == "truncate_video":
        return call == "files" and stage == "call"
    if call == "submit" and stage != "generation":
        return (stage == "accepted") == rule.accepts_first
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
