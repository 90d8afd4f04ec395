"""The README's generated parts stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from dagster_runway.pipeline import failures as fl
from dagster_runway.pipeline.config import options_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_options_table_is_generated_from_the_config_model() -> None:
    block = re.search(r"<!-- options:start -->\n(.*?)\n<!-- options:end -->", README.read_text(), re.S)
    assert block is not None, "README.md lost its options markers"
    assert block.group(1) == options_table(), (
        "README.md's option table is out of date: regenerate it from "
        "dagster_runway.pipeline.config.options_table()"
    )


def test_the_failure_table_is_generated_from_the_failure_catalog() -> None:
    block = re.search(r"<!-- failures:start -->\n(.*?)\n<!-- failures:end -->", README.read_text(), re.S)
    assert block is not None, "README.md lost its failure-table markers"
    assert block.group(1) == fl.failure_table(), (
        "README.md's failure table is out of date: regenerate it from dagster_runway.pipeline.failures.failure_table()"
    )


def test_the_failure_catalog_names_every_class_once() -> None:
    classes = {
        v for k, v in vars(fl).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z_]+", v)
    }
    listed = [c for names, _, _ in fl.CATALOG for c in names]
    assert sorted(listed) == sorted(classes), "each failure class needs exactly one row in failures.CATALOG"
