"""The schema layer against its oracles.

``ImageToVideoInput`` must accept exactly what the seed's JSON schema accepts, so ``jsonschema`` is the
oracle over a few thousand generated inputs plus the edge values. The response models must be tolerant:
unknown fields, both spellings of cancelled, an error of any shape.
"""

from __future__ import annotations

import json
import math
import random
import typing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from dagster_runway.schema import (
    DEFAULT_DURATION,
    DEFAULT_PROMPT_TEXT,
    DEFAULT_RATIO,
    DEFAULT_SEED,
    RATIOS,
    CancelResult,
    ImageToVideoInput,
    RequestResult,
    RequestState,
    RequestStatus,
    Submission,
    ratio_size,
)

SEED_FILE = Path("/work/shared/seeds/runcomfy-runway-gen4-turbo-image-to-video.txt")

# A verbatim copy of the seed's input schema, so the oracle also runs where the seed file is absent.
# ``test_embedded_schema_matches_seed`` proves it is still the seed's schema wherever the seed exists.
EMBEDDED_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Input",
    "required": ["promptImage"],
    "properties": {
        "promptText": {
            "title": "Prompt",
            "description": "",
            "type": "string",
            "maxLength": 1000,
            "default": DEFAULT_PROMPT_TEXT,
        },
        "promptImage": {
            "title": "Image",
            "description": "Use images under 16MB, with dimensions below 8000x8000 pixels and an aspect "
            "ratio between 1:2 and 2:1.",
            "type": "string",
            "validations": [
                {
                    "validation_rule": "width_pixels<",
                    "validation_value": 8000,
                    "validation_error": "The uploaded image width and height must not exceed 8000 pixels.",
                },
                {
                    "validation_rule": "height_pixels<",
                    "validation_value": 8000,
                    "validation_error": "The uploaded image width and height must not exceed 8000 pixels.",
                },
                {
                    "validation_rule": "width/height>",
                    "validation_value": 0.5,
                    "validation_error": "The aspect ratio range should be 1:2 to 2:1.",
                },
                {
                    "validation_rule": "width/height<",
                    "validation_value": 2,
                    "validation_error": "The aspect ratio range should be 1:2 to 2:1.",
                },
                {
                    "validation_rule": "file_size_mb<",
                    "validation_value": 16,
                    "validation_error": "File size must be less than 16 MB.",
                },
            ],
            "default": "https://playgrounds-storage-public.runcomfy.net/tools/7026/media-files/usecase1-1-input.png",
        },
        "ratio": {
            "title": "Aspect Ratio (W:H)",
            "description": "",
            "type": "string",
            "enum": ["1584:672", "1280:720", "1104:832", "960:960", "832:1104", "720:1280"],
            "default": "1280:720",
        },
        "duration": {
            "title": "Duration",
            "description": "",
            "type": "integer",
            "enum": [5, 10],
            "default": 5,
        },
        "seed": {
            "title": "Seed",
            "description": "",
            "maximum": 4294967295,
            "minimum": 0,
            "type": "integer",
            "default": 936116745,
        },
    },
}


def seed_input_schema(text: str) -> dict[str, Any]:
    """The JSON between ``Input schema`` and ``Output schema`` on the vendor page."""
    start = text.index("Input schema") + len("Input schema")
    end = text.index("Output schema", start)
    return json.loads(text[start:end])


@pytest.fixture(scope="module")
def input_schema() -> dict[str, Any]:
    if SEED_FILE.exists():
        return seed_input_schema(SEED_FILE.read_text(encoding="utf-8"))
    return EMBEDDED_INPUT_SCHEMA


