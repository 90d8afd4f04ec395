"""The model seam: a model is one ModelSpec, read from its published schema; the pipeline asks it.

Gen-4 Turbo's spec is checked against the constants the schema oracle pins to the vendor page; a test
model with other field names, enums and limits (``tests/models/acme_motion.py``), served by the emulator
from its catalog, goes through the whole pipeline, and the emulator's ledger says what was paid.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from dagster_runway import RunComfyResource, build_runway_pipeline
from dagster_runway.media import GenerationSettings, MediaError
from dagster_runway.models import (
    RUNWAY_GEN4_TURBO,
    ModelSpec,
    ModelSpecError,
    UnknownModelError,
    known_models,
    model_spec,
    register_model,
    unregister_model,
)
from dagster_runway.pipeline.config import RunwayPipelineConfig
from dagster_runway.pipeline.factory import build_definitions
from dagster_runway.pipeline.prepare import prepare
from dagster_runway.schema import (
    DEFAULT_DURATION,
    DEFAULT_PROMPT_TEXT,
    DEFAULT_RATIO,
    DURATIONS,
    IMAGE_MAX_ASPECT,
    IMAGE_MAX_BYTES,
    IMAGE_MAX_SIDE,
    IMAGE_MIN_ASPECT,
    INPUT_SCHEMA,
    MODEL_ID,
    PROMPT_TEXT_MAX,
    RATIOS,
    SEED_MAX,
)
from dagster_runway.testing import LocalDaemon
from tests.models import acme_motion as acme
from tests.pipeline_helpers import (
    VIDEOS,
    check_statuses,
    latest_failure,
    png_bytes,
    run_until_idle,
    video_metadata,
)


@pytest.fixture
def acme_model() -> Iterator[ModelSpec]:
    register_model(acme.SPEC)
    yield acme.SPEC
    unregister_model(acme.MODEL_ID)


def test_gen4_turbos_spec_is_read_from_its_published_schema() -> None:
    spec = model_spec(MODEL_ID)
    assert spec is RUNWAY_GEN4_TURBO and spec.input_schema is INPUT_SCHEMA
    assert (spec.ratios, spec.durations, spec.default_ratio, spec.default_duration) == (
        RATIOS,
        DURATIONS,
        DEFAULT_RATIO,
        DEFAULT_DURATION,
    )
    assert (spec.seed_max, spec.prompt_max, spec.default_prompt) == (
        SEED_MAX,
        PROMPT_TEXT_MAX,
        DEFAULT_PROMPT_TEXT,
    )
    rules = spec.image_rules
    assert (rules.max_bytes, rules.max_side, rules.min_aspect, rules.max_aspect) == (
        IMAGE_MAX_BYTES,
        IMAGE_MAX_SIDE,
        IMAGE_MIN_ASPECT,
        IMAGE_MAX_ASPECT,
    )
    # The request it builds is the one the pydantic model of the page builds.
    fields = spec.request_fields(prompt=None, ratio="960:960", duration=10, seed=7)
    assert fields == {"ratio": "960:960", "duration": 10, "seed": 7}
    assert spec.request("https://example.com/a.png", fields) == {
        "promptImage": "https://example.com/a.png",
        **fields,
    }


def test_an_unknown_model_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="not a model this package knows") as info:
        RunComfyResource(api_token="t", model_id="acme/no-such-model")
    assert MODEL_ID in str(info.value) and "register_model" in str(info.value)
    with pytest.raises(UnknownModelError, match=MODEL_ID):
        model_spec("kling/none")
    assert known_models() == (MODEL_ID,)


def test_a_spec_whose_schema_lacks_what_it_names_is_refused_where_it_is_written() -> None:
    with pytest.raises(ModelSpecError, match="no field 'prompt_text'"):
        ModelSpec(
            "x/y",
            "X",
            "",
            acme.INPUT_SCHEMA,
            "image_url",
            "aspect_ratio",
            "duration",
            prompt_field="prompt_text",
        )
    broken = json.loads(json.dumps(acme.INPUT_SCHEMA))
    broken["properties"]["image_url"]["validations"] = []
    with pytest.raises(ModelSpecError, match="validations lack"):
        ModelSpec("x/y", "X", "", broken, "image_url", "aspect_ratio", "duration")
    unbounded = json.loads(json.dumps(acme.INPUT_SCHEMA))
    del unbounded["properties"]["seed"]["maximum"]
    with pytest.raises(ModelSpecError, match="seed needs an integer maximum"):
        ModelSpec("x/y", "X", "", unbounded, "image_url", "aspect_ratio", "duration", seed_field="seed")


def test_the_test_models_rules_come_from_its_schema(acme_model: ModelSpec) -> None:
    spec = acme_model
    assert (
        spec.ratios == ("16:9", "9:16", "1:1")
        and spec.durations == (5, 10)
        and spec.seed_max == acme.SEED_MAX
    )
    # Its duration is a string enum: the request carries "10", and reading it back gives 10 s.
    fields = spec.request_fields(prompt="slow zoom", ratio="1:1", duration=10, seed=3)
    assert fields == {"aspect_ratio": "1:1", "duration": "10", "seed": 3, "prompt": "slow zoom"}
    assert (
        spec.ratio_of(fields),
        spec.duration_of(fields),
        spec.seed_of(fields),
        spec.prompt_of(fields),
    ) == ("1:1", 10, 3, "slow zoom")
    assert [
        name for name, _, _ in spec.problems({"aspect_ratio": "1280:720", "duration": 10, "seed": -1})
    ] == ["image_url", "aspect_ratio", "duration", "seed"]
    # Settings are judged by the model they are for; Gen-4 Turbo's stay as they were.
    with pytest.raises(ValueError, match=r"ratio '1280:720' is not one of 16:9, 9:16, 1:1 or 'auto'"):
        GenerationSettings.for_model(spec, ratio="1280:720")
    with pytest.raises(ValueError, match=rf"seed {acme.SEED_MAX + 1} is outside 0..{acme.SEED_MAX}"):
        GenerationSettings.for_model(spec, seed=acme.SEED_MAX + 1)
    with pytest.raises(ValueError, match="promptText is 501 characters, at most 500"):
        GenerationSettings.for_model(spec, prompt_text="x" * 501)
    assert GenerationSettings.for_model(spec, ratio="16:9").ratio == "16:9"
    assert GenerationSettings(ratio="1280:720").ratio == "1280:720"
    with pytest.raises(ValueError, match="is not one of 1584:672"):
        GenerationSettings(ratio="16:9")


def test_pipeline_defaults_are_checked_against_the_models_rules_however_they_are_given(
    tmp_path: Path, acme_model: ModelSpec
) -> None:
    """As a mapping, as YAML in a Component, or as a config built elsewhere: the defaults are judged by
    the model the pipeline runs, not by Gen-4 Turbo's rules."""
    from dagster_runway.component import RunwayPipelineComponent

    (tmp_path / "images").mkdir()
    where = {"source": str(tmp_path / "images"), "output": str(tmp_path / "videos")}
    acme_resource = RunComfyResource(
        api_token="t" * 24, base_url="http://127.0.0.1:9", model_id=acme.MODEL_ID
    )
    # Both built (each raised before: judged by Gen-4 Turbo's ratios), the second re-validated for this model.
    build_runway_pipeline(**where, resource=acme_resource, defaults={"ratio": "16:9", "duration": 10})
    built_elsewhere = RunwayPipelineConfig(
        **where, defaults=GenerationSettings.for_model(acme_model, ratio="9:16")
    )
    build_runway_pipeline(built_elsewhere, resource=acme_resource)
    with pytest.raises(ValueError, match=r"(?s)defaults.ratio.*'1280:720' is not one of 16:9, 9:16, 1:1"):
        build_runway_pipeline(**where, resource=acme_resource, defaults={"ratio": "1280:720"})
    gen4_config = RunwayPipelineConfig(**where, defaults={"ratio": "1280:720"})  # right for Gen-4 Turbo only
    with pytest.raises(ValueError, match=rf"defaults: ratio '1280:720' is not one of .*{acme.MODEL_ID}"):
        build_definitions(gen4_config, acme_resource)

    def component(attributes: str) -> dg.Definitions:
        yaml = f"source: {where['source']}\noutput: {where['output']}\n{attributes}"
        return dg.build_defs_for_component(RunwayPipelineComponent.resolve_from_yaml(yaml))

    defs = component(f"model_id: {acme.MODEL_ID}\ndefaults: {{ratio: '16:9', prompt_text: a slow pan}}\n")
    resource = defs.resources["runcomfy_runway"]  # another model: a resource key of its own
    assert resource.model_id == acme.MODEL_ID
    with pytest.raises(Exception, match=r"ratio '16:9' is not one of 1584:672"):
        component("defaults: {ratio: '16:9'}\n")  # the default model: Gen-4 Turbo's rules
    with pytest.raises(Exception, match="is not a model this package knows"):
        component("model_id: nobody/no-model\n")


