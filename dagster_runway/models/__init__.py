"""The models this package can run: one :class:`ModelSpec` each, chosen by ``model_id``.

Adding a model is one module beside ``runway_gen4_turbo.py`` that builds its ``SPEC`` from the model
page's input schema, and one line in ``_BUILT_IN``. A spec of your own can be added at run time with
:func:`register_model` (tests do this with a model the emulator serves from ``--catalog``).
"""

from __future__ import annotations

from ._spec import ImageRules, ModelSpec, ModelSpecError, schema_problems
from .runway_gen4_turbo import SPEC as RUNWAY_GEN4_TURBO

_BUILT_IN: tuple[ModelSpec, ...] = (RUNWAY_GEN4_TURBO,)
_REGISTRY: dict[str, ModelSpec] = {spec.model_id: spec for spec in _BUILT_IN}

DEFAULT_MODEL = RUNWAY_GEN4_TURBO


class UnknownModelError(ValueError):
    """A ``model_id`` no spec is known for."""


def known_models() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def find_model(model_id: str) -> ModelSpec | None:
    """The spec of ``model_id``, or None."""
    return _REGISTRY.get(str(model_id).strip("/"))


def model_spec(model_id: str) -> ModelSpec:
    """The spec of ``model_id``; :class:`UnknownModelError` listing the known ones if there is none."""
    spec = find_model(model_id)
    if spec is None:
        raise UnknownModelError(
            f"model_id {str(model_id)[:120]!r} is not a model this package knows: it would be validated and "
            f"priced by another model's rules. Known models: {', '.join(known_models())}. Use one of them, or "
            "add a ModelSpec for it (dagster_runway.models.register_model; see CONTRIBUTING, 'Adding a model')."
        )
    return spec


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` known by its ``model_id`` (replacing an earlier spec of the same id)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model takes a ModelSpec, got {type(spec).__name__}")
    _REGISTRY[spec.model_id] = spec
    return spec


def unregister_model(model_id: str) -> None:
    """Forget a registered spec (the built-in ones stay)."""
    if all(spec.model_id != model_id for spec in _BUILT_IN):
        _REGISTRY.pop(model_id, None)


__all__ = [
    "DEFAULT_MODEL",
    "RUNWAY_GEN4_TURBO",
    "ImageRules",
    "ModelSpec",
    "ModelSpecError",
    "UnknownModelError",
    "find_model",
    "known_models",
    "model_spec",
    "register_model",
    "schema_problems",
    "unregister_model",
]
