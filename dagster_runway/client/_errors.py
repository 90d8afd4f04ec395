"""How an unsuccessful answer, or a finished but failed request, maps to a typed error.

Every message names the call and its target, says what went wrong and what to do next, and carries no
secret (the caller redacts the text the service sent back).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypedDict

import httpx

from dagster_runway.errors import (
    AuthenticationError,
    GatewayNotFoundError,
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
    is_safety_code,
)
from dagster_runway.retry import retry_after_seconds
from dagster_runway.schema import RequestResult, RequestState


class _ErrorFields(TypedDict):
    """What every RunComfyError of an HTTP answer carries."""

    status_code: int | None
    error_code: int | None
    request_id: str | None
    detail: Any


def parse_retry_after(response: httpx.Response, body: Any) -> float | None:
    """Seconds to wait, from the ``Retry-After`` header (seconds or HTTP date) or a body field."""
    seconds = retry_after_seconds(response.headers.get("retry-after"))
    if seconds is not None:
        return seconds
    if isinstance(body, dict):
        for key in ("retry_after", "retryAfter"):
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return max(0.0, float(value))
    return None


def error_for(
    response: httpx.Response,
    body: Any,
    *,
    what: str,
    target: str,
    request_id: str | None,
    model_id: str,
    redact: Callable[[str], str],
) -> RunComfyError:
    """The typed error an unsuccessful answer stands for; ``redact`` removes the token and any signed
    URL from the text the service sent back."""
    status = response.status_code
    code = body.get("error_code") if isinstance(body, dict) else None
    code = code if isinstance(code, int) else _int_or_none(code)
    detail = body.get("detail") if isinstance(body, dict) else None
    text = redact(_error_text(body, response))
    common: _ErrorFields = {
        "status_code": status,
        "error_code": code,
        "request_id": request_id,
        "detail": detail,
    }
    where = f"RunComfy {what} for {target}"

    if status == 429:
        retry_after = parse_retry_after(response, body)
        hint = f" The server asks to wait {retry_after:.0f}s." if retry_after is not None else ""
        return RateLimitedError(
            f"{where} was rate limited (429): {text}.{hint} Lower max_concurrency or retry later.",
            retry_after=retry_after,
            **common,
        )
    if code == 400004 or status == 401:
        return AuthenticationError(
            f"{where} was refused: the API token is missing, wrong or revoked ({text}). Check "
            "RUNCOMFY_API_TOKEN against the key in your RunComfy profile.",
            **common,
        )
    if code == 403001 or status == 403:
        return PermissionDeniedError(
            f"{where} was refused: it belongs to another account ({text}). Use the token that submitted it.",
            **common,
        )
    if code == 400002 or status == 402:
        return InsufficientCreditsError(
            f"{where} was refused: the account has no credits left ({text}). Nothing was billed; top up "
            "your RunComfy balance and run again.",
            **common,
        )
    if status == 404 and code != 404001 and not has_api_error(body):
        return GatewayNotFoundError(
            f"{where} got HTTP 404 without the API's error ({redact(describe_body(response))}): a gateway or "
            "proxy answered, not the Model API, so this says nothing about the request. It is retried later and "
            "is never a reason to submit again; if it persists, check base_url and any proxy in between.",
            **common,
        )
    # Without a request id (a submit, a catalog read) the missing resource is the model.
    if request_id is not None and (code == 404001 or status == 404):
        return RequestNotFoundError(
            f"{where} failed: the request is unknown or has expired ({text}). Requests and their outputs "
            "are kept for a limited time; submit again if you need the video.",
            **common,
        )
    if code in (400001, 404001) or status == 404:
        return ModelNotFoundError(
            f"{where} failed: the model id {model_id!r} is unknown or malformed ({text}). Check model_id "
            "against the catalog (dagster-runway models).",
            **common,
        )
    if status in (400, 422) or code == 422001:
        field = _field_from_detail(detail)
        named = f"field {field!r}" if field else "the input"
        return InputValidationError(
            f"{where} was rejected: {named} is invalid ({text}). Fix the input; it was not accepted, "
            "and nothing was billed.",
            field=field,
            **common,
        )
    if status >= 500 or (200 <= status < 300):
        kind = "an error in a 2xx answer" if status < 300 else f"HTTP {status}"
        return ServerError(
            f"{where} failed with {kind}: {text}. The fault is on the service's side and the client has "
            "retried what was safe to retry; run again later.",
            **common,
        )
    return RunComfyError(
        f"{where} failed with HTTP {status}: {text}. The Model API does not answer this; check that base_url "
        "points at it.",
        **common,
    )


def has_api_error(body: Any) -> bool:
    """Whether a body has the API's error shape: a JSON object with an ``error_code`` or ``error_message``."""
    return isinstance(body, dict) and (
        body.get("error_code") is not None or isinstance(body.get("error_message"), str)
    )


def describe_body(response: httpx.Response) -> str:
    """What an answer's body is, for an error message: its type, size and first characters."""
    kind = response.headers.get("content-type", "no Content-Type").split(";")[0]
    text = response.content[:2000].decode("utf-8", "replace")
    snippet = " ".join(re.sub(r"<[^>]*>", " ", text).split())[:120]  # the words of an HTML page
    return f"{kind}, {len(response.content)} bytes" + (f": {snippet!r}" if snippet else "")


def effective_status(status: int, error_code: int | None) -> int:
    """The HTTP status an answer stands for: a 2xx carrying an ``error_code`` stands for the status the
    code encodes (``503001`` -> 503), so that a transient error reported with HTTP 200 is retried too."""
    if 200 <= status < 300 and error_code is not None and 400 <= error_code // 1000 < 600:
        return error_code // 1000
    return status


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _error_text(body: Any, response: httpx.Response) -> str:
    if isinstance(body, dict):
        for key in ("error_message", "message", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
        if body.get("detail") is not None:
            return json.dumps(body["detail"])[:400]
    text = " ".join(response.text[:400].split()) if response.content else ""
    return text or f"HTTP {response.status_code} with no body"


def _field_from_detail(detail: Any) -> str | None:
    items = detail if isinstance(detail, list) else [detail]
    for item in items:
        if isinstance(item, dict):
            loc = item.get("loc") or item.get("field")
            if isinstance(loc, list | tuple):
                names = [str(part) for part in loc if part not in ("body", "query", "path")]
                if names:
                    return ".".join(names)
            elif isinstance(loc, str):
                return loc
    return None


def failure_error(result: RequestResult) -> RunComfyError | None:
    """The error a finished, unsuccessful result stands for; ``None`` when it succeeded or is pending."""
    rid = result.request_id
    if result.status is RequestState.FAILED:
        code, text = result.failure_code, result.failure_message or "no message"
        advice = (
            "This is a content-safety rejection: change the image or prompt; do not retry it as is."
            if is_safety_code(code)
            else "The input was accepted but the generation failed; check the message, then submit again "
            "if it looks transient."
        )
        return GenerationFailedError(
            f"Request {rid} failed ({code or 'no failure code'}): {text}. {advice}",
            failure_code=code,
            failure_message=text,
            request_id=rid,
        )
    if result.status is RequestState.CANCELLED:
        return RequestCancelledError(
            f"Request {rid} was cancelled before it ran; submit again to retry.", request_id=rid
        )
    if result.status in (RequestState.SUCCEEDED, RequestState.COMPLETED) and not result.video_urls:
        return ServerError(
            f"Request {rid} succeeded but its result has no video URL in 'output'. Fetch the result again "
            "later; if it stays empty, ask RunComfy support about this request id.",
            request_id=rid,
        )
    return None