def _prepared(tmp_path: Path, spec: ModelSpec, name: str, size: tuple[int, int], sidecar: dict | None = None):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(png_bytes(*size))
    if sidecar is not None:
        (folder / name).with_suffix(".json").write_text(json.dumps(sidecar))
    pipeline = RunwayPipelineConfig(source=str(folder), output=str(tmp_path / "videos"))
    source = pipeline.image_source(spec)
    entry = next(e for e in source.list() if e.relpath == name)
    return prepare(pipeline, source, entry.partition_key, entry)


def test_prepare_asks_the_model_for_the_image_rules_the_ratio_and_the_seed(
    tmp_path: Path, acme_model: ModelSpec
) -> None:
    wide = _prepared(tmp_path, acme_model, "wide.png", (440, 200))  # aspect 2.2: this model takes it
    assert wide.fields["aspect_ratio"] == "16:9" and wide.fields["duration"] == "5"
    assert 0 <= wide.fields["seed"] <= acme.SEED_MAX and "prompt" not in wide.fields
    meta = wide.metadata()
    assert (meta["runway/ratio"], meta["runway/duration_s"], meta["runway/model"]) == (
        "16:9",
        5,
        acme.MODEL_ID,
    )
    assert (
        meta["runway/prompt_text"] == "a gentle camera move"
    )  # the model's default, as the service applies it
    with pytest.raises(MediaError, match="outside 0.5..2.0"):
        _prepared(tmp_path, RUNWAY_GEN4_TURBO, "wide.png", (440, 200))  # Gen-4 Turbo's rules refuse it
    with pytest.raises(MediaError, match="each side must be under 4096 px"):
        _prepared(tmp_path, acme_model, "big.png", (4200, 2100))
    square = _prepared(tmp_path, acme_model, "sq.png", (240, 240), {"duration": "10", "prompt": "orbit"})
    assert square.fields == {
        "aspect_ratio": "1:1",
        "duration": "10",
        "seed": square.fields["seed"],
        "prompt": "orbit",
    }


