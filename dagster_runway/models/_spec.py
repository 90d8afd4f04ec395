"""What the rest of the package needs to know about one image-to-video model, read from its schema."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ValidationError

_RATIO = re.compile(r"^\d+:\d+$")


class ModelSpecError(ValueError):
    """A spec whose schema does not say what the pipeline needs (a field it names is missing, ...)."""


@dataclass(frozen=True)
class ImageRules:
    """The image rules of the image field's ``validations``: every bound is exclusive, as published."""

    max_bytes: int
    max_side: int
    min_aspect: float
    max_aspect: float

    @classmethod
    def from_validations(cls, validations: list[Mapping[str, Any]], where: str) -> ImageRules:
        wanted = ("width_pixels<", "height_pixels<", "width/height>", "width/height<", "file_size_mb<")
        rules: dict[str, float] = {}
        for rule in validations:
            value = rule.get("validation_value")
            if isinstance(value, int | float) and not isinstance(value, bool):
                rules[str(rule.get("validation_rule"))] = value
        missing = [name for name in wanted if name not in rules]
        if missing:
            raise ModelSpecError(f"{where}: the image field's validations lack {', '.join(missing)}")
        return cls(
            max_bytes=int(rules["file_size_mb<"] * 1024 * 1024),
            max_side=int(min(rules["width_pixels<"], rules["height_pixels<"])),
            min_aspect=float(rules["width/height>"]),
            max_aspect=float(rules["width/height<"]),
        )


