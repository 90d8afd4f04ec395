"""Schema drift: each kind of change to the live input schema, judged against the one built for."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from dagster_runway.pipeline.drift import compare, refusal
from dagster_runway.schema import INPUT_SCHEMA


def _changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    live = copy.deepcopy(INPUT_SCHEMA)
    edit(live)
    return live


def _rename(live: dict[str, Any]) -> None:
    live["properties"]["prompt_text"] = live["properties"].pop("promptText")


BREAKING = {
    "new-required-field": (
        lambda s: (
            s["properties"].update(negativePrompt={"type": "string"}),
            s["required"].append("negativePrompt"),
        ),
        "negativePrompt.required",
    ),
    "narrowed-enum": (lambda s: s["properties"]["duration"].update(enum=[5]), "duration.enum"),
    "changed-bound": (lambda s: s["properties"]["seed"].update(maximum=2**31 - 1), "seed.maximum"),
    "renamed-field": (_rename, "promptText.removed"),
    "changed-validation": (
        lambda s: s["properties"]["promptImage"]["validations"][4].update(validation_value=10),
        "promptImage.validations",
    ),
    "changed-type": (lambda s: s["properties"]["duration"].update(type="number"), "duration.type"),
    "now-required": (lambda s: s["required"].append("promptText"), "promptText.required"),
}


@pytest.mark.parametrize("kind", sorted(BREAKING))
def test_a_change_that_could_alter_a_paid_submit_is_breaking(kind: str) -> None:
    edit, expected = BREAKING[kind]
    changes = compare(INPUT_SCHEMA, _changed(edit))
    breaking = [change for change in changes if change.breaking]
    assert [change.id for change in breaking] == [expected], changes
    reason, fix = refusal("runwayml/runway-gen-4/turbo/image-to-video", breaking)
    assert expected in reason and "Nothing was sent" in reason
    assert f"accept_schema_changes=[{expected!r}]" in fix


def test_a_rename_names_the_new_field() -> None:
    (removed,) = [c for c in compare(INPUT_SCHEMA, _changed(_rename)) if c.breaking]
    assert "'prompt_text'" in removed.what


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s["properties"]["ratio"].update(description="The frame's shape."), "ratio.description"),
        (lambda s: s["properties"]["duration"].update(enum=[5, 10, 15]), "duration.enum"),
        (lambda s: s["properties"]["seed"].update(maximum=2**40), "seed.maximum"),
        (lambda s: s["properties"].update(motion={"type": "number"}), "motion.added"),
        (lambda s: s["properties"]["promptText"].update(default="a calm scene"), "promptText.default"),
    ],
    ids=["description", "wider-enum", "wider-bound", "new-optional-field", "new-default"],
)
def test_a_harmless_change_is_reported_but_not_breaking(edit, expected: str) -> None:
    changes = compare(INPUT_SCHEMA, _changed(edit))
    assert [(c.id, c.breaking) for c in changes] == [(expected, False)]


def test_the_same_schema_has_no_change() -> None:
    assert compare(INPUT_SCHEMA, copy.deepcopy(INPUT_SCHEMA)) == []
