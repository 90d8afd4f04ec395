"""A test model: the example of adding a model, with field names, enums and rules of its own.

No second RunComfy image-to-video model's published schema could be confirmed from this machine, so this
one is made up, in the same JSON form as the model pages' (``validations`` with ``validation_rule``), and
different from Gen-4 Turbo wherever a model can differ: the image is ``image_url`` with smaller limits,
the prompt ``prompt`` (at most 500 characters), the ratio ``aspect_ratio`` (aspects, not pixel sizes),
the duration a *string* enum, a smaller seed range, and a field the pipeline never sets. The emulator
serves it from its catalog entry (``CATALOG_ENTRY``, as ``--catalog FILE`` would give it).
"""

from __future__ import annotations

from typing import Any

from dagster_runway.models import ModelSpec

MODEL_ID = "acme/motion-1/image-to-video"
SEED_MAX = 2147483647

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Input",
    "required": ["image_url"],
    "properties": {
        "image_url": {
            "title": "Start frame",
            "type": "string",
            "validations": [
                {
                    "validation_rule": "width_pixels<",
                    "validation_value": 4096,
                    "validation_error": "too wide",
                },
                {
                    "validation_rule": "height_pixels<",
                    "validation_value": 4096,
                    "validation_error": "too tall",
                },
                {"validation_rule": "width/height>", "validation_value": 0.4, "validation_error": "aspect"},
                {"validation_rule": "width/height<", "validation_value": 2.5, "validation_error": "aspect"},
                {"validation_rule": "file_size_mb<", "validation_value": 10, "validation_error": "size"},
            ],
        },
        "prompt": {"title": "Prompt", "type": "string", "maxLength": 500, "default": "a gentle camera move"},
        "negative_prompt": {"title": "Negative prompt", "type": "string", "maxLength": 500},
        "aspect_ratio": {
            "title": "Aspect ratio",
            "type": "string",
            "enum": ["16:9", "9:16", "1:1"],
            "default": "16:9",
        },
        "duration": {"title": "Duration", "type": "string", "enum": ["5", "10"], "default": "5"},
        "seed": {"title": "Seed", "type": "integer", "minimum": 0, "maximum": SEED_MAX},
    },
}

SPEC = ModelSpec(
    model_id=MODEL_ID,
    display_name="Acme Motion 1 (image to video, a test model)",
    page="(made up for the tests; see the module docstring)",
    input_schema=INPUT_SCHEMA,
    image_field="image_url",
    prompt_field="prompt",
    ratio_field="aspect_ratio",
    duration_field="duration",
    seed_field="seed",
)

CATALOG_ENTRY: dict[str, Any] = {
    "model_id": MODEL_ID,
    "display_name": SPEC.display_name,
    "categories": ["image-to-video"],
    "base_price_usd": 0.5,
    "price_unit": "output",
    "pricing_note": "$0.50 per video",
    "input_schema": INPUT_SCHEMA,
    "model_url": "https://example.invalid/acme/motion-1",
}
