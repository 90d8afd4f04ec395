"""Schema drift: the service's live ``input_schema`` (from its catalog) against the one this package was
built for (its ``ModelSpec.input_schema``, the vendor page's).

A change that could make a paid submit fail or behave otherwise is *breaking*: a field this package
sends is gone or renamed, a new field is required, an enum lost a value, a bound or a validation is
stricter (or only different: it cannot be judged), a type changed. Anything else is *harmless* (a
description, a title, a wider enum or bound, a new optional field) and is only logged. Each change has
an ``id`` (``duration.enum``, say) that the pipeline option ``accept_schema_changes`` takes to accept it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems")
_WORDING = ("title", "description", "examples")


@dataclass(frozen=True)
class SchemaChange:
    """One difference between the schema built for and the live one."""

    id: str  # "<field>.<aspect>", e.g. "duration.enum", "promptImage.validations", "negativePrompt.required"
    breaking: bool
    what: str  # a sentence: the field, what it was and what it is now

    def __str__(self) -> str:
        return f"{self.id}: {self.what}"


def compare(built: Mapping[str, Any], live: Mapping[str, Any]) -> list[SchemaChange]:
    """Every difference between ``built`` and ``live`` (JSON Schema objects with ``properties``), in
    field order; breaking ones first."""
    changes: list[SchemaChange] = []
    ours: Mapping[str, Any] = built.get("properties") or {}
    theirs: Mapping[str, Any] = live.get("properties") or {}
    required_before, required_now = set(built.get("required") or ()), set(live.get("required") or ())
    added = [name for name in theirs if name not in ours]
    for name, field in ours.items():
        if name not in theirs:
            hint = f" (renamed to {' or '.join(repr(a) for a in added)}?)" if added else ""
            changes.append(
                SchemaChange(
                    f"{name}.removed", True, f"the field {name!r} is gone from the live schema{hint}"
                )
            )
            continue
        changes += _field_changes(name, field, theirs[name])
        if name in required_now and name not in required_before:
            changes.append(SchemaChange(f"{name}.required", True, f"the field {name!r} is now required"))
    for name in added:
        if name in required_now:
            changes.append(
                SchemaChange(
                    f"{name}.required", True, f"a new field {name!r} is required; this package never sends it"
                )
            )
        else:
            changes.append(SchemaChange(f"{name}.added", False, f"a new optional field {name!r}"))
    return sorted(changes, key=lambda change: not change.breaking)


def _field_changes(name: str, ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[SchemaChange]:
    changes: list[SchemaChange] = []

    def change(aspect: str, breaking: bool, what: str) -> None:
        changes.append(SchemaChange(f"{name}.{aspect}", breaking, f"{name!r}: {what}"))

    if ours.get("type") != theirs.get("type"):
        change("type", True, f"type {ours.get('type')!r} is now {theirs.get('type')!r}")
    if "enum" in ours or "enum" in theirs:
        before, now = list(ours.get("enum") or []), list(theirs.get("enum") or [])
        lost, gained = [v for v in before if v not in now], [v for v in now if v not in before]
        if lost or ("enum" in theirs and "enum" not in ours):
            change("enum", True, f"no longer accepts {lost or before}; it accepts {now}")
        elif gained:
            change("enum", False, f"also accepts {gained}")
    for bound in (*_LOWER_BOUNDS, *_UPPER_BOUNDS):
        old, new = ours.get(bound), theirs.get(bound)
        if old == new:
            continue
        if isinstance(old, int | float) and isinstance(new, int | float):
            stricter = new > old if bound in _LOWER_BOUNDS else new < old
        else:
            stricter = new is not None  # a bound that appears is stricter; one that goes is wider
        change(bound, stricter, f"{bound} {old!r} is now {new!r}")
    before_rules, now_rules = _rules(ours.get("validations")), _rules(theirs.get("validations"))
    if before_rules != now_rules:
        lost = sorted(before_rules - now_rules)
        gained = sorted(now_rules - before_rules)
        change("validations", True, f"validations changed: {lost} -> {gained}")
    elif _messages(ours.get("validations")) != _messages(theirs.get("validations")):
        change("validations_wording", False, "the validations' error messages changed")
    if ours.get("default") != theirs.get("default"):
        change("default", False, f"default {ours.get('default')!r} is now {theirs.get('default')!r}")
    for key in _WORDING:
        if ours.get(key) != theirs.get(key):
            change(key, False, f"{key} changed")
    return changes


def _rules(validations: Iterable[Mapping[str, Any]] | None) -> set[tuple[str, str]]:
    return {(str(v.get("validation_rule")), repr(v.get("validation_value"))) for v in validations or ()}


def _messages(validations: Iterable[Mapping[str, Any]] | None) -> list[str]:
    return sorted(str(v.get("validation_error")) for v in validations or ())


def refusal(model_id: str, changes: Iterable[SchemaChange]) -> tuple[str, str]:
    """Why a run stops before paying because of ``changes`` (the breaking ones), and the fix."""
    changes = list(changes)
    listed = "; ".join(str(change) for change in changes)
    ids = ", ".join(repr(change.id) for change in changes)
    return (
        f"the service's input schema for {model_id} differs from the one this package was built for in ways that "
        f"could make a paid submit fail or behave otherwise: {listed}. Nothing was sent.",
        f"upgrade dagster-runway, or, having checked that the change is safe for your inputs, accept it with "
        f"the pipeline option accept_schema_changes=[{ids}].",
    )
