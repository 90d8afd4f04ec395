"""Redaction of credentials: tokens and presigned-URL query strings never reach text a user sees."""

from __future__ import annotations

import pytest

from dagster_runway._redact import REDACTED, redact_text, redact_url

PRESIGNED = (
    "https://bucket.s3.amazonaws.com/images/cat.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261121%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261121T000000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=deadbeefcafe0123456789"
)


def test_presigned_url_keeps_its_keys_and_loses_every_value() -> None:
    redacted = redact_url(PRESIGNED)
    assert redacted.startswith("https://bucket.s3.amazonaws.com/images/cat.png?")
    for secret in ("deadbeefcafe0123456789", "AKIAEXAMPLE", "20261121T000000Z", "3600"):
        assert secret not in redacted
    assert "X-Amz-Signature=" + REDACTED in redacted
    assert "X-Amz-Credential=" + REDACTED in redacted


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/a.png", "https://example.com/a.png"),
        ("https://user:pass@example.com/a.png", f"https://{REDACTED}@example.com/a.png"),
        ("https://example.com/a.png?sig=abc#frag", f"https://example.com/a.png?sig={REDACTED}"),
        ("https://example.com/a.png?justatoken", f"https://example.com/a.png?justatoken={REDACTED}"),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_data_uri_is_shortened_to_its_type_and_size() -> None:
    payload = "iVBORw0KGgo" * 100
    assert redact_url(f"data:image/png;base64,{payload}") == f"data:image/png;base64,<{len(payload)} chars>"


def test_redact_text_removes_secrets_and_url_queries_from_free_text() -> None:
    token = "tok_live_0123456789abcdef"
    text = (
        f"GET {PRESIGNED} failed with Authorization: Bearer {token}; "
        "image data:image/png;base64,iVBORw0KGgoAAAANSUhEUg== was refused; see https://docs.example.com/errors"
    )
    redacted = redact_text(text, [token])
    assert token not in redacted
    assert "deadbeefcafe0123456789" not in redacted
    assert "iVBORw0KGgoAAAANSUhEUg" not in redacted
    assert f"Bearer {REDACTED}" in redacted
    assert "https://docs.example.com/errors" in redacted  # a URL without a query is left alone
    assert redact_text("nothing secret here", [token, ""]) == "nothing secret here"
