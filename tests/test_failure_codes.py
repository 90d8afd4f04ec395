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


def test_every_partition_failure_is_built_by_a_named_constructor_in_failures_py() -> None:
    """The words of a failure live in one place: no step builds one inline."""
    import ast
    from pathlib import Path

    import dagster_runway

    package = Path(dagster_runway.__file__).parent
    inline = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "failures.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "PartitionFailure"
            ):
                inline.append(f"{path.relative_to(package)}:{node.lineno}")
    assert inline == [], f"build these with a function of pipeline/failures.py: {inline}"