def test_a_second_model_goes_through_the_whole_pipeline(
    tmp_path: Path, emulator_factory, acme_model: ModelSpec
) -> None:
    emulator = emulator_factory(catalog=[acme.CATALOG_ENTRY])
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "land.png").write_bytes(png_bytes(320, 180))
    (folder / "tall.png").write_bytes(png_bytes(180, 320))
    (folder / "tall.json").write_text(json.dumps({"prompt": "a slow tilt", "duration": 10, "seed": 11}))
    (folder / "sq.png").write_bytes(png_bytes(240, 240))
    (folder / "sq.json").write_text(
        json.dumps({"ratio": "1280:720"})
    )  # Gen-4 Turbo's ratio: not this model's
    (folder / "big.png").write_bytes(
        png_bytes(4200, 2100)
    )  # under Gen-4 Turbo's 8000 px, over this one's 4096
    resource = RunComfyResource(
        api_token=emulator.token, base_url=emulator.base_url, model_id=acme.MODEL_ID,
        poll_interval=0.05, backoff_initial=0.01, max_attempts=3,
    )  # fmt: skip
    defs = build_runway_pipeline(
        str(folder), str(tmp_path / "videos"), resource=resource, missing_prompt="service_default"
    )
    with dg.instance_for_test() as instance:
        daemon = LocalDaemon(defs, instance)
        assert daemon.tick("runway_discovery_sensor").new_partitions == 4
        run_until_idle(daemon)

        ledger = emulator.ledger()
        assert ledger.billed_submissions == 2, "only the two images this model accepts are paid for"
        assert sorted(e.cost_usd for e in ledger.entries) == [0.5, 0.5], "the catalog's price per output"
        for key, ratio, duration in (("land.png", "16:9", 5), ("tall.png", "9:16", 10)):
            video = video_metadata(instance, key)
            assert video is not None, key
            assert (video["runway/model"], video["runway/ratio"], video["runway/duration_s"]) == (
                acme.MODEL_ID,
                ratio,
                duration,
            )
            sent = emulator.request_input(video["runway/request_id"])
            assert (
                sent["aspect_ratio"] == ratio
                and sent["duration"] == str(duration)
                and "promptText" not in sent
            )
            assert set(check_statuses(instance, key).values()) == {"SUCCEEDED"}, key
            assert video["runway/cost_usd"] == 0.5 and video["runway/price_source"] == "result"
        sent = emulator.request_input(video_metadata(instance, "tall.png")["runway/request_id"])
        assert (sent["prompt"], sent["seed"]) == ("a slow tilt", 11)

        square = latest_failure(instance, "sq.png")
        assert square is not None and square.failure_class == "invalid_input"
        assert (
            "ratio '1280:720' is not one of 16:9, 9:16, 1:1" in square.reason and "sq.json" in square.reason
        )
        big = latest_failure(instance, "big.png")
        assert big is not None and big.failure_class == "invalid_input" and "under 4096 px" in big.reason
        assert len(instance.fetch_materializations(VIDEOS, limit=10).records) == 2


def test_schema_problems_judge_odd_values_without_crashing() -> None:
    from dagster_runway.models import schema_problems

    schema = {"required": ["a"], "properties": {"a": {"minimum": 0}, "b": {"type": "integer", "maximum": 3}}}
    assert schema_problems(schema, {"a": "x"}) == []  # no type given: a bound judges numbers only
    assert [kind for _, _, kind in schema_problems(schema, {"b": True})] == ["missing", "integer_type"]
    assert [kind for _, _, kind in schema_problems(schema, {"a": -1, "b": 4})] == [
        "range_error",
        "range_error",
    ]
