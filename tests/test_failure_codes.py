"""One rule classifies a failed generation's code, for the client's error, the pipeline's failure class
and the submit's verdict on an earlier request of the same input."""

from __future__ import annotations

import pytest

from dagster_runway.errors import GenerationFailedError, is_internal_code, is_safety_code
from dagster_runway.pipeline import failures as fl

CODES = [
    ("SAFETY.INPUT.IMAGE", fl.GENERATION_SAFETY, False),
    ("SAFETY.OUTPUT.VIDEO", fl.GENERATION_SAFETY, False),
    ("INPUT_PREPROCESSING.SAFETY.TEXT", fl.GENERATION_SAFETY, False),
    ("INTERNAL.BAD_OUTPUT.CODE01", fl.GENERATION_INTERNAL, True),
    ("INPUT_PREPROCESSING.INTERNAL", fl.GENERATION_INTERNAL, True),  # was generation_failed, never retried
    ("ASSET.INVALID", fl.GENERATION_FAILED, False),
    (None, fl.GENERATION_FAILED, False),
]


@pytest.mark.parametrize(("code", "failure_class", "retryable"), CODES)
def test_the_pipeline_classifies_a_failed_generation_as_the_error_does(
    code: str | None, failure_class: str, retryable: bool
) -> None:
    error = GenerationFailedError("failed", failure_code=code, request_id="r1")
    failure = fl.from_result_error("p", error, attempt=1, retries_allowed=1)
    assert (failure.failure_class, failure.retryable) == (failure_class, retryable)
    assert error.is_safety is is_safety_code(code) is (failure_class == fl.GENERATION_SAFETY)
    assert error.is_internal is is_internal_code(code) is (failure_class == fl.GENERATION_INTERNAL)