@pytest.fixture(scope="module")
def oracle(input_schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(input_schema)
    cls.check_schema(input_schema)
    return cls(input_schema)


def model_accepts(case: dict[str, Any]) -> bool:
    try:
        ImageToVideoInput.model_validate(case)
    except ValidationError:
        return False
    return True


# -- the schema itself -------------------------------------------------------------------------------


@pytest.mark.skipif(not SEED_FILE.exists(), reason="the vendor seed file is not on this machine")
def test_embedded_schema_matches_seed() -> None:
    assert seed_input_schema(SEED_FILE.read_text(encoding="utf-8")) == EMBEDDED_INPUT_SCHEMA


def test_required_fields_enums_bounds_and_defaults_mirror_the_schema(input_schema: dict[str, Any]) -> None:
    props = input_schema["properties"]
    fields = {field.alias or name: field for name, field in ImageToVideoInput.model_fields.items()}
    assert set(fields) == set(props)

    required = {alias for alias, field in fields.items() if field.is_required()}
    assert required == set(input_schema["required"])

    for alias, prop in props.items():
        if alias in input_schema["required"]:
            continue
        assert fields[alias].default == prop["default"], alias

    assert list(RATIOS) == props["ratio"]["enum"]
    assert list(typing.get_args(fields["ratio"].annotation)) == props["ratio"]["enum"]
    assert list(typing.get_args(fields["duration"].annotation)) == props["duration"]["enum"]
    assert (
        props["ratio"]["default"],
        props["duration"]["default"],
        props["seed"]["default"],
        props["promptText"]["default"],
    ) == (DEFAULT_RATIO, DEFAULT_DURATION, DEFAULT_SEED, DEFAULT_PROMPT_TEXT)
    # Every field is described, because the UI and the component schema show the descriptions.
    assert all(field.description for field in fields.values())


def test_ratio_size() -> None:
    assert [ratio_size(r) for r in RATIOS] == [
        (1584, 672),
        (1280, 720),
        (1104, 832),
        (960, 960),
        (832, 1104),
        (720, 1280),
    ]


# -- the oracle over generated inputs ----------------------------------------------------------------

MISSING = object()

VALID: dict[str, list[Any]] = {
    "promptImage": [
        "https://example.com/cat.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "",
        "x" * 5000,
        "s3://not-a-url-but-still-a-string",
    ],
    "promptText": ["", "a", "é" * 1000, "😀" * 1000, "p" * 999, "p" * 1000, "A calm pan over hills."],
    "ratio": list(RATIOS),
    "duration": [5, 10, 5.0, 10.0],
    "seed": [0, 1, 4294967295, 4294967295.0, 5.0, -0.0, 936116745, 2**31],
}

INVALID: dict[str, list[Any]] = {
    "promptImage": [None, 5, 5.0, True, False, [], {}, ["https://example.com/a.png"], {"uri": "x"}],
    "promptText": ["p" * 1001, "😀" * 1001, "x" * 5000, None, 5, True, [], ["a"], {"text": "a"}],
    "ratio": [
        "1280:768",
        "768:1280",
        "1280x720",
        "1280/720",
        "",
        "1280:720 ",
        " 960:960",
        "960:960\n",
        "16:9",
        None,
        1280,
        True,
        ["1280:720"],
    ],
    "duration": [0, -5, 1, 6, 7.5, 15, 20, "5", "10", True, False, None, 5.5, 4294967296, [5], {"s": 5}],
    "seed": [
        -1,
        4294967296,
        4294967296.0,
        2**64,
        -(2**63),
        5.5,
        0.1,
        "5",
        "0",
        True,
        False,
        None,
        1e20,
        float("nan"),
        float("inf"),
        -float("inf"),
        [],
        {"v": 1},
    ],
}

# Keys the schema does not name. It has no ``additionalProperties``, so they are allowed. (The model's
# Python names, ``prompt_image``/``prompt_text``, are left out: the model reads those as its fields, which
# is the documented alias behaviour tested below, not an "extra" key.)
EXTRA_KEYS: dict[str, list[Any]] = {
    "model": ["gen4_turbo"],
    "promptimage": [5],
    "PromptText": [None],
    "webhook": ["https://example.com/hook"],
    "watermark": [False],
}


def edge_cases() -> list[dict[str, Any]]:
    base = {"promptImage": "https://example.com/a.png"}
    cases: list[dict[str, Any]] = [{}, dict(base)]
    for field in VALID:
        for value in VALID[field] + INVALID[field]:
            if field == "promptImage":
                cases.append({"promptImage": value})
                cases.append({"promptText": "no image", "promptImage": value})
            else:
                cases.append({**base, field: value})
                cases.append({field: value})  # promptImage missing
    for key, values in EXTRA_KEYS.items():
        cases.append({**base, key: values[0]})
        cases.append({key: values[0]})
    return cases


def random_cases(count: int, seed: int = 20261121) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        case: dict[str, Any] = {}
        for field in VALID:
            roll = rng.random()
            if field == "promptImage" and roll < 0.05 or field != "promptImage" and roll < 0.3:
                continue
            if roll < 0.88:
                case[field] = rng.choice(VALID[field])
            else:
                case[field] = rng.choice(INVALID[field])
        if rng.random() < 0.05:
            case["seed"] = rng.randint(-(2**33), 2**33)
        if rng.random() < 0.05:
            case["promptText"] = "t" * rng.randint(990, 1010)
        if rng.random() < 0.15:
            key = rng.choice(sorted(EXTRA_KEYS))
            case[key] = rng.choice(EXTRA_KEYS[key])
        keys = list(case)
        rng.shuffle(keys)
        cases.append({key: case[key] for key in keys})
    return cases


def test_model_accepts_exactly_what_the_schema_accepts(oracle: jsonschema.protocols.Validator) -> None:
    cases = edge_cases() + random_cases(3000)
    mismatches = []
    verdicts = []
    for case in cases:
        expected = oracle.is_valid(case)
        verdicts.append(expected)
        if model_accepts(case) != expected:
            mismatches.append((case, expected))
    assert not mismatches, f"{len(mismatches)} disagreements, e.g. {mismatches[:3]!r}"[:2000]
    # The generator is useful only if it exercises both answers substantially.
    assert len(cases) > 3000
    assert 0.25 < sum(verdicts) / len(verdicts) < 0.75


def test_accepted_inputs_round_trip_to_valid_request_bodies(oracle: jsonschema.protocols.Validator) -> None:
    accepted = [case for case in edge_cases() + random_cases(500, seed=7) if oracle.is_valid(case)]
    assert len(accepted) > 100
    for case in accepted:
        model = ImageToVideoInput.model_validate(case)
        body = model.to_request()
        full = model.to_full()
        assert oracle.is_valid(body), body
        assert oracle.is_valid(full), full
        # Only what was set is sent, under the API's names, with its JSON value (5.0 becomes 5).
        assert set(body) == set(case)
        for key, value in case.items():
            assert body[key] == value
            assert type(body[key]) is not float or key not in ("duration", "seed")
        assert ImageToVideoInput.model_validate(body) == model


@pytest.mark.parametrize(
    ("field", "value"),
    [(field, value) for field, values in INVALID.items() for value in values],
    ids=lambda v: v if isinstance(v, str) and len(v) <= 30 else repr(v)[:30],
)
def test_a_rejection_names_the_field(field: str, value: Any) -> None:
    case = {"promptImage": "https://example.com/a.png", field: value}
    with pytest.raises(ValidationError) as info:
        ImageToVideoInput.model_validate(case)
    python_name = {"promptImage": "prompt_image", "promptText": "prompt_text"}.get(field, field)
    assert {error["loc"][0] for error in info.value.errors()} <= {field, python_name}


@pytest.mark.parametrize("length", [999, 1000, 1001])
def test_prompt_text_length_boundary(length: int, oracle: jsonschema.protocols.Validator) -> None:
    case = {"promptImage": "https://example.com/a.png", "promptText": "w" * length}
    assert model_accepts(case) is oracle.is_valid(case) is (length <= 1000)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (4294967295, True), (4294967296, False), (-1, False), (5.0, True), (5.5, False), ("5", False)]
    + [(True, False), (None, False)],
)
def test_seed_edge_values(value: Any, ok: bool, oracle: jsonschema.protocols.Validator) -> None:
    case = {"promptImage": "https://example.com/a.png", "seed": value}
    assert oracle.is_valid(case) is ok
    assert model_accepts(case) is ok


