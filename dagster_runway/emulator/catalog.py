"""The emulator's model catalog: ``GET /v1/models``, ``/v1/models/{model_id}`` and ``/v1/models/categories``.

An entry has the fields RunComfy's own clients read (``reference/runcomfy-api.md`` §1): ``model_id``,
``display_name``, ``categories``, ``base_price_usd``, ``price_unit`` (``second`` or ``output``),
``pricing_note``, ``input_schema`` and ``model_url``. The served model's entry is built from the config
(its price, and the seed's published input schema unless the config gives another); other entries come
from the config's ``catalog`` (``--catalog FILE``). Those whose schema is an image-to-video model's are
served too, checked against that schema alone and billed at their own price (``catalog_models.py``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PriceUnit = Literal["second", "output"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_DISPLAY_NAME = "Runway Gen-4 Turbo Image to Video"
_CATEGORIES = ["image-to-video"]


class CatalogEntry(BaseModel):
    """One model as ``GET /v1/models/{model_id}`` describes it."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(
        min_length=1, pattern=r"^[^/\s]+(/[^/\s]+)*$", description="e.g. owner/model/variant."
    )
    display_name: str = Field(min_length=1, description="The model's name for people.")
    categories: list[str] = Field(default_factory=list, description="e.g. image-to-video.")
    base_price_usd: float = Field(ge=0.0, allow_inf_nan=False, description="USD per price_unit.")
    price_unit: PriceUnit = Field(
        description="What base_price_usd is per: a second of output, or one output."
    )
    pricing_note: str = Field(default="", description="Free text about the price.")
    input_schema: dict[str, Any] = Field(default_factory=dict, description="The JSON schema of the input.")
    model_url: str = Field(default="", description="The model's page.")


_ENTRIES = TypeAdapter(list[CatalogEntry])


class CatalogFileError(ValueError):
    """A ``--catalog`` file that cannot be used; the message names the file, the entry and the fix."""


def load_catalog_file(path: str | Path) -> list[CatalogEntry]:
    """The entries of a JSON file holding a list of catalog entries, or ``{"models": [...]}`` (the shape
    ``GET /v1/models`` answers, so a saved listing can be served again)."""
    shown = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogFileError(f"catalog file {shown}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CatalogFileError(
            f"catalog file {shown}: not JSON ({exc}); give a JSON list of entries"
        ) from None
    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    if not isinstance(data, list):
        raise CatalogFileError(
            f"catalog file {shown}: must be a JSON list of model entries (or an object with a 'models' list), "
            f"got {type(data).__name__}"
        )
    try:
        return _ENTRIES.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(data, error) for error in exc.errors()[:3])
        raise CatalogFileError(
            f"catalog file {shown}: {problems}. Each entry needs model_id, display_name, base_price_usd "
            "(a number >= 0) and price_unit ('second' or 'output'); categories, pricing_note, input_schema "
            "and model_url are optional, and no other field is allowed"
        ) from None


def _problem(data: list[Any], error: Any) -> str:
    index, *rest = error["loc"]
    entry = data[index] if isinstance(index, int) and index < len(data) else None
    name = entry.get("model_id") if isinstance(entry, dict) else None
    where = f"entry {index}" + (f" ({name})" if isinstance(name, str) else "")
    return f"{where}: {'.'.join(map(str, rest)) or 'entry'}: {error['msg']}"


class Catalog:
    """The served model's entry first, then the others in the given order."""

    def __init__(self, served: CatalogEntry, others: list[CatalogEntry]) -> None:
        self._entries = [served, *others]

    def get(self, model_id: str) -> CatalogEntry | None:
        return next((entry for entry in self._entries if entry.model_id == model_id), None)

    def search(self, search: str | None, category: str | None) -> list[CatalogEntry]:
        """Entries whose model_id or display_name contains ``search`` and that have ``category``, both
        without regard to case."""
        needle = (search or "").strip().lower()
        wanted = (category or "").strip().lower()
        return [
            entry
            for entry in self._entries
            if (not needle or needle in entry.model_id.lower() or needle in entry.display_name.lower())
            and (not wanted or wanted in (c.lower() for c in entry.categories))
        ]

    def categories(self) -> list[str]:
        return sorted({category for entry in self._entries for category in entry.categories})


def served_entry(
    model_id: str, price_usd: float, price_unit: PriceUnit, input_schema: dict[str, Any]
) -> CatalogEntry:
    """The catalog entry of the model the emulator serves."""
    per = "second of output video" if price_unit == "second" else "output"
    return CatalogEntry(
        model_id=model_id,
        display_name=_DISPLAY_NAME,
        categories=list(_CATEGORIES),
        base_price_usd=price_usd,
        price_unit=price_unit,
        pricing_note=f"${price_usd:g} per {per} (the emulator's configured price).",
        input_schema=copy.deepcopy(input_schema),
        model_url=f"https://www.runcomfy.com/models/{model_id}",
    )
