"""The catalog's other models, served too: a request is checked against its entry's ``input_schema``
alone (required fields, JSON types, enums, bounds, lengths) and rendered like Gen-4 Turbo's.

An entry is served when its schema shows an image-to-video model the emulator can render: a required
string field for the image (one with ``validations``, or with ``image`` in its name), a string enum of
``W:H`` ratios and a ``duration`` enum of whole seconds (integers or digit strings); a ``seed`` integer
is used when there is one. Other entries are listed only. The image itself is judged by the worker with
Gen-4 Turbo's image rules, as for the served model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dagster_runway.emulator.catalog import CatalogEntry
from dagster_runway.emulator.inputs import InputInvalid, ModelInput, image_identity

_RATIO = re.compile(r"^\d+:\d+$")
_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float)}


def _error(field: str | None, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", field] if field else ["body"], "msg": msg, "type": kind}


@dataclass(frozen=True)
class CatalogModel:
    entry: CatalogEntry
    image_field: str
    ratio_field: str
    duration_field: str
    seed_field: str | None

    @classmethod
    def of(cls, entry: CatalogEntry) -> CatalogModel | None:
        """The entry as a model to serve, or None when its schema is not one the emulator can render."""
        props: dict[str, Any] = entry.input_schema.get("properties") or {}
        required = entry.input_schema.get("required") or []
        image = next(
            (
                name
                for name, prop in props.items()
                if name in required
                and prop.get("type") == "string"
                and (prop.get("validations") or "image" in name.lower())
            ),
            None,
        )
        ratio = next(
            (
                name
                for name, prop in props.items()
                if prop.get("enum") and all(isinstance(v, str) and _RATIO.match(v) for v in prop["enum"])
            ),
            None,
        )
        durations = (props.get("duration") or {}).get("enum") or []
        if image is None or ratio is None or not durations or not all(str(v).isdigit() for v in durations):
            return None
        seed = "seed" if (props.get("seed") or {}).get("type") == "integer" else None
        return cls(entry, image, ratio, "duration", seed)

    @property
    def price(self) -> tuple[float, str]:
        return self.entry.base_price_usd, self.entry.price_unit

    def validate(self, body: Any, *, allow_any_http: bool) -> ModelInput:
        """The request checked against the entry's schema, defaults filled in; ``InputInvalid`` lists
        every violation, never a value."""
        if not isinstance(body, dict):
            raise InputInvalid([_error(None, "Input should be a JSON object", "model_attributes_type")])
        schema = self.entry.input_schema
        props: dict[str, Any] = schema.get("properties") or {}
        errors: list[dict[str, Any]] = []
        fields = dict(body)
        image = fields.pop(self.image_field, None)
        identity = ""
        for name in schema.get("required") or []:
            if name not in body:
                errors.append(_error(name, "Field required", "missing"))
        if isinstance(image, str):
            try:
                identity = image_identity(image, allow_any_http=allow_any_http)
            except ValueError as exc:
                errors.append(_error(self.image_field, str(exc), "value_error"))
        elif self.image_field in body:
            errors.append(_error(self.image_field, "Input should be a valid string", "string_type"))
        for name, prop in props.items():
            if name == self.image_field:
                continue
            if name not in fields:
                default = prop.get("default", (prop.get("enum") or [None])[0])
                if default is not None:
                    fields[name] = default
                continue
            errors.extend(_check(name, prop, fields[name]))
        if errors:
            raise InputInvalid(errors)
        assert isinstance(image, str)
        return ModelInput(
            prompt_image=image,
            fields=fields,
            image_identity=identity,
            image_field=self.image_field,
            render_fields=(self.ratio_field, self.duration_field, self.seed_field),
        )


def _check(name: str, prop: dict[str, Any], value: Any) -> list[dict[str, Any]]:
    kind = prop.get("type")
    types = _JSON_TYPES.get(str(kind), ())
    if types and (isinstance(value, bool) or not isinstance(value, types)):
        return [_error(name, f"Input should be a valid {kind}", f"{kind}_type")]
    found = []
    if "enum" in prop and value not in prop["enum"]:
        found.append(
            _error(name, f"Input should be one of {', '.join(map(str, prop['enum']))}", "literal_error")
        )
    low, high = prop.get("minimum"), prop.get("maximum")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and ((low is not None and value < low) or (high is not None and value > high)):
        found.append(_error(name, f"Input should be between {low} and {high}", "range_error"))
    if isinstance(value, str) and "maxLength" in prop and len(value) > prop["maxLength"]:
        found.append(
            _error(name, f"String should have at most {prop['maxLength']} characters", "string_too_long")
        )
    return found