@dataclass(frozen=True)
class ModelSpec:
    """One image-to-video model: its id, its published input schema, and which field is which.

    The schema is the model page's, verbatim; the enums, bounds, defaults and image rules the pipeline
    uses are read from it. Only the field names are told (``image_field`` and the rest): the schema does
    not say which string is the prompt. ``ratio`` values are ``W:H``; what the checks expect of the output
    (its length, its aspect) is the request's duration and ratio. The price, and what it is per, come
    from the service's catalog when a run starts (``pipeline/catalog.py``), not from the spec.

    ``input_model``, when given, validates a request body (the client's and the pipeline's last check);
    without one the body is checked against the schema (types, required, enums, bounds, lengths).
    """

    model_id: str
    display_name: str
    page: str
    input_schema: Mapping[str, Any]
    image_field: str
    ratio_field: str
    duration_field: str
    prompt_field: str | None = None
    seed_field: str | None = None
    input_model: type[BaseModel] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in (
            self.image_field,
            self.ratio_field,
            self.duration_field,
            self.prompt_field,
            self.seed_field,
        ):
            if name is not None and name not in self._properties:
                raise ModelSpecError(f"{self.model_id}: the input schema has no field {name!r}")
        bad = [r for r in self.ratios if not _RATIO.match(r)]
        if not self.ratios or bad:
            raise ModelSpecError(
                f"{self.model_id}: {self.ratio_field} needs an enum of W:H ratios, got {bad or 'none'}"
            )
        if not self.durations:
            raise ModelSpecError(f"{self.model_id}: {self.duration_field} needs an enum of whole seconds")
        if self.seed_field is not None and not isinstance(self._prop(self.seed_field).get("maximum"), int):
            raise ModelSpecError(
                f"{self.model_id}: {self.seed_field} needs an integer maximum (the seed range)"
            )
        self.image_rules  # noqa: B018 - read now, so that a spec without image rules fails where it is written

    @property
    def _properties(self) -> Mapping[str, Mapping[str, Any]]:
        properties: Mapping[str, Mapping[str, Any]] = self.input_schema.get("properties", {})
        return properties

    def _prop(self, name: str) -> Mapping[str, Any]:
        return self._properties[name]

    # -- what the schema says --------------------------------------------------------------------

    @cached_property
    def ratios(self) -> tuple[str, ...]:
        return tuple(str(value) for value in self._prop(self.ratio_field).get("enum", ()))

    @property
    def default_ratio(self) -> str:
        return str(self._prop(self.ratio_field).get("default", self.ratios[0]))

    @cached_property
    def durations(self) -> tuple[int, ...]:
        values = self._prop(self.duration_field).get("enum", ())
        return tuple(int(v) for v in values if str(v).isdigit())

    @property
    def default_duration(self) -> int:
        return int(self._prop(self.duration_field).get("default", self.durations[0]))

    @property
    def seed_max(self) -> int | None:
        return int(self._prop(self.seed_field)["maximum"]) if self.seed_field else None

    @property
    def prompt_max(self) -> int | None:
        if self.prompt_field is None:
            return None
        limit = self._prop(self.prompt_field).get("maxLength")
        return int(limit) if limit is not None else None

    @property
    def default_prompt(self) -> str | None:
        return self._prop(self.prompt_field).get("default") if self.prompt_field else None

    @cached_property
    def image_rules(self) -> ImageRules:
        return ImageRules.from_validations(self._prop(self.image_field).get("validations", []), self.model_id)

    @property
    def setting_names(self) -> tuple[str, ...]:
        """The per-image settings this model takes, as sidecars and manifests name them."""
        names = [self.prompt_field and "prompt", "ratio", "duration", self.seed_field and "seed"]
        return tuple(name for name in names if name)

    # -- requests --------------------------------------------------------------------------------

    def request_fields(
        self, *, prompt: str | None, ratio: str, duration: int, seed: int | None
    ) -> dict[str, Any]:
        """The input fields (every one but the image) under the model's names and JSON types; the prompt
        only when set (else the service's default), the seed only when the model takes one."""
        as_string = self._prop(self.duration_field).get("type") == "string"
        fields: dict[str, Any] = {
            self.ratio_field: ratio,
            self.duration_field: str(duration) if as_string else duration,
        }
        if self.seed_field is not None and seed is not None:
            fields[self.seed_field] = seed
        if self.prompt_field is not None and prompt is not None:
            fields[self.prompt_field] = prompt
        return fields

    def prompt_of(self, fields: Mapping[str, Any]) -> str | None:
        value = fields.get(self.prompt_field) if self.prompt_field else None
        return value if isinstance(value, str) else None

    def ratio_of(self, fields: Mapping[str, Any]) -> str | None:
        value = fields.get(self.ratio_field)
        return str(value) if value is not None else None

    def duration_of(self, fields: Mapping[str, Any]) -> int | None:
        value = fields.get(self.duration_field)
        return int(value) if isinstance(value, int | float | str) and str(value).strip().isdigit() else None

    def seed_of(self, fields: Mapping[str, Any]) -> int | None:
        value = fields.get(self.seed_field) if self.seed_field else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def problems(self, body: Mapping[str, Any]) -> list[tuple[str | None, str, str]]:
        """What breaks the schema in a request body, as ``(field, message, kind)``; never the values
        (an image URL may carry a presigned signature)."""
        if self.input_model is not None:
            try:
                self.input_model.model_validate(body)
            except ValidationError as exc:
                aliases = {name: f.alias or name for name, f in self.input_model.model_fields.items()}
                found = []
                for error in exc.errors():
                    name = str(error["loc"][0]) if error["loc"] else None
                    found.append((aliases.get(name, name) if name else None, error["msg"], error["type"]))
                return found
            return []
        return schema_problems(self.input_schema, body)

    def request(self, image: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The body to submit for ``image`` (a URL or data URI) with ``fields``; ``ValueError`` naming
        each broken field if the schema refuses it."""
        body = {self.image_field: image, **fields}
        found = self.problems(body)
        if found:
            raise ValueError("; ".join(f"{name or 'input'}: {message}" for name, message, _ in found[:3]))
        if self.input_model is not None:
            validated = self.input_model.model_validate(body)
            return validated.model_dump(by_alias=True, exclude_unset=True, mode="json")
        return body


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def schema_problems(schema: Mapping[str, Any], body: Mapping[str, Any]) -> list[tuple[str | None, str, str]]:
    """A body checked against a published input schema: required fields, JSON types, enums, bounds and
    lengths (the rules these schemas use)."""
    found: list[tuple[str | None, str, str]] = []
    properties: Mapping[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in body:
            found.append((name, "Field required", "missing"))
    for name, value in body.items():
        prop = properties.get(name)
        if prop is None:
            continue
        kind = prop.get("type")
        types = _TYPES.get(kind, ())
        if types and (not isinstance(value, types) or (kind != "boolean" and isinstance(value, bool))):
            found.append((name, f"Input should be a valid {kind}", f"{kind}_type"))
            continue
        if "enum" in prop and value not in prop["enum"]:
            found.append(
                (name, f"Input should be one of {', '.join(map(str, prop['enum']))}", "literal_error")
            )
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and (
            "minimum" in prop and value < prop["minimum"] or "maximum" in prop and value > prop["maximum"]
        ):
            low, high = prop.get("minimum", "-inf"), prop.get("maximum", "inf")
            found.append((name, f"Input should be between {low} and {high}", "range_error"))
        if "maxLength" in prop and isinstance(value, str) and len(value) > prop["maxLength"]:
            found.append(
                (name, f"String should have at most {prop['maxLength']} characters", "string_too_long")
            )
    return found
