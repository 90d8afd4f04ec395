"""Runway Gen-4 Turbo image-to-video on RunComfy.

Page: https://www.runcomfy.com/models/runwayml/runway-gen-4/turbo/image-to-video (its input schema is
``schema.INPUT_SCHEMA``, verbatim, and ``schema.ImageToVideoInput`` validates a request field for field).
"""

from __future__ import annotations

from dagster_runway.schema import INPUT_SCHEMA, MODEL_ID, ImageToVideoInput

from ._spec import ModelSpec

SPEC = ModelSpec(
    model_id=MODEL_ID,
    display_name="Runway Gen-4 Turbo (image to video)",
    page="https://www.runcomfy.com/models/runwayml/runway-gen-4/turbo/image-to-video",
    input_schema=INPUT_SCHEMA,
    image_field="promptImage",
    prompt_field="promptText",
    ratio_field="ratio",
    duration_field="duration",
    seed_field="seed",
    input_model=ImageToVideoInput,
)
