"""RunComfy's own ComfyUI partner-node client, run unchanged against the emulator: it looks up the price,
submits, polls ``/result?include_cost=true``, reads the cost and downloads the video.

Its code is not part of this repository: set ``RUNCOMFY_PARTNER_NODES_DIR`` to a checkout of
github.com/runcomfy-com/comfyui-runcomfy-partner-nodes (the directory holding ``runcomfy/``); without it
the tests are skipped. Two things are set from outside, none of its code is changed:

- its model allowlist (``runcomfy.catalog.MODELS``) does not have Runway Gen-4 Turbo: the test adds the
  entry, with the package's input schema;
- it talks to a fixed host (``configured_api_base()``): the test points the client's ``api_base`` at
  the emulator; and its download accepts only HTTPS URLs on ``*.runcomfy.net``: the test hands it the
  output URL with the emulator's origin replaced by ``https://files.emulator.runcomfy.net`` and a ``get``
  (its own injection point) that maps that origin back to the emulator's loopback one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.schema import INPUT_SCHEMA, MODEL_ID
from tests.fixtures.emulator import data_uri, make_png

Factory = Callable[..., Emulator]
PARTNER_DIR = os.environ.get("RUNCOMFY_PARTNER_NODES_DIR")
MAPPED_ORIGIN = "https://files.emulator.runcomfy.net"

pytestmark = pytest.mark.skipif(
    not PARTNER_DIR, reason="set RUNCOMFY_PARTNER_NODES_DIR to a checkout of comfyui-runcomfy-partner-nodes"
)


@pytest.fixture(scope="module")
def pn() -> Iterator[dict[str, ModuleType]]:
    assert PARTNER_DIR is not None
    if not (Path(PARTNER_DIR) / "runcomfy" / "client.py").is_file():
        pytest.fail(
            f"RUNCOMFY_PARTNER_NODES_DIR={PARTNER_DIR} has no runcomfy/client.py: point it at the checkout"
        )
    for needed in ("requests", "aiohttp", "numpy"):
        pytest.importorskip(needed, reason=f"the partner nodes need {needed}")
    sys.path.insert(0, PARTNER_DIR)
    try:
        import runcomfy.catalog as catalog
        import runcomfy.client as client
        import runcomfy.errors as errors
        import runcomfy.execution as execution
        import runcomfy.media as media
    finally:
        sys.path.remove(PARTNER_DIR)
    yield {"catalog": catalog, "client": client, "errors": errors, "execution": execution, "media": media}


@pytest.fixture
def runway(pn: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch) -> None:
    """Runway Gen-4 Turbo in the partner nodes' allowlist, as their catalog script would add it."""
    model = pn["catalog"].Model(
        model_id=MODEL_ID,
        node_class="RunComfyRunwayGen4TurboI2V",
        display_name="RunComfy Runway Gen-4 Turbo I2V",
        output_type="VIDEO",
        pricing_mode="fixed",
        schema=INPUT_SCHEMA,
    )
    monkeypatch.setitem(pn["catalog"].MODELS, MODEL_ID, model)


def pointed(client: Any, emulator: Emulator) -> Any:
    client.api_base = emulator.base_url
    return client


def test_the_price_lookup_reads_the_catalog(
    pn: dict[str, ModuleType], runway: None, emulator_factory: Factory
) -> None:
    emulator = emulator_factory(price_usd=0.07)
    client = pointed(pn["client"].RunComfyClient(emulator.token, model_id=MODEL_ID), emulator)
    try:
        price = client.price()
    finally:
        client.close()
    assert (price.rate, price.price_unit, price.model_id) == (Decimal("0.07"), "second", MODEL_ID)
    assert price.estimate({"duration": 10}) == Decimal("0.70") and "0.07" in price.note


def test_a_generation_end_to_end_with_its_cost_and_video(
    pn: dict[str, ModuleType], runway: None, emulator_factory: Factory, tmp_path: Path
) -> None:
    emulator = emulator_factory(price_usd=0.07)
    events: list[str] = []

    async def generate() -> dict[str, Any]:
        client = pointed(pn["client"].AsyncRunComfyClient(emulator.token, model_id=MODEL_ID), emulator)
        try:
            return await pn["execution"].async_run_generation(
                client,
                {"promptImage": data_uri(make_png()), "duration": 5, "seed": 7},
                on_event=lambda event: events.append(event["state"]),
                model_id=MODEL_ID,
                poll_interval=0.01,
            )
        finally:
            await client.close()

    done = asyncio.run(generate())
    assert done["state"] == "completed" and events[:2] == ["submitting", "submitted"]
    assert done["quote"]["estimated_cost_usd"] == pytest.approx(0.35)
    assert done["cost_usd"] == pytest.approx(0.35)  # from /result?include_cost=true
    (entry,) = emulator.ledger().entries
    assert entry.request_id == done["request_id"] and entry.cost_usd == pytest.approx(0.35)

    url = done["video_url"]
    with pytest.raises(ValueError, match="RunComfy-hosted HTTPS"):
        pn["media"].validate_output_url(url)  # the emulator's loopback http URL, as expected
    mapped = MAPPED_ORIGIN + urlsplit(url).path

    def get(target: str, **kwargs: Any) -> Any:
        assert target.startswith(MAPPED_ORIGIN)
        return pn["media"].requests.get(emulator.base_url + target[len(MAPPED_ORIGIN) :], **kwargs)

    path = Path(pn["media"].download_video(mapped, tmp_path, get=get))
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and hashlib.sha256(data).hexdigest() == entry.video_sha256


def test_a_failed_generation_and_an_empty_balance_are_its_errors(
    pn: dict[str, ModuleType], runway: None, emulator_factory: Factory
) -> None:
    emulator = emulator_factory(balance_usd=0.25)
    emulator.add_fault(FaultRule(kind="generation_failed", failure_code="SAFETY.INPUT.IMAGE", times=1))
    error = pn["errors"]

    async def generate() -> dict[str, Any]:
        client = pointed(pn["client"].AsyncRunComfyClient(emulator.token, model_id=MODEL_ID), emulator)
        try:
            return await pn["execution"].async_run_generation(
                client, {"promptImage": data_uri(make_png())}, model_id=MODEL_ID, poll_interval=0.01
            )
        finally:
            await client.close()

    with pytest.raises(error.RunComfyError) as failed:
        asyncio.run(generate())
    assert failed.value.code == "generation_failed"
    with pytest.raises(error.RunComfyError) as broke:  # the failure stayed billed: the balance is spent
        asyncio.run(generate())
    assert broke.value.code == "insufficient_balance"
    assert emulator.ledger().billed_submissions == 1