def test_missing_prompt_image_is_rejected_with_its_name() -> None:
    with pytest.raises(ValidationError) as info:
        ImageToVideoInput.model_validate({"promptText": "hello", "ratio": "960:960"})
    assert [error["loc"] for error in info.value.errors()] == [("promptImage",)]


def test_alias_and_python_names_are_both_accepted() -> None:
    by_alias = ImageToVideoInput.model_validate(
        {"promptImage": "https://example.com/a.png", "promptText": "go", "ratio": "960:960", "duration": 10}
    )
    by_name = ImageToVideoInput(
        prompt_image="https://example.com/a.png", prompt_text="go", ratio="960:960", duration=10
    )
    mixed = ImageToVideoInput.model_validate(
        {
            "prompt_image": "https://example.com/a.png",
            "promptText": "go",
            "ratio": "960:960",
            "duration": 10.0,
        }
    )
    assert by_alias == by_name == mixed
    assert by_name.to_request() == {
        "promptImage": "https://example.com/a.png",
        "promptText": "go",
        "ratio": "960:960",
        "duration": 10,
    }
    # Python names are validated exactly like the API's names.
    with pytest.raises(ValidationError):
        ImageToVideoInput(prompt_image="https://example.com/a.png", seed=-1)
    with pytest.raises(ValidationError):
        ImageToVideoInput.model_validate({"prompt_image": 5})


