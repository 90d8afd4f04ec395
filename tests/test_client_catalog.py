"""The clients' catalog reads, sync and async over loopback HTTP against the emulator: ``model()`` and
``models()`` typed, retried like the other reads, and bad answers turned into typed errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dagster_runway.client import ModelInfo, ModelPage
from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.errors import (
    AuthenticationError,
    InputValidationError,
    ModelNotFoundError,
    RateLimitedError,
    ServerError,
    UnexpectedResponseError,
)
from dagster_runway.schema import INPUT_SCHEMA, MODEL_ID
from tests.test_client import FAST_RETRY, KINDS, Connector

Factory = Callable[..., Emulator]


@pytest.fixture(params=KINDS)
def connect(request: pytest.FixtureRequest) -> Iterator[Connector]:
    connector = Connector(request.param)
    yield connector
    connector.close()


def other(n: int) -> dict[str, Any]:
    return {
        "model_id": f"acme/model-{n}/text-to-video",
        "display_name": f"Acme {n}",
        "categories": ["text-to-video"],
        "base_price_usd": 0.5,
        "price_unit": "output",
    }


def test_model_reads_the_price_unit_and_schema(emulator_factory: Factory, connect: Connector) -> None:
    api = connect(emulator_factory(price_usd=0.07))
    model = api.model()
    assert isinstance(model, ModelInfo)
    assert (model.model_id, model.base_price_usd, model.price_unit) == (MODEL_ID, 0.07, "second")
    assert model.input_schema == INPUT_SCHEMA and model.categories == ["image-to-video"]
    assert (model.estimate_usd(5), model.estimate_usd(10)) == (0.35, 0.7)
    # The id's slashes stay separators in the path; the call is a GET with the token.
    (sent,) = api.sent
    assert (sent.method, sent.url.path) == ("GET", f"/v1/models/{MODEL_ID}")
    assert sent.headers["authorization"] == f"Bearer {api.client._core._token}"


def test_model_reads_another_listed_model(emulator_factory: Factory, connect: Connector) -> None:
    api = connect(emulator_factory(catalog=[other(1)]))
    model = api.model("acme/model-1/text-to-video")
    assert (model.display_name, model.price_unit, model.estimate_usd(10)) == ("Acme 1", "output", 0.5)


def test_models_pages_searches_and_filters(emulator_factory: Factory, connect: Connector) -> None:
    api = connect(emulator_factory(catalog=[other(n) for n in range(5)]))
    page = api.models()
    assert isinstance(page, ModelPage)
    assert (page.total, page.limit, page.offset, len(page.models)) == (6, 20, 0, 6)
    second = api.models(limit=2, offset=2)
    assert [m.model_id for m in second.models] == [other(1)["model_id"], other(2)["model_id"]]
    assert api.models(search="acme 3").total == 1
    assert api.models(category="image-to-video").models[0].model_id == MODEL_ID
    # Only the parameters given are sent.
    assert dict(api.sent[0].url.params) == {}
    assert dict(api.sent[1].url.params) == {"limit": "2", "offset": "2"}


def test_a_5xx_on_the_catalog_is_retried(emulator: Emulator, connect: Connector) -> None:
    emulator.add_fault(FaultRule(kind="server_error", endpoint="models", status=503, times=2))
    api = connect(emulator)
    assert api.model().model_id == MODEL_ID
    assert len(api.sent) == 3
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="models", retry_after=0, times=1))
    assert api.models().total == 1
    assert len(api.sent) == 5


def test_a_5xx_that_persists_ends_in_a_server_error(emulator: Emulator, connect: Connector) -> None:
    emulator.add_fault(FaultRule(kind="server_error", endpoint="models", status=502))
    api = connect(emulator)
    with pytest.raises(ServerError) as info:
        api.models()
    assert info.value.status_code == 502 and len(api.sent) == FAST_RETRY.max_attempts
    emulator.clear_faults()
    emulator.add_fault(FaultRule(kind="rate_limit", endpoint="models", retry_after=0))
    with pytest.raises(RateLimitedError):
        api.model()


def test_an_unknown_model_is_model_not_found_and_not_retried(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator)
    with pytest.raises(ModelNotFoundError) as info:
        api.model("nobody/nothing")
    assert info.value.status_code == 404 and info.value.error_code == 400001
    assert "'nobody/nothing'" in str(info.value) and len(api.sent) == 1


def test_a_wrong_token_is_an_authentication_error(emulator: Emulator, connect: Connector) -> None:
    api = connect(emulator, token="wrong-token-123")
    for call in (api.model, api.models):
        with pytest.raises(AuthenticationError) as info:
            call()
        assert "wrong-token-123" not in str(info.value) and "wrong-token-123" not in repr(info.value)
    assert len(api.sent) == 2


@pytest.mark.parametrize("kind", ["wrong_shape_200", "html_200", "bad_gzip"])
def test_an_answer_that_is_not_the_catalogs_is_an_unexpected_response(
    emulator: Emulator, connect: Connector, kind: str
) -> None:
    emulator.add_fault(FaultRule(kind=kind, endpoint="models"))
    api = connect(emulator)
    for call in (api.model, api.models):
        with pytest.raises(UnexpectedResponseError):
            call()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"model_id": MODEL_ID, "base_price_usd": "cheap"}, "base_price_usd"),
        ({"model_id": MODEL_ID, "base_price_usd": -1}, "base_price_usd"),
        ({"model_id": MODEL_ID, "base_price_usd": True}, "base_price_usd"),
        ({"model_id": MODEL_ID, "categories": "video"}, "categories"),
        ({"display_name": "no id"}, "model_id"),
    ],
)
def test_a_bad_field_is_an_unexpected_response_naming_it(
    connect: Connector, body: dict[str, Any], problem: str
) -> None:
    # A mock transport: the emulator never serves a bad entry (its entries are validated).
    api = connect(
        "http://runcomfy.test", transport=httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    )
    with pytest.raises(UnexpectedResponseError) as info:
        api.model()
    assert problem in str(info.value) and len(api.sent) == FAST_RETRY.max_attempts


def test_unknown_fields_and_units_are_kept_not_refused(connect: Connector) -> None:
    body = {"model_id": "a/b", "base_price_usd": 2, "price_unit": "image", "kind": "model", "tags": ["x"]}
    listing = {"models": [body], "total": 1, "next": None}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=listing if request.url.path == "/v1/models" else body)

    api = connect("http://runcomfy.test", transport=httpx.MockTransport(handler))
    model = api.model("a/b")
    assert model.price_unit == "image" and model.estimate_usd(5) is None  # an unknown unit: no guess
    assert model.model_extra == {"kind": "model", "tags": ["x"]}
    page = api.models()
    assert page.models == [model] and page.limit is None


@pytest.mark.parametrize("model_id", ["", "/", "a//b", "a/../b", "a b", "a/\nb"])
def test_a_malformed_model_id_is_refused_before_sending(
    emulator: Emulator, connect: Connector, model_id: str
) -> None:
    api = connect(emulator)
    with pytest.raises(InputValidationError) as info:
        api.model(model_id)
    assert info.value.field == "model_id" and api.sent == []


@pytest.mark.parametrize(("name", "value"), [("limit", 0), ("offset", -1), ("limit", 1.5), ("offset", True)])
def test_bad_page_parameters_are_refused_before_sending(
    emulator: Emulator, connect: Connector, name: str, value: Any
) -> None:
    api = connect(emulator)
    with pytest.raises(InputValidationError) as info:
        api.models(**{name: value})
    assert info.value.field == name and api.sent == []
