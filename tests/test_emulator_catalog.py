"""The emulator's catalog over loopback HTTP: the shapes RunComfy's clients read (reference §1), paging,
search and category, the API's error body, the price options and the failed-generation billing policy
against the ledger."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.emulator.catalog import CatalogFileError, load_catalog_file
from dagster_runway.emulator.cli import _config, add_arguments
from dagster_runway.schema import MODEL_ID
from tests.fixtures.emulator import Api, EmulatorProcess, data_uri, make_png
from tests.test_schema import EMBEDDED_INPUT_SCHEMA, SEED_FILE, seed_input_schema

Factory = Callable[..., Emulator]
Connect = Callable[..., Api]

# The field lists of reference/runcomfy-api.md §1 (what RunComfy's own clients read).
MODEL_FIELDS = {
    "model_id",
    "display_name",
    "categories",
    "base_price_usd",
    "price_unit",
    "pricing_note",
    "input_schema",
    "model_url",
}
LISTING_FIELDS = {"models", "total", "limit", "offset"}
IMAGE = data_uri(make_png())


def entry(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "model_id": f"vendor-{n % 3}/model-{n:02d}/text-to-image",
        "display_name": f"Model {n:02d}",
        "categories": ["text-to-image"] if n % 2 else ["text-to-video", "video"],
        "base_price_usd": 0.01 * n,
        "price_unit": "output",
        **fields,
    }


def published_schema() -> dict[str, Any]:
    if SEED_FILE.exists():
        return seed_input_schema(SEED_FILE.read_text(encoding="utf-8"))
    return EMBEDDED_INPUT_SCHEMA


def get(api: Api, path: str, **params: Any) -> Any:
    response = api.http.get(path, params=params, follow_redirects=False)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_served_model_has_the_references_fields_price_and_the_seeds_schema(
    emulator: Emulator, http_api: Connect
) -> None:
    body = get(http_api(emulator), f"/v1/models/{MODEL_ID}")
    assert set(body) == MODEL_FIELDS
    assert body["model_id"] == MODEL_ID and body["categories"] == ["image-to-video"]
    assert body["base_price_usd"] == 0.05 and body["price_unit"] == "second"
    assert body["input_schema"] == published_schema()
    assert isinstance(body["display_name"], str) and isinstance(body["pricing_note"], str)
    assert body["model_url"].startswith("https://www.runcomfy.com/models/")


def test_the_listing_answers_without_a_redirect_in_the_references_shape(
    emulator_factory: Factory, http_api: Connect
) -> None:
    emulator = emulator_factory(catalog=[entry(n) for n in range(3)])
    body = get(http_api(emulator), "/v1/models")
    assert set(body) == LISTING_FIELDS
    assert (body["total"], body["limit"], body["offset"]) == (4, 20, 0)
    assert [m["model_id"] for m in body["models"]] == [MODEL_ID, *(entry(n)["model_id"] for n in range(3))]
    assert all(set(model) == MODEL_FIELDS for model in body["models"])
    # An entry given without its optional fields is served with them, empty.
    assert body["models"][1] | {"model_id": "x"} == {
        **entry(0),
        "model_id": "x",
        "pricing_note": "",
        "input_schema": {},
        "model_url": "",
    }


def test_categories_is_its_own_endpoint_not_a_model_id(emulator_factory: Factory, http_api: Connect) -> None:
    api = http_api(emulator_factory(catalog=[entry(1), entry(2)]))
    assert get(api, "/v1/models/categories") == {
        "categories": ["image-to-video", "text-to-image", "text-to-video", "video"]
    }
    submit = api.http.post("/v1/models/categories", json={"promptImage": IMAGE})
    assert submit.status_code == 404 and submit.json()["error_code"] == 400001
    assert get(api, f"/v1/models/{entry(1)['model_id']}")["display_name"] == "Model 01"


def test_pages_cover_every_model_once_in_order(emulator_factory: Factory, http_api: Connect) -> None:
    given = [entry(n) for n in range(24)]
    api = http_api(emulator_factory(catalog=given))
    seen: list[str] = []
    for offset in range(0, 30, 7):
        page = get(api, "/v1/models", limit=7, offset=offset)
        assert (page["total"], page["limit"], page["offset"]) == (25, 7, offset)
        seen += [model["model_id"] for model in page["models"]]
    assert seen == [MODEL_ID, *(e["model_id"] for e in given)]
    past = get(api, "/v1/models", offset=100)
    assert past["models"] == [] and past["total"] == 25
    assert len(get(api, "/v1/models")["models"]) == 20  # the default limit
    assert len(get(api, "/v1/models", limit=100)["models"]) == 25


@pytest.mark.parametrize(
    ("name", "value"),
    [("limit", "0"), ("limit", "101"), ("limit", "ten"), ("offset", "-1"), ("offset", "1.5")],
)
def test_a_bad_page_parameter_is_a_422_naming_it(
    emulator: Emulator, http_api: Connect, name: str, value: str
) -> None:
    response = http_api(emulator).http.get("/v1/models", params={name: value})
    assert response.status_code == 422
    body = response.json()
    assert body["error_code"] == 422001 and name in body["error_message"]
    assert body["detail"][0]["loc"] == ["query", name]


def test_search_and_category_filter_before_paging(emulator_factory: Factory, http_api: Connect) -> None:
    api = http_api(emulator_factory(catalog=[entry(n) for n in range(10)]))

    def ids(**params: Any) -> tuple[int, list[str]]:
        page = get(api, "/v1/models", **params)
        return page["total"], [model["model_id"] for model in page["models"]]

    assert ids(search="RUNWAY") == (1, [MODEL_ID])  # in the id, whatever the case
    assert ids(search="model 07") == (1, [entry(7)["model_id"]])  # in the display name
    assert ids(search="vendor-1") == (3, [entry(n)["model_id"] for n in (1, 4, 7)])
    assert ids(category="Text-To-Image") == (5, [entry(n)["model_id"] for n in (1, 3, 5, 7, 9)])
    assert ids(category="text-to-image", search="vendor-1") == (2, [entry(n)["model_id"] for n in (1, 7)])
    assert ids(category="text-to-image", limit=2, offset=2) == (5, [entry(n)["model_id"] for n in (5, 7)])
    assert ids(search="no such model") == (0, [])


def test_an_unknown_model_is_a_404_with_the_apis_error_body(emulator: Emulator, http_api: Connect) -> None:
    api = http_api(emulator)
    for path in ("/v1/models/nobody/nothing", f"/v1/models/{MODEL_ID}/extra", "/v1/models/"):
        response = api.http.get(path)
        assert response.status_code == 404, path
        body = response.json()
        assert set(body) == {"error_code", "error_message", "detail"}
        assert body["error_code"] == 400001 and "Unknown model" in body["error_message"]


def test_the_catalog_needs_the_token(emulator: Emulator, http_api: Connect) -> None:
    anonymous = http_api(emulator, anonymous=True)
    for path in ("/v1/models", "/v1/models/categories", f"/v1/models/{MODEL_ID}"):
        response = anonymous.http.get(path)
        assert response.status_code == 401 and response.json()["error_code"] == 400004
        assert emulator.token not in response.text


def test_a_fault_on_models_hits_the_catalog_reads(emulator: Emulator, http_api: Connect) -> None:
    emulator.add_fault(FaultRule(kind="server_error", endpoint="models", status=502, times=2))
    api = http_api(emulator)
    assert api.http.get("/v1/models").status_code == 502
    assert api.http.get(f"/v1/models/{MODEL_ID}").status_code == 502
    assert api.http.get("/v1/models/categories").status_code == 200
    assert api.submit_id({"promptImage": IMAGE})  # a submit is not a catalog read


def test_the_price_per_second_is_served_and_billed(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(price_usd=0.12)
    api = http_api(emulator)
    model = get(api, f"/v1/models/{MODEL_ID}")
    assert (model["base_price_usd"], model["price_unit"]) == (0.12, "second")
    assert "0.12" in model["pricing_note"]
    ten = api.finish(api.submit_id({"promptImage": IMAGE, "duration": 10}))
    assert ten["cost"] == pytest.approx(1.2)
    assert emulator.ledger().total_cost_usd == pytest.approx(1.2)


def test_a_price_per_output_ignores_the_duration(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(price_usd=0.3, price_unit="output")
    api = http_api(emulator)
    assert get(api, "/v1/models")["models"][0]["price_unit"] == "output"
    costs = [api.finish(api.submit_id({"promptImage": IMAGE, "duration": d}))["cost"] for d in (5, 10)]
    assert costs == [pytest.approx(0.3), pytest.approx(0.3)]
    assert [e.cost_usd for e in emulator.ledger().entries] == costs


def test_another_input_schema_changes_the_catalog_not_the_validation(
    emulator_factory: Factory, http_api: Connect
) -> None:
    changed = json.loads(json.dumps(published_schema()))
    changed["properties"]["duration"]["enum"] = [5]
    api = http_api(emulator_factory(input_schema=changed))
    assert get(api, f"/v1/models/{MODEL_ID}")["input_schema"]["properties"]["duration"]["enum"] == [5]
    assert api.submit_id({"promptImage": IMAGE, "duration": 10})


@pytest.mark.parametrize("bill_failed", [True, False])
def test_failed_generations_cost_what_the_ledger_says_either_way(
    emulator_factory: Factory, http_api: Connect, bill_failed: bool
) -> None:
    emulator = emulator_factory(bill_failed=bill_failed, paused=True)
    emulator.add_fault(FaultRule(kind="generation_failed", match_seed=1))
    api = http_api(emulator)
    failed = api.submit_id({"promptImage": IMAGE, "seed": 1})
    succeeded = api.submit_id({"promptImage": IMAGE, "seed": 2})
    cancelled = api.submit_id({"promptImage": IMAGE, "seed": 3})
    assert api.cancel(cancelled).json()["outcome"] == "cancelled"
    emulator.resume()
    results = {rid: api.finish(rid) for rid in (failed, succeeded, cancelled)}
    assert [results[rid]["status"] for rid in (failed, succeeded, cancelled)] == [
        "failed",
        "succeeded",
        "cancelled",
    ]
    ledger = emulator.ledger()
    by_id = {e.request_id: e for e in ledger.entries}
    assert results[failed]["cost"] == by_id[failed].cost_usd == (0.25 if bill_failed else 0.0)
    assert by_id[failed].billed is bill_failed
    assert results[succeeded]["cost"] == by_id[succeeded].cost_usd == 0.25
    assert "cost" not in results[cancelled] and by_id[cancelled].cost_usd == 0.0  # it never ran
    assert ledger.billed_submissions == (2 if bill_failed else 1)
    assert ledger.total_cost_usd == pytest.approx(0.5 if bill_failed else 0.25)


def test_a_refunded_failure_frees_the_balance(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(bill_failed=False, balance_usd=0.25)
    emulator.add_fault(FaultRule(kind="generation_failed", times=1))
    api = http_api(emulator)
    assert api.finish(api.submit_id({"promptImage": IMAGE}))["status"] == "failed"
    assert api.finish(api.submit_id({"promptImage": IMAGE}))["status"] == "succeeded"
    assert api.submit({"promptImage": IMAGE}).status_code == 402  # the success spent it


# -- the catalog file and the command line -------------------------------------------------------------


def test_a_catalog_file_is_a_list_or_a_saved_listing(tmp_path: Path) -> None:
    listing = tmp_path / "listing.json"
    listing.write_text(json.dumps({"models": [entry(1)], "total": 1, "limit": 20, "offset": 0}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([entry(1), entry(2)]))
    assert [e.model_id for e in load_catalog_file(listing)] == [entry(1)["model_id"]]
    assert [e.base_price_usd for e in load_catalog_file(plain)] == [0.01, 0.02]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{not json", "not JSON"),
        ('"a string"', "must be a JSON list"),
        (
            json.dumps([entry(1, base_price_usd=-1)]),
            "entry 0 (vendor-1/model-01/text-to-image): base_price_usd",
        ),
        (
            json.dumps([entry(1), entry(2, price_unit="minute")]),
            "entry 1 (vendor-2/model-02/text-to-image): price_unit",
        ),
        (
            json.dumps([{"model_id": "a/b", "display_name": "A"}]),
            "entry 0 (a/b): base_price_usd: Field required",
        ),
        (json.dumps([entry(1, kind="model")]), "kind: Extra inputs are not permitted"),
    ],
)
def test_a_bad_catalog_file_is_named_with_its_entry_and_field(
    tmp_path: Path, content: str, said: str
) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(content)
    with pytest.raises(CatalogFileError) as info:
        load_catalog_file(path)
    assert str(path) in str(info.value) and said in str(info.value)


def test_the_served_model_cannot_be_listed_twice(emulator_factory: Factory) -> None:
    with pytest.raises(ValueError, match="more than once"):
        emulator_factory(catalog=[entry(1, model_id=MODEL_ID)])


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_price_and_billing_flags_make_the_config(tmp_path: Path) -> None:
    assert (_config(parse()).price_usd, _config(parse()).price_unit, _config(parse()).bill_failed) == (
        0.05,
        "second",
        True,
    )
    config = _config(parse("--price-usd-per-output", "0.4", "--no-bill-failed"))
    assert (config.price_usd, config.price_unit, config.bill_failed) == (0.4, "output", False)
    for flag in ("--price-usd-per-second", "--price-per-second"):
        assert (
            _config(parse(flag, "0.08")).price_usd == 0.08
            and _config(parse(flag, "0.08")).price_unit == "second"
        )
    with pytest.raises(SystemExit):
        parse("--price-usd-per-second", "0.1", "--price-usd-per-output", "0.2")


def test_the_command_serves_a_catalog_file_at_its_price(
    tmp_path: Path, emulator_process: Callable[..., EmulatorProcess], http_api: Connect
) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps([entry(4)]))
    process = emulator_process(
        "--port", "0", "--time-scale", "0", "--catalog", str(path), "--price-usd-per-second", "0.09"
    )
    api = http_api(process)
    listing = get(api, "/v1/models")
    assert [(m["model_id"], m["base_price_usd"]) for m in listing["models"]] == [
        (MODEL_ID, 0.09),
        (entry(4)["model_id"], 0.04),
    ]
    assert process.stop() == 0


def test_the_command_refuses_a_bad_catalog_file_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "catalog.json"
    path.write_text("[{}]")
    done = subprocess.run(
        [sys.executable, "-m", "dagster_runway.emulator", "--port", "0", "--catalog", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.count("\n") == 1
        and str(path) in done.stderr
        and "model_id: Field required" in done.stderr
    )