def test_to_full_fills_the_schema_defaults(input_schema: dict[str, Any]) -> None:
    model = ImageToVideoInput(prompt_image="https://example.com/a.png")
    assert model.to_request() == {"promptImage": "https://example.com/a.png"}
    full = model.to_full()
    for alias, prop in input_schema["properties"].items():
        if alias != "promptImage":
            assert full[alias] == prop["default"]


def test_extra_keys_are_kept_and_sent() -> None:
    model = ImageToVideoInput.model_validate(
        {"promptImage": "https://example.com/a.png", "model": "gen4_turbo"}
    )
    assert model.to_request() == {"promptImage": "https://example.com/a.png", "model": "gen4_turbo"}


# -- response models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("in_queue", RequestState.IN_QUEUE),
        ("in_progress", RequestState.IN_PROGRESS),
        ("completed", RequestState.COMPLETED),
        ("succeeded", RequestState.SUCCEEDED),
        ("failed", RequestState.FAILED),
        ("cancelled", RequestState.CANCELLED),
        ("canceled", RequestState.CANCELLED),
        ("CANCELED", RequestState.CANCELLED),
        (" Cancelled ", RequestState.CANCELLED),
        ("pending", RequestState.IN_QUEUE),
        ("queued", RequestState.IN_QUEUE),
        ("processing", RequestState.IN_PROGRESS),
    ],
)
def test_request_states_and_their_spellings(raw: str, state: RequestState) -> None:
    status = RequestStatus.model_validate({"request_id": "r1", "status": raw})
    result = RequestResult.model_validate({"request_id": "r1", "status": raw})
    assert status.status is state
    assert result.status is state
    assert state.is_terminal is not state.is_pending


def test_an_unknown_state_is_not_silently_accepted() -> None:
    with pytest.raises(ValidationError):
        RequestStatus.model_validate({"request_id": "r1", "status": "exploded"})


def test_queue_position_only_while_queued() -> None:
    queued = RequestStatus.model_validate(
        {
            "request_id": "r1",
            "status": "in_queue",
            "queue_position": 3,
            "status_url": "https://model-api.runcomfy.net/v1/requests/r1/status",
            "result_url": "https://model-api.runcomfy.net/v1/requests/r1/result",
        }
    )
    running = RequestStatus.model_validate({"request_id": "r1", "status": "in_progress"})
    assert queued.queue_position == 3
    assert queued.status_url is not None and queued.status_url.endswith("/r1/status")
    assert running.queue_position is None


