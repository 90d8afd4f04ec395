"""``dagster-runway models`` as a user runs it: a subprocess against an emulator at RUNCOMFY_BASE_URL (or
its own with ``--emulator``), checked by exit status and output; the token is never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from dagster_runway.emulator import Emulator, FaultRule
from dagster_runway.schema import MODEL_ID
from tests.test_client import closed_port_url

Factory = Callable[..., Emulator]
SECRET = "tok-s3cret-catalog-0123456789"


def models(
    *args: str, base_url: str | None = None, token: str | None = SECRET
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNCOMFY_API_TOKEN", "RUNCOMFY_BASE_URL")}
    if base_url is not None:
        env["RUNCOMFY_BASE_URL"] = base_url
    if token is not None:
        env["RUNCOMFY_API_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-m", "dagster_runway.cli", "models", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert SECRET not in done.stdout + done.stderr
    return done


@pytest.fixture
def served(emulator_factory: Factory) -> Emulator:
    catalog = [
        {"model_id": f"acme/clip-{n}/text-to-video", "display_name": f"Acme Clip {n}", "categories": ["text-to-video"],
         "base_price_usd": 0.2, "price_unit": "output"}
        for n in range(3)
    ]  # fmt: skip
    return emulator_factory(tokens=[SECRET], price_usd=0.08, catalog=catalog)


def test_list_prints_every_model_with_its_price(served: Emulator) -> None:
    done = models(base_url=served.base_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "ID", "PRICE", "(USD)", "CATEGORIES", "NAME"]
    assert lines[1].split()[:3] == [MODEL_ID, "0.08/second", "image-to-video"]
    assert lines[2].split()[:3] == ["acme/clip-0/text-to-video", "0.2/output", "text-to-video"]
    assert lines[-1] == "1-4 of 4 models" and done.stderr == ""


def test_search_category_and_the_next_page(served: Emulator) -> None:
    done = models("clip", "--limit", "2", base_url=served.base_url)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[1:3]] == [
        "acme/clip-0/text-to-video",
        "acme/clip-1/text-to-video",
    ]
    assert "1-2 of 3 models; dagster-runway models 'clip' --offset 2 for the next 1" in done.stdout
    assert "acme/clip-2" in models("clip", "--offset", "2", base_url=served.base_url).stdout
    only = models("--category", "image-to-video", base_url=served.base_url)
    assert MODEL_ID in only.stdout and "acme" not in only.stdout
    nothing = models("no-such-thing", base_url=served.base_url)
    assert (nothing.returncode, nothing.stdout.strip()) == (0, "no models match 'no-such-thing'")


def test_show_prints_the_price_and_every_input_rule(served: Emulator) -> None:
    done = models("show", MODEL_ID, base_url=served.base_url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "price: 0.08 USD per second of output video (5 s: 0.40 USD, 10 s: 0.80 USD)" in out
    assert "promptImage  * string" in out  # the one required field
    for rule in ("one of: 1584:672, 1280:720, 1104:832, 960:960, 832:1104, 720:1280", "one of: 5, 10",
                 "range: 0..4294967295", "at most 1000 characters", "rule: file_size_mb< 16",
                 "rule: width/height> 0.5 (The aspect ratio range should be 1:2 to 2:1.)"):  # fmt: skip
        assert rule in out, rule


def test_show_json_is_the_catalog_entry(served: Emulator) -> None:
    done = models("show", "acme/clip-1/text-to-video", "--json", base_url=served.base_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["display_name"] == "Acme Clip 1"


def test_an_unknown_model_exits_1_in_one_line(served: Emulator) -> None:
    done = models("show", "nobody/nothing", base_url=served.base_url)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "'nobody/nothing' is unknown" in done.stderr


def test_a_missing_token_is_one_line_saying_what_to_set(served: Emulator) -> None:
    for token in (None, "  "):
        done = models(base_url=served.base_url, token=token)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and "set RUNCOMFY_API_TOKEN" in done.stderr


def test_a_wrong_token_exits_1_without_printing_it(served: Emulator) -> None:
    done = models("show", MODEL_ID, base_url=served.base_url, token="wrong-" + SECRET)
    assert done.returncode == 1 and "RUNCOMFY_API_TOKEN" in done.stderr and "wrong-" not in done.stderr


def test_a_failing_service_exits_1_after_retrying(served: Emulator) -> None:
    served.add_fault(FaultRule(kind="server_error", endpoint="models", status=503))
    done = models(base_url=served.base_url)
    assert done.returncode == 1 and "HTTP 503" in done.stderr and done.stderr.count("\n") == 1
    unreachable = models(base_url=closed_port_url())
    assert unreachable.returncode == 1 and "Could not complete model listing" in unreachable.stderr


def test_emulator_flag_needs_no_token_or_url() -> None:
    done = models("show", MODEL_ID, "--emulator", token=None)
    assert done.returncode == 0, done.stderr
    assert "price: 0.05 USD per second of output video" in done.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["show"], "'show' takes one MODEL_ID"),
        (["two", "words"], "give one SEARCH text"),
        (["--limit", "0"], "--limit 0"),
    ],
)
def test_wrong_arguments_exit_2(args: list[str], said: str) -> None:
    done = models(*args, "--emulator")
    assert done.returncode == 2 and said in done.stderr
