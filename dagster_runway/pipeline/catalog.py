"""What a submit run reads from the service's catalog before paying: the price, and the input schema.

Read once per run (never at definition load), with the client's retries. The price prices the spend
cap's reservations, the estimate shown before spending and ``runway/cost_usd`` until the result states
the real cost; when the catalog cannot be read, or gives no usable price, the configured
``estimated_usd_per_second`` is used and ``runway/price_source`` says ``estimate``. The live schema is
compared with the one this package was built for (:mod:`.drift`): a breaking change stops the run
before anything is sent, unless ``accept_schema_changes`` names it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from dagster_runway.client import ModelInfo, RunComfyClient
from dagster_runway.errors import RunComfyError
from dagster_runway.models import find_model
from dagster_runway.pipeline.drift import SchemaChange, compare, refusal
from dagster_runway.resource import RunComfyResource

logger = logging.getLogger(__name__)

CATALOG = "catalog"  # the catalog's base_price_usd and price_unit
RESULT = "result"  # the result's own cost (include_cost=true)
ESTIMATE = "estimate"  # the configured estimated_usd_per_second: the catalog could not be read

_logged_harmless: set[tuple[str, str]] = set()  # (model id, change id): each harmless change logged once


@dataclass(frozen=True)
class Price:
    """What one video costs until its result says, and where that figure comes from."""

    source: str  # CATALOG or ESTIMATE
    usd_per_second: float | None = None
    usd_per_output: float | None = None
    why_estimate: str = ""  # why the catalog's price is not used, when it is not

    def estimate_usd(self, seconds: int) -> float:
        if self.usd_per_output is not None:
            return round(self.usd_per_output, 6)
        return round((self.usd_per_second or 0.0) * seconds, 6)

    def describe(self) -> str:
        if self.source == CATALOG:
            per = f"{self.usd_per_output} USD a video" if self.usd_per_output is not None else None
            return f"{per or f'{self.usd_per_second} USD a second'} (the service's catalog)"
        return f"{self.usd_per_second} USD a second (estimated_usd_per_second: {self.why_estimate})"


@dataclass(frozen=True)
class CatalogView:
    """One run's reading of the catalog."""

    model_id: str
    price: Price
    breaking: list[SchemaChange] = field(default_factory=list)  # not accepted: the run sends nothing
    harmless: list[SchemaChange] = field(default_factory=list)
    schema_checked: bool = False

    def refusal(self) -> tuple[str, str] | None:
        """Why nothing may be sent in this run and the fix, or None."""
        return refusal(self.model_id, self.breaking) if self.breaking else None


def read(
    resource: RunComfyResource, estimated_usd_per_second: float, accepted: tuple[str, ...] = ()
) -> CatalogView:
    """The catalog's entry of the resource's model, read once: the price and the schema drift."""
    return read_with(resource.get_client(), resource.model_id, estimated_usd_per_second, accepted)


def read_with(
    client: RunComfyClient,
    model_id: str,
    estimated_usd_per_second: float,
    accepted: tuple[str, ...] = (),
    *,
    warn: bool = True,
) -> CatalogView:
    """:func:`read` with a client of one's own (the demo's, before any run). ``warn=False`` leaves saying
    why the estimate is used to the caller (``price.describe()`` does)."""
    try:
        info = client.model(model_id)
    except RunComfyError as exc:
        why = f"the catalog could not be read ({type(exc).__name__}: {exc})"
        if warn:
            logger.warning(
                "%s: %s; pricing with estimated_usd_per_second and not checking the input schema",
                model_id,
                why,
            )
        return CatalogView(
            model_id, Price(ESTIMATE, usd_per_second=estimated_usd_per_second, why_estimate=why)
        )
    return view(model_id, info, estimated_usd_per_second, accepted)


def view(
    model_id: str, info: ModelInfo, estimated_usd_per_second: float, accepted: tuple[str, ...] = ()
) -> CatalogView:
    price = _price(info, estimated_usd_per_second)
    if info.input_schema is None:
        logger.warning("%s: the catalog gives no input_schema; the input schema is not checked", model_id)
        return CatalogView(model_id, price)
    spec = find_model(model_id)
    if spec is None:
        logger.warning("%s: no ModelSpec is known for this model; the input schema is not checked", model_id)
        return CatalogView(model_id, price)
    changes = compare(spec.input_schema, info.input_schema)
    breaking = [c for c in changes if c.breaking and c.id not in accepted]
    harmless = [c for c in changes if not c.breaking or c.id in accepted]
    for change in harmless:
        if (model_id, change.id) not in _logged_harmless:
            _logged_harmless.add((model_id, change.id))
            logger.info("%s: the live input schema differs harmlessly (or as accepted): %s", model_id, change)
    return CatalogView(model_id, price, breaking, harmless, schema_checked=True)


def _price(info: ModelInfo, estimated_usd_per_second: float) -> Price:
    price = info.base_price_usd
    usable = price is not None and math.isfinite(price) and price > 0  # a zero price would reserve nothing
    if usable and info.price_unit == "second":
        return Price(CATALOG, usd_per_second=price)
    if usable and info.price_unit == "output":
        return Price(CATALOG, usd_per_output=price)
    if price is None:
        why = "the catalog gives no price"
    elif not usable:
        why = f"the catalog's price {price!r} is not a positive number"
    else:
        why = f"the catalog's price_unit {info.price_unit!r} is not 'second' or 'output'"
    return Price(ESTIMATE, usd_per_second=estimated_usd_per_second, why_estimate=why)