def test_unknown_fields_are_tolerated_everywhere() -> None:
    status = RequestStatus.model_validate(
        {"request_id": "r1", "status": "in_progress", "instance_id": "i-9", "progress": 0.4}
    )
    assert status.model_extra == {"instance_id": "i-9", "progress": 0.4}
    submission = Submission.model_validate({"request_id": "r1", "gateway_request_id": "g", "extra": [1]})
    assert submission.request_id == "r1" and submission.status_url is None
    result = RequestResult.model_validate(
        {"request_id": "r1", "status": "succeeded", "output": {"video": "https://x/v.mp4"}, "input": {"a": 1}}
    )
    assert result.video_url == "https://x/v.mp4"
    cancel = CancelResult.model_validate({"request_id": "r1", "outcome": "cancelled", "note": "x"})
    assert cancel.cancelled


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 129, "semi;colon"])
def test_submission_rejects_request_ids_that_cannot_be_path_segments(bad: str) -> None:
    with pytest.raises(ValidationError):
        Submission.model_validate({"request_id": bad})


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ("The image was rejected", None, "The image was rejected"),
        ({"type": "SAFETY.INPUT.IMAGE", "message": "unsafe image"}, "SAFETY.INPUT.IMAGE", "unsafe image"),
        (
            {"failure_code": "INTERNAL.BAD_OUTPUT.CODE01", "message": "bad"},
            "INTERNAL.BAD_OUTPUT.CODE01",
            "bad",
        ),
        ({"failureCode": "SAFETY.OUTPUT.VIDEO", "failure": "flagged"}, "SAFETY.OUTPUT.VIDEO", "flagged"),
        ({"code": 500, "error_message": "boom"}, "500", "boom"),
        ([{"errorCode": 1001, "error": "first", "debugInfo": "trace"}], "1001", "first"),
        ([{"error": "a"}, "not a dict", {"message": "b"}], None, "a; b"),
        ({}, None, None),
        ([], None, None),
        (None, None, None),
    ],
)
def test_error_as_string_object_or_list(error: Any, code: str | None, message: str | None) -> None:
    result = RequestResult.model_validate({"request_id": "r1", "status": "failed", "error": error})
    assert result.status is RequestState.FAILED
    assert result.failure_code == code
    assert result.failure_message == message


@pytest.mark.parametrize(
    ("output", "urls"),
    [
        ({"video": "https://x/a.mp4"}, ["https://x/a.mp4"]),
        ({"videos": ["https://x/a.mp4", "https://x/b.mp4"]}, ["https://x/a.mp4", "https://x/b.mp4"]),
        (
            {"video": "https://x/a.mp4", "videos": ["https://x/a.mp4", "https://x/b.mp4"]},
            ["https://x/a.mp4", "https://x/b.mp4"],
        ),
        ({"image": "https://x/a.png", "images": ["https://x/b.png"]}, []),
        ({"videos": "https://x/not-a-list.mp4"}, []),
        ({"videos": [None, 5, "https://x/c.mp4"]}, ["https://x/c.mp4"]),
        (None, []),
    ],
)
def test_video_and_videos(output: Any, urls: list[str]) -> None:
    result = RequestResult.model_validate({"request_id": "r1", "status": "succeeded", "output": output})
    assert result.video_urls == urls
    assert result.video_url == (urls[0] if urls else None)


def test_timestamps_cost_and_model_id_are_parsed() -> None:
    result = RequestResult.model_validate(
        {
            "request_id": "r1",
            "status": "succeeded",
            "output": {"video": "https://x/a.mp4"},
            "created_at": "2026-11-21T10:00:00.123456+00:00",
            "started_at": "2026-11-21T10:00:02Z",
            "finished_at": "2026-11-21T11:00:45.5-01:00",
            "cost": 0.25,
            "model_id": "runwayml/runway-gen-4/turbo/image-to-video",
        }
    )
    assert result.created_at == datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)
    assert result.started_at == datetime(2026, 11, 21, 10, 0, 2, tzinfo=UTC)
    assert result.finished_at == datetime(
        2026, 11, 21, 11, 0, 45, 500000, tzinfo=timezone(timedelta(hours=-1))
    )
    assert result.finished_at - result.created_at == timedelta(hours=2, seconds=45, microseconds=376544)
    assert result.cost is not None and math.isclose(result.cost, 0.25)
    assert result.model_id == "runwayml/runway-gen-4/turbo/image-to-video"
    pending = RequestResult.model_validate({"request_id": "r1", "status": "in_queue"})
    assert (pending.created_at, pending.finished_at, pending.cost, pending.output) == (None, None, None, None)


@pytest.mark.parametrize(
    ("body", "cancelled"),
    [
        ({"request_id": "r1", "status": "cancelled", "outcome": "cancelled"}, True),
        ({"request_id": "r1", "status": "completed", "outcome": "cancelled"}, True),
        ({"request_id": "r1", "outcome": "canceled"}, True),
        ({"request_id": "r1", "status": "cancelled"}, True),
        ({"request_id": "r1", "status": "in_progress", "outcome": "not_cancellable"}, False),
        ({"request_id": "r1", "outcome": "cancellation_requested"}, False),
        ({"request_id": "r1"}, False),
    ],
)
def test_cancel_result(body: dict[str, Any], cancelled: bool) -> None:
    assert CancelResult.model_validate(body).cancelled is cancelled
