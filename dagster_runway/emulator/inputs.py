"""Submit-time validation of the model input, written independently of the client.

It follows the seed's JSON schema with strict JSON types and reports every violation as a
FastAPI-style ``detail`` item naming the field. Values are never echoed back, because a
``promptImage`` URL may carry a presigned signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dagster_runway.schema import (
    DEFAULT_DURATION,
    DEFAULT_PROMPT_TEXT,
    DEFAULT_RATIO,
    DEFAULT_SEED,
    DURATIONS,
    PROMPT_TEXT_MAX,
    RATIOS,
    SEED_MAX,
)

# Runway's limit for an image sent inline as a data URI, counted on the encoded URI.
DATA_URI_MAX_BYTES = 5 * 1024 * 1024

_DATA_URI = re.compile(
    r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)$", re.DOTALL | re.IGNORECASE
)


@dataclass(frozen=True)
class ModelInput:
    """A valid input: the image reference apart from the other fields (under the model's names),
    defaults filled in; ``render`` is what the video is made of: ratio, duration and seed."""

    prompt_image: str
    fields: dict[str, Any]
    image_identity: str
    image_field: str = "promptImage"
    render_fields: tuple[str, str, str | None] = ("ratio", "duration", "seed")

    @property
    def render(self) -> dict[str, Any]:
        ratio, duration, seed = self.render_fields
        return {
            "ratio": str(self.fields[ratio]),
            "duration": int(self.fields[duration]),
            "seed": int(self.fields[seed]) if seed is not None and seed in self.fields else 0,
        }

    def fingerprint(self, model_id: str) -> str:
        """sha256 of the canonical JSON of the model and the input, with the image by identity."""
        canonical = json.dumps(
            {"model_id": model_id, "input": {**self.fields, self.image_field: self.image_identity}},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


class InputInvalid(Exception):
    """The body breaks the schema; ``detail`` lists each violation."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in detail))
        self.detail = detail


def _error(field: str | None, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", field] if field else ["body"], "msg": msg, "type": kind}


def parse_body(raw: bytes) -> Any:
    """The JSON value of a request body."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputInvalid([_error(None, f"Body is not valid JSON: {exc}", "json_invalid")]) from exc


def validate_input(body: Any, *, allow_any_http: bool) -> ModelInput:
    """Check a submitted body against the model's input schema."""
    if not isinstance(body, dict):
        raise InputInvalid([_error(None, "Input should be a JSON object", "model_attributes_type")])
    errors: list[dict[str, Any]] = []
    fields = dict(body)
    image = fields.pop("promptImage", None)
    identity = ""
    if "promptImage" not in body:
        errors.append(_error("promptImage", "Field required", "missing"))
    elif not isinstance(image, str):
        errors.append(_error("promptImage", "Input should be a valid string", "string_type"))
    else:
        try:
            identity = image_identity(image, allow_any_http=allow_any_http)
        except ValueError as exc:
            errors.append(_error("promptImage", str(exc), "value_error"))

    text = fields.setdefault("promptText", DEFAULT_PROMPT_TEXT)
    if not isinstance(text, str):
        errors.append(_error("promptText", "Input should be a valid string", "string_type"))
    elif len(text) > PROMPT_TEXT_MAX:
        errors.append(
            _error(
                "promptText", f"String should have at most {PROMPT_TEXT_MAX} characters", "string_too_long"
            )
        )

    ratio = fields.setdefault("ratio", DEFAULT_RATIO)
    if not isinstance(ratio, str):
        errors.append(_error("ratio", "Input should be a valid string", "string_type"))
    elif ratio not in RATIOS:
        errors.append(_error("ratio", f"Input should be one of {', '.join(RATIOS)}", "literal_error"))

    duration = fields.setdefault("duration", DEFAULT_DURATION)
    if not _is_integer(duration):
        errors.append(_error("duration", "Input should be a valid integer", "int_type"))
    elif duration not in DURATIONS:
        errors.append(
            _error("duration", f"Input should be {' or '.join(map(str, DURATIONS))}", "literal_error")
        )
    else:
        fields["duration"] = int(duration)

    seed = fields.setdefault("seed", DEFAULT_SEED)
    if not _is_integer(seed):
        errors.append(_error("seed", "Input should be a valid integer", "int_type"))
    elif not 0 <= seed <= SEED_MAX:
        errors.append(_error("seed", f"Input should be between 0 and {SEED_MAX}", "range_error"))
    else:
        fields["seed"] = int(seed)

    if errors:
        raise InputInvalid(errors)
    assert isinstance(image, str)
    return ModelInput(prompt_image=image, fields=fields, image_identity=identity)


def _is_integer(value: Any) -> bool:
    # JSON schema's "integer": a number without a fraction; booleans and strings are not numbers.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def image_identity(image: str, *, allow_any_http: bool) -> str:
    """A stable identity of the image: the sha256 of a data URI's bytes, or a URL without its query.

    Raises ValueError, with a message naming the rule, for anything that is not an https URL (http
    on loopback hosts, or anywhere with ``allow_any_http``) or a base64 ``data:image/...`` URI.
    """
    if image[:5].lower() == "data:":
        return "sha256:" + hashlib.sha256(decode_data_uri(image)).hexdigest()
    try:
        parts = urlsplit(image)
    except ValueError as exc:
        raise ValueError("Input should be an https URL or a data:image/...;base64, URI") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("Input should be an https URL or a data:image/...;base64, URI")
    if scheme == "http" and not allow_any_http and not _is_loopback(parts.hostname):
        raise ValueError("Only https URLs are allowed (http only for loopback hosts)")
    return urlunsplit((scheme, parts.netloc.lower(), parts.path, "", ""))


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI, checking its form and its size limit."""
    if len(uri) > DATA_URI_MAX_BYTES:
        raise ValueError(
            f"Data URI is {len(uri)} bytes; at most {DATA_URI_MAX_BYTES} bytes (5 MB) are allowed"
        )
    match = _DATA_URI.match(uri)
    if not match or not match.group("mime").lower().startswith("image/"):
        raise ValueError("Data URI should have an image/* media type")
    if "base64" not in (param.strip().lower() for param in match.group("params").split(";")):
        raise ValueError("Data URI should be base64-encoded (data:image/...;base64,...)")
    try:
        return base64.b64decode(match.group("payload"), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"Data URI payload is not valid base64: {exc}") from exc


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
